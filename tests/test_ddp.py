"""DDP decoder training under torchrun: two gloo processes on CPU against one process.

The two-process runs start ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m cellembed
fit-decoder ...`` as a subprocess (the real launcher, rendezvous and process group); they skip where gloo or a
local port is unavailable.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cellembed.cache import CacheError, ExtractConfig, extract, make_loader, open_cache
from cellembed.cli import app
from cellembed.metrics import image_counts, score_counts
from cellembed.train import FitConfig, fit_decoder
from cellembed.train._checkpoint import last_tensors
from cellembed.train._validate import reduce_validation

LOSS_RTOL = 1e-3
"""Equivalence tolerance of the per-epoch training loss (relative; measured 2.5e-4), light decoder (no BatchNorm)."""
WEIGHT_RTOL = 0.1
"""... and of the final weights, ||w_two - w_one|| / ||w_one - w_init|| (measured 0.04; a run with half the batch:
1.8)."""


def _launchable() -> str | None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed without gloo"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    except OSError as err:
        return f"no free local port ({err})"
    return None


needs_torchrun = pytest.mark.skipif(_launchable() is not None, reason=str(_launchable()))


def _cache(path, seed, n):
    extract(ExtractConfig(dataset="synthetic", out=str(path), encoder="test_vit", weights="random", device="cpu",
                          num_workers=0, shard_size=2, batch_size=4,
                          dataset_options={"n_tiles": n, "seed": seed, "size": 32}))
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {"train": _cache(root / "train", 0, 8), "val": _cache(root / "val", 1, 6)}


def _args(caches, out, *flags: str, **kw) -> list[str]:
    opts = {"epochs": 4, "batch-size": 8, "lr": 1e-3, "device": "cpu", "workers": 0, "memory": "ram",
            "decoder": "light", "augment": "dihedral", "out": out, **kw}
    return [str(caches["train"]), *flags, *(a for k, v in opts.items() for a in (f"--{k}", str(v)))]


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cellembed", "fit-decoder", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CELLEMBED_DDP_TIMEOUT": "60"}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def _history(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _model(run) -> dict[str, torch.Tensor]:
    return {k[6:]: v for k, v in load_file(str(last_tensors(run))).items() if k.startswith("model.")}


def _init(caches) -> dict[str, torch.Tensor]:
    """The light decoder's weights before training (fit seeds torch with the run's seed, then builds it)."""
    from cellembed.decoders import build_decoder

    m = open_cache(caches["train"]).manifest
    torch.manual_seed(0)
    model = build_decoder("light", m["levels"], m["tile_size"], "cisca", len(m["class_names"]) - 1, image_skip=False)
    return model.state_dict()


def _one_process(caches, out, batch_size=8):
    return fit_decoder(FitConfig(out=str(out), cache=str(caches["train"]), epochs=4, batch_size=batch_size, lr=1e-3,
                                 device="cpu", num_workers=0, memory="ram", decoder="light", augment="dihedral"))


@pytest.mark.slow
@needs_torchrun
def test_two_processes_train_like_one_with_the_same_global_batch(caches, tmp_path):
    """8 tiles in 4 shards, global batch 8: one step per epoch on the same 8 augmented tiles either way, so the
    runs differ only by the batch-level Dice/Tversky/weighted-mean loss terms computed over each rank's half."""
    two = tmp_path / "two"
    proc = _run(_torchrun(_args(caches, two)))
    assert proc.returncode == 0, proc.stderr[-6000:]
    one = _one_process(caches, tmp_path / "one").run_dir
    half = _one_process(caches, tmp_path / "half", batch_size=4).run_dir  # a run that is not the same training
    loss = {name: np.array([h["train_loss"] for h in _history(run)]) for name, run in
            (("one", one), ("two", two), ("half", half))}
    w0, w1, w2, wh = _init(caches), _model(one), _model(two), _model(half)
    dist = lambda a, b: sum(float((a[k] - b[k]).norm() ** 2) for k in w1) ** 0.5  # noqa: E731
    np.testing.assert_allclose(loss["two"], loss["one"], rtol=LOSS_RTOL)
    assert dist(w2, w1) < WEIGHT_RTOL * dist(w1, w0)
    # the tolerances tell another training apart: half the global batch (two steps per epoch)
    assert not np.allclose(loss["half"], loss["one"], rtol=LOSS_RTOL)
    assert dist(wh, w1) > 5 * WEIGHT_RTOL * dist(w1, w0)
    record = json.loads((two / "config.json").read_text())
    assert record["world_size"] == 2 and record["config"]["batch_size"] == 8
    assert json.loads((one / "config.json").read_text())["world_size"] == 1
    # saved without DDP's "module." prefix: the single-process loader takes the two-process checkpoint
    assert _model(two).keys() == _model(one).keys()


