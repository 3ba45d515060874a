"""DDP decoder training: the streaming epoch with P = 1 and P = 2 processes, side by side, on one synthetic cache.

Each P runs the real command, ``python -m torch.distributed.run --standalone --nproc_per_node=P -m cellembed
fit-decoder CACHE --memory stream ...`` (P = 1 too, so both pay the same launcher), with the same global batch.
Rank 0's ``train_seconds`` of every epoch after the first (reader start-up, numba compilation) are read from
``metrics.jsonl``; the best is kept, so other load on a shared machine is filtered out. Reported: tiles per
second of the epoch, the speed-up over P = 1, and the whole command's wall time (start-up included).

On CPU the P processes share the machine's cores (each rank takes cores // P torch threads and its own reader
workers), so the speed-up measures how well DDP + gloo use the same cores, not more hardware. P GPUs were not
measured unless this ran with ``--device cuda`` on a machine with P GPUs (results then go to ``ddp_cuda.*``).

    python benchmarks/ddp.py [--quick] [--tiles 128] [--size 256] [--epochs 4] [--processes 1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks._common import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, write_results

REPO = Path(__file__).resolve().parents[1]


def build_cache(out: Path, n_tiles: int, size: int, shard_size: int) -> Path:
    """A synthetic cache from the tiny random-init ViT (the decoder's cost is what is measured)."""
    from cellembed.cache import ExtractConfig, extract

    extract(ExtractConfig(dataset="synthetic", out=str(out), encoder="test_vit", weights="random", device="cpu",
                          num_workers=0, shard_size=shard_size, batch_size=8,
                          dataset_options={"n_tiles": n_tiles, "seed": 0, "size": size}))
    return out


def run(cache: Path, out: Path, processes: int, args) -> dict:
    """One ``fit-decoder`` under torchrun with ``processes`` ranks; rank 0's epoch times and the wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "cellembed", "fit-decoder", str(cache), "--out", str(out), "--memory", "stream",
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--device", args.device, "--decoder", args.decoder, "--no-tune"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"P={processes} failed:\n{proc.stderr[-3000:]}")
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [h["train_seconds"] for h in history]
    return {"epoch_seconds": epochs, "best_epoch_seconds": min(epochs[1:] or epochs), "wall_seconds": wall,
            "world_size": json.loads((out / "config.json").read_text())["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny setting that checks the script runs")
    parser.add_argument("--tiles", type=int, default=128)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (each of P ranks takes 1/P)")
    parser.add_argument("--workers", type=int, default=1, help="reader processes per rank")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--decoder", default="unetr")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.quick:
        args.tiles, args.size, args.shard_size, args.epochs, args.batch_size = 16, 64, 2, 2, 4
    counts = [int(p) for p in args.processes.split(",")]
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_cache(Path(tmp) / "cache", args.tiles, args.size, args.shard_size)
        for p in counts:
            runs[p] = run(cache, Path(tmp) / f"p{p}", p, args)
    base = runs[counts[0]]["best_epoch_seconds"]
    for p in counts:
        r = runs[p]
        rows.append({"processes": p, "epoch s (best)": f"{r['best_epoch_seconds']:.2f}",
                     "tiles/s": f"{args.tiles / r['best_epoch_seconds']:.1f}",
                     f"speed-up vs P={counts[0]}": f"{base / r['best_epoch_seconds']:.2f}",
                     "wall s (start-up included)": f"{r['wall_seconds']:.1f}"})
    name = f"ddp{'_quick' if args.quick else ''}_{args.device}"
    settings = {k: v for k, v in vars(args).items()}
    payload = {"machine": machine(), "settings": settings, "runs": {str(p): runs[p] for p in counts},
               "description": (f"Streaming epoch of `fit-decoder --memory stream` ({args.decoder} decoder, "
                               f"{args.tiles} synthetic {args.size}² tiles in shards of {args.shard_size}, global "
                               f"batch {args.batch_size}, {args.workers} reader worker(s) per rank) under torchrun "
                               f"with P processes on {args.device}; best epoch after the first. "
                               + ("On CPU the ranks share the cores. " if args.device == "cpu" else "")
                               + "P GPUs were not measured unless device is cuda.")}

    def plot(ax):
        ax.bar([str(p) for p in counts], [args.tiles / runs[p]["best_epoch_seconds"] for p in counts])
        ax.set(xlabel="processes (P)", ylabel="tiles / s (streaming epoch)", title=f"fit-decoder under torchrun, "
               f"{args.device}")

    print(write_results(name, payload, rows, plot).read_text())


if __name__ == "__main__":
    main()
