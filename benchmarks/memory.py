"""Peak memory of extraction and of a streaming fit on a cache 1× and 10× the size: streaming must stay flat.

Each measurement runs in a fresh subprocess (``python benchmarks/memory.py --child JOB``), so that nothing from an
earlier run stays resident. The parent polls the child's process tree every 50 ms and keeps the peak of the summed
PSS (proportional set size: pages shared between the main process and its forked DataLoader workers are split
between them, not counted twice); the child reports its own ``ru_maxrss`` and that of its finished children
(the largest worker). A ``ram`` fit (the whole cache decoded into host tensors) runs beside the ``stream`` fit as a
control: its peak grows with the cache, which shows that the measurement sees growth where there is some.

    python benchmarks/memory.py [--tiles 48] [--factor 10] [--encoder efficientnet_lite0_in1k]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellembed.cache import open_cache
from cellembed.cache._loader import auto_shuffle_buffer

try:
    from benchmarks._common import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, write_results

WEIGHTS = {"efficientnet_lite0_in1k": "packaged"}
MAX_GROWTH = 1.10
SHARD = 16  # samples per shard: even the 1× cache has several full shards  # "flat": the 10× cache's streaming peak within 10% of the 1× cache's


def median_run(repeats: int, job: dict) -> dict:
    """Run ``job`` ``repeats`` times in fresh subprocesses; the run with the median tree peak, plus all peaks."""
    runs = []
    for i in range(repeats):
        if job.get("out"):
            shutil.rmtree(job["out"], ignore_errors=True)
        runs.append(measure(job))
    best = sorted(runs, key=lambda x: x["tree_peak_pss_MB"])[len(runs) // 2]
    return {**best, "all_peaks_MB": [x["tree_peak_pss_MB"] for x in runs]}


def child(job: dict) -> None:
    """Run one job in this process and print its own and its children's peak RSS (MB) as JSON."""
    t0 = time.perf_counter()
    if job["kind"] == "extract":
        from cellembed.cache import ExtractConfig, extract

        extract(ExtractConfig(dataset="synthetic", out=job["cache"], encoder=job["encoder"],
                              weights=WEIGHTS.get(job["encoder"], "random"), device="cpu",
                              num_workers=job["workers"], batch_size=16, shard_size=job["shard_size"],
                              dataset_options={"n_tiles": job["tiles"], "seed": 0, "size": 256}))
    elif job["kind"] == "loop":  # fit_decoder's training loop on a stream loader with a chosen shuffle buffer
        import torch

        from cellembed.cache import make_loader
        from cellembed.decoders import build_decoder
        from cellembed.train._fit import _train_epoch, make_loss

        loader = make_loader(job["cache"], batch_size=8, memory="stream", num_workers=job["workers"],
                             shuffle_buffer=job["buffer"])
        m = loader.cache.manifest
        model = build_decoder("unetr", m["levels"], m["tile_size"], "cisca", len(m["class_names"]) - 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=len(loader))
        _train_epoch(model, loader, opt, sched, make_loss("cisca"), torch.device("cpu"), None)
    else:
        from cellembed.train import FitConfig, fit_decoder

        fit_decoder(FitConfig(out=job["out"], cache=job["cache"], memory=job["memory"], epochs=1, batch_size=8,
                              num_workers=job["workers"], device="cpu", overwrite=True))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"maxrss_MB": own, "children_maxrss_MB": kids, "seconds": time.perf_counter() - t0}))


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(job: dict) -> dict:
    """Run ``job`` in a subprocess; peak PSS of its process tree (polled) plus what the child reports."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, peak_procs = 0, 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        total = sum(pss_kb(p) for p in pids)
        if total > peak:
            peak, peak_procs = total, len(pids)
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{job['kind']} failed (exit {proc.returncode})")
    report = json.loads(out.strip().splitlines()[-1])
    return {**report, "tree_peak_pss_MB": peak / 1024, "processes_at_peak": peak_procs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=48, help="tiles of the 1× cache")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--encoder", default="efficientnet_lite0_in1k")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every job per size (median peak kept)")
    parser.add_argument("--buffer", type=int, default=16, help="shuffle buffer (samples per stream) of the extra "
                                                               "stream run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    tmp = Path(tempfile.mkdtemp(prefix="cellembed-mem-"))
    results = []
    try:
        for scale in (1, args.factor):
            n = args.tiles * scale
            cache = str(tmp / f"cache-{scale}x")
            base = {"cache": cache, "encoder": args.encoder, "workers": args.workers, "tiles": n}
            runs = []
            for _ in range(args.repeats):  # the last one's cache is kept for the fits
                shutil.rmtree(cache, ignore_errors=True)
                runs.append(measure({**base, "kind": "extract", "shard_size": SHARD}))
            r = sorted(runs, key=lambda x: x["tree_peak_pss_MB"])[len(runs) // 2]
            size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file()) / 1e6
            auto_buffer = auto_shuffle_buffer(open_cache(cache))   # the same for both sizes (per-sample bytes)
            results.append({"job": "extract", "scale": f"{scale}×", "tiles": n, "cache MB": size, **r,
                            "all_peaks_MB": [x["tree_peak_pss_MB"] for x in runs]})
            print(results[-1], flush=True)
            for memory in ("stream", "ram"):
                r = median_run(args.repeats, {**base, "kind": "fit", "memory": memory,
                                              "out": str(tmp / f"run-{scale}-{memory}")})
                results.append({"job": f"fit, memory={memory}", "scale": f"{scale}×", "tiles": n, "cache MB": size,
                                **r})
                print(results[-1], flush=True)
            r = median_run(args.repeats, {**base, "kind": "loop", "buffer": args.buffer})
            results.append({"job": f"stream, shuffle_buffer={args.buffer}", "scale": f"{scale}×", "tiles": n,
                            "cache MB": size, **r})
            print(results[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def peak(job, scale):
        return next(r["tree_peak_pss_MB"] for r in results if r["job"] == job and r["scale"] == scale)

    big = f"{args.factor}×"
    small = f"stream, shuffle_buffer={args.buffer}"
    jobs = ("extract", "fit, memory=stream", small, "fit, memory=ram")
    growth = {job: peak(job, big) / peak(job, "1×") for job in jobs}
    flat = {job: growth[job] <= MAX_GROWTH for job in jobs}
    table = [{"job": r["job"], "cache": f"{r['scale']} ({r['tiles']} tiles, {r['cache MB']:.0f} MB)",
              "peak PSS, process tree (MB)": f"{r['tree_peak_pss_MB']:.0f}",
              "peak RSS, main (MB)": f"{r['maxrss_MB']:.0f}",
              "peak RSS, largest worker (MB)": f"{r['children_maxrss_MB']:.0f}",
              "processes": r["processes_at_peak"], "seconds": f"{r['seconds']:.0f}",
              "tree peaks of all runs (MB)": " / ".join(f"{x:.0f}" for x in r["all_peaks_MB"])} for r in results]
    table += [{"job": job, "cache": f"{big} / 1×", "peak PSS, process tree (MB)": f"{g:.2f}×",
               "peak RSS, main (MB)": "", "peak RSS, largest worker (MB)": "", "processes": "", "seconds": "",
               "tree peaks of all runs (MB)": ""}
              for job, g in growth.items()]
    buffer_mb = {r["scale"]: r["cache MB"] / r["tiles"] for r in results if r["job"] == "extract"}["1×"]
    auto = auto_buffer  # noqa: F821 (set in the loop)
    description = (
        f"Encoder {args.encoder}, synthetic 256² tiles, caches of {args.tiles} and {args.tiles * args.factor} tiles "
        f"(fp16, shards of {SHARD}, {buffer_mb:.2f} MB per sample), {args.workers} DataLoader workers. Fits: "
        "`fit_decoder`, unetr + cisca, 1 epoch, batch 8, no validation; `stream, shuffle_buffer=N`: the same "
        "training loop on `make_loader(memory=\"stream\", shuffle_buffer=N)`; fit_decoder uses the default "
        f"`shuffle_buffer=\"auto\"` ({auto} samples per stream here: 64 MB of decoded samples, 16..512). Each job in a "
        "fresh subprocess; peak PSS of its whole process tree (main + "
        f"workers) polled every 50 ms; every job: the run with the median peak of {args.repeats} per size. Target: flat, "
        "i.e. the 10× cache's peak within "
        f"{MAX_GROWTH:.2f}× of the 1× peak. Extraction: {growth['extract']:.2f}× "
        f"({'flat' if flat['extract'] else 'NOT flat'}). Streaming fit with the default buffer: "
        f"{growth['fit, memory=stream']:.2f}× ({'flat' if flat['fit, memory=stream'] else 'NOT flat'}): a worker "
        "holds at most the buffer's decoded samples, so streaming memory stops growing once a stream's share of "
        f"the cache passes the buffer (here {args.tiles // max(1, args.workers)} and "
        f"{args.tiles * args.factor // max(1, args.workers)} samples per stream). With a {args.buffer}-sample buffer: "
        f"{growth[small]:.2f}× ({'flat' if flat[small] else 'NOT flat'}). Control: the ram fit, which decodes the "
        f"whole cache, {growth['fit, memory=ram']:.2f}×.")
    payload = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "child"},
               "results": results, "growth": growth, "flat": flat, "description": description}

    def plot(ax):
        for job, style in (("extract", "o-"), ("fit, memory=stream", "s-"), (small, "d-"), ("fit, memory=ram", "^--")):
            pts = [r for r in results if r["job"] == job]
            ax.plot([r["cache MB"] for r in pts], [r["tree_peak_pss_MB"] for r in pts], style, label=job)
        ax.set_xlabel("cache size (MB)")
        ax.set_ylabel("peak PSS of the process tree (MB)")
        ax.set_ylim(bottom=0)
        ax.set_title("peak memory vs cache size")
        ax.legend()

    md = write_results("memory_cpu", payload, table, plot)
    print(md.read_text())


if __name__ == "__main__":
    main()