# ---- validation: counts of every rank, aggregated once -------------------------------------------------------


def _shares(n_ranks: int) -> list[tuple]:
    """Validation shares of fixed predictions: 9 synthetic tiles, their GT against a damaged copy (a nucleus
    dropped, the map shifted a pixel), tile ``i`` scored on rank ``i % n_ranks``."""
    from cellembed.data._synthetic import make_synthetic_tile

    shares = [(0.0, 0, {}, [], np.zeros((4, 3), np.int64)) for _ in range(n_ranks)]
    for i in range(9):
        tile = make_synthetic_tile(3, i, size=64)
        true = np.stack([tile.inst_map, tile.type_map.astype(np.int32)], -1)
        pred = np.roll(true, i % 3, axis=1)
        pred[pred[..., 0] == pred[..., 0].max()] = 0
        shares[i % n_ranks][3].append((tile.key, image_counts(pred, true, 4)))
    return shares


def _gather_on_two_ranks(rank: int, port: int, out: str) -> None:
    from cellembed.train import _ddp as ddp

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        reduced = reduce_validation(ddp.gather_all([_shares(2)[rank]]), "cisca", 4, losses=False)
        with open(f"{out}.{rank}.json", "w") as f:
            json.dump(reduced, f)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_torchrun
def test_validation_counts_gathered_from_two_ranks_score_like_one_process(tmp_path):
    one = reduce_validation(_shares(1), "cisca", 4, losses=False)
    torch.multiprocessing.spawn(_gather_on_two_ranks, args=(_free_port(), str(tmp_path / "val")), nprocs=2)
    for rank in (0, 1):  # every rank holds the same scores, bit for bit those of one process
        assert json.loads((tmp_path / f"val.{rank}.json").read_text()) == one
    assert one == {f"val_{k}": v for k, v in score_counts([c for _, c in sorted(
        kc for share in _shares(1) for kc in share[3])], 4)["summary"].items() if k in ("pq", "dq", "sq", "aji", "mpq_plus")}
    # what the reduction must not be: the mean of the ranks' own scores differs
    ranks = [reduce_validation([share], "cisca", 4, losses=False) for share in _shares(2)]
    assert abs(np.mean([r["val_pq"] for r in ranks]) - one["val_pq"]) > 1e-6


def test_validation_reduction_sums_losses_and_semantic_counts():
    a = (6.0, 2, {"ce": 2.0}, [], np.array([[1, 2, 3], [0, 1, 1]]))
    b = (3.0, 1, {"ce": 4.0}, [], np.array([[2, 2, 2], [1, 1, 1]]))
    out = reduce_validation([a, b], "semantic", 2)
    assert out["val_loss"] == 3.0 and out["val_ce"] == 2.0
    assert out == {**reduce_validation([(9.0, 3, {"ce": 6.0}, [], a[4] + b[4])], "semantic", 2)}


def _lose_a_peer(rank: int, port: int, out: str) -> None:
    from cellembed.train import _ddp as ddp

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.zeros(2, 4)).sum().backward()
    if rank == 1:
        os._exit(0)  # dies without leaving the group
    time.sleep(1)
    try:
        with ddp.peers_alive():
            model(torch.zeros(2, 4)).sum().backward()
    except RuntimeError as err:
        with open(out, "w") as f:
            f.write(str(err))


