"""Decoder training across processes: ``torchrun ... -m cellembed fit-decoder`` trains one model with DDP.

Every rank runs the same loop on its own part of the cache (the loader splits shards by rank, then by reader
worker); gradients are averaged by ``DistributedDataParallel``. Rank 0 alone touches the run directory: what it
decides (the run directory is usable, the resume state, the best checkpoint) reaches the other ranks through
:func:`on_main`, which runs a function on rank 0 and hands its result, or its error, to every rank, so a refusal
on rank 0 stops every rank with the same one-line message instead of leaving them waiting.

A single process (no ``WORLD_SIZE`` in the environment, or 1) uses the same calls: they run the function here
and collectives are the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("CELLEMBED_DDP_TIMEOUT", 900))
"""Seconds a collective waits for the other ranks before it fails (env ``CELLEMBED_DDP_TIMEOUT``)."""

RESUME_HINT = "rerun the same torchrun command to resume from the last finished epoch"
REPORTED_BY_RANK0 = "cellembed_reported_by_rank0"
"""Attribute set on an error that every rank raised alike: rank 0 reports it, the others stay quiet (the CLI)."""


class Ranks(NamedTuple):
    """Where this process stands in the group.

    Attributes:
        rank, world_size: global rank and number of processes (``RANK``, ``WORLD_SIZE``).
        local_rank, local_world_size: the same on this node (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_ranks() -> Ranks:
    """The ranks torchrun (or any launcher setting its variables) gave this process; one process without them."""
    get = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
    world = get("WORLD_SIZE", 1)
    ranks = Ranks(get("RANK", 0), world, get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", world))
    if not 0 <= ranks.rank < ranks.world_size:
        raise ValueError(f"RANK {ranks.rank} is outside WORLD_SIZE {ranks.world_size}; start the processes with "
                         "torchrun, which sets both")
    return ranks


def start(ranks: Ranks, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group (nccl on CUDA, gloo on CPU); returns this rank's device and whether the group was
    started here (a caller that started its own keeps it: leave it with :func:`stop` only when True).

    CUDA ranks take GPU ``LOCAL_RANK``; CPU ranks share the cores (``torch.set_num_threads(cores // local world
    size)``). Every collective fails after :data:`TIMEOUT_S` seconds instead of waiting for a dead rank forever.
    """
    if ranks.world_size == 1:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world_size))
    if dist.is_initialized():
        return device, False
    if "MASTER_ADDR" not in os.environ:
        raise ValueError(f"WORLD_SIZE is {ranks.world_size} but MASTER_ADDR is unset; start the processes with "
                         "torchrun --nproc_per_node=N -m cellembed fit-decoder ...")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=TIMEOUT_S),
                            **({"device_id": device} if device.type == "cuda" else {}))
    return device, True


def stop() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on rank 0; every rank returns its result or raises its error (same type, message).

    The result must be picklable (it crosses processes through ``broadcast_object_list``).
    """
    if not active():
        return fn(*args, **kwargs)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - handed to every rank, re-raised below
            box[0] = ("error", err)
    collective(dist.broadcast_object_list, box, src=0)
    status, value = box[0]
    if status == "error":
        if dist.get_rank() != 0:
            setattr(value, REPORTED_BY_RANK0, True)
        raise value
    return value


@contextmanager
def same_on_every_rank(ranks: Ranks) -> Iterator[None]:
    """Errors raised inside come from checks every rank makes alike: marked so that only rank 0 reports them."""
    try:
        yield
    except Exception as err:
        if not ranks.main:
            setattr(err, REPORTED_BY_RANK0, True)
        raise


def reported_by_rank0(err: BaseException) -> bool:
    """Whether ``err`` is one that rank 0 reports for every rank (see :func:`on_main`)."""
    return getattr(err, REPORTED_BY_RANK0, False)


def sum_all(*values: float) -> list[float]:
    """Sums over ranks of each value (float64; the values themselves in a single process)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    collective(dist.all_reduce, t)
    return t.cpu().tolist()


def gather_all(items: list) -> list:
    """Every rank's ``items`` concatenated in rank order, on every rank (``items`` itself in a single process)."""
    if not active():
        return list(items)
    out: list = [None] * dist.get_world_size()
    collective(dist.all_gather_object, out, items)
    return [x for part in out for x in part]


def barrier() -> None:
    if active():
        collective(dist.barrier)


def collective(fn: Callable, *args, **kwargs):
    """Run a collective; any failure (a rank died, a timeout) becomes :func:`peer_error`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        raise peer_error(err) from err


@contextmanager
def peers_alive() -> Iterator[None]:
    """Around training steps: a failure of the group seen inside (DDP's gradient all-reduce found a peer gone or
    timed out) becomes :func:`peer_error`; other errors pass unchanged."""
    try:
        yield
    except RuntimeError as err:
        if not active() or not (isinstance(err, dist.DistError) or any(s in str(err) for s in COMM_SIGNS)):
            raise
        raise peer_error(err) from err


COMM_SIGNS = ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out")
"""Words of the errors that the gloo and nccl backends raise as plain RuntimeErrors when a peer fails."""


def peer_error(err: BaseException) -> RuntimeError:
    """One line: this rank, that another stopped or timed out (the backend's first line), and the fix."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return RuntimeError(f"rank {dist.get_rank()}: another rank stopped or did not answer within {TIMEOUT_S:.0f} s "
                        f"({first}); {RESUME_HINT}")


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model DDP trains (the model itself in a single process); save and validate the unwrapped one."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":  # per-rank BatchNorm statistics would make the step depend on the rank split
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)
