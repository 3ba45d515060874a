"""Checkpoints without pickle: tensors in safetensors, everything else in JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from cellembed.cache._manifest import write_json_atomic


def save_model(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    """Write a model's state dict to ``path`` (safetensors) atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def save_state(run_dir: Path, model, optimizer, scheduler, epoch: int, history: list[dict], best: dict | None) -> None:
    """The resumable state after ``epoch``: model + optimizer tensors, scheduler and RNG.

    One commit point: the tensors go to a new ``last-<epoch>.safetensors``, then ``last.json`` (written
    atomically) names it, then older tensor files are removed. A kill at any moment leaves a ``last.json``
    whose tensors belong to the same epoch.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optim.{pid}.{name}"] = value.detach().reshape(value.shape).contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"last-{epoch:05d}.safetensors"
    tmp = run_dir / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, run_dir / name)
    write_json_atomic(run_dir / "last.json", {"epoch": epoch, "tensors": name, "param_groups": opt["param_groups"],
                                              "scheduler": scheduler.state_dict(), "history": history, "best": best})
    for old in run_dir.glob("last-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def last_tensors(run_dir: Path) -> Path:
    """The tensor file of the last committed epoch."""
    return run_dir / json.loads((run_dir / "last.json").read_text())["tensors"]


def read_state(run_dir: Path) -> tuple[dict, bytes] | None:
    """The committed resume state as (``last.json`` content, raw bytes of its tensor file), or None without one.

    Bytes, so that in DDP rank 0 reads the state once and hands it to every rank (:func:`apply_state`)."""
    if not (run_dir / "last.json").is_file():
        return None
    meta = json.loads((run_dir / "last.json").read_text())
    return meta, (run_dir / meta["tensors"]).read_bytes()


def apply_state(state: tuple[dict, bytes], model, optimizer, scheduler) -> tuple[int, list[dict], dict | None]:
    """Load a :func:`read_state` result into the model, optimizer, scheduler and torch RNG; returns (last finished
    epoch, history, best)."""
    meta, data = state
    tensors = load(data)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta["epoch"], meta["history"], meta["best"]