@needs_torchrun
def test_a_dead_peer_is_one_clear_line(tmp_path):
    torch.multiprocessing.spawn(_lose_a_peer, args=(_free_port(), str(tmp_path / "err")), nprocs=2)
    message = (tmp_path / "err").read_text()
    assert "\n" not in message and message.startswith("rank 0: another rank stopped or did not answer within")
    assert message.endswith("rerun the same torchrun command to resume from the last finished epoch")


# ---- the run: rank 0 writes, a killed group resumes, bad input is one line --------------------------------------


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.slow
@needs_torchrun
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs /proc")
def test_killed_rank_stops_the_group_and_the_same_command_resumes(caches, tmp_path):
    run = tmp_path / "run"
    cmd = _torchrun(_args(caches, run, "--no-tune", "--no-refine", epochs=10, decoder="unetr",
                          **{"batch-size": 4, "val-cache": caches["val"]}))
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun's agent stops the other
    _, err = proc.communicate(timeout=120)
    done = metrics.read_text().count("\n")
    assert proc.returncode != 0 and 2 <= done < 10, (done, err[-2000:])
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"epochs run now {10 - done}" in again.stderr.replace("\n", " ")
    assert [h["epoch"] for h in _history(run)] == list(range(1, 11))
    assert json.loads((run / "last.json").read_text())["epoch"] == 10
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    # one run, written by rank 0 alone: no stray files, and it loads in single-process scoring
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "last-00010.safetensors",
                                                      "last.json", "metrics.jsonl", "model.safetensors"]
    from cellembed.evaluate import score_run

    scored = score_run(run, caches["val"], tmp_path / "scores", device="cpu", num_workers=0)
    assert 0.0 <= scored.metrics["summary"]["pq"] <= 1.0
    # resuming with another number of processes is refused in one line
    single = CliRunner().invoke(app, ["fit-decoder", *cmd[cmd.index("fit-decoder") + 1:]])
    assert single.exit_code == 2 and "was trained by 2 process(es), this is 1; resume it under torchrun " \
        "--nproc_per_node=2" in " ".join(single.output.split())


@needs_torchrun
def test_bad_input_under_torchrun_is_one_line(caches, tmp_path):
    proc = _run(_torchrun(_args(caches, tmp_path / "bad", **{"batch-size": 5})))
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # rank 0 reports, rank 1 stays quiet
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "--batch-size 5 is the global batch and must split evenly over the 2 processes" in lines[0]


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 5}, "--batch-size 5 is the global batch and must split evenly over the 2 processes"),
    ({"source": "live"}, "--source live trains in one process, not 2"),
    ({"batch_size": 10}, r"4 shard\(s\) for 5 processes; every rank reads whole shards, so run at most 4"),
])
def test_settings_ddp_cannot_run_are_refused_before_the_group_starts(caches, tmp_path, monkeypatch, change, message):
    world = 5 if change.get("batch_size") == 10 else 2
    for name, value in (("RANK", 0), ("WORLD_SIZE", world), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))
    config = FitConfig(out=str(tmp_path / "run"), cache=str(caches["train"]), device="cpu", **change)
    with pytest.raises((ValueError, CacheError), match=message):
        fit_decoder(config)
    assert not (tmp_path / "run").exists()


def test_more_ranks_than_shards_is_refused(caches):
    with pytest.raises(CacheError, match=r"4 shard\(s\) for 5 processes; .* at most 4 processes"):
        make_loader(open_cache(caches["train"]), batch_size=1, rank=0, world_size=5, num_workers=0, memory="stream")
    # validation reads every sample of a rank's shards; a rank without shards scores nothing
    val = make_loader(open_cache(caches["val"]), batch_size=2, rank=3, world_size=4, num_workers=0,
                      memory="stream", same_steps=False, shuffle=False)
    assert len(val) == 0
