"""cellembed predict on whole slides: cells/s, tiles/s and peak RSS against the slide's size.

Each slide is a pyramidal TIFF (0.25 µm/px, 2 levels) made by repeating a synthetic 1024² field, so cell density is
the same at every size; each size is predicted in a fresh subprocess (peak RSS = that process's ``ru_maxrss``),
tissue detection on, regions of 1024 px (``--region``). Memory should stay flat as the slide grows: only one region's
maps, the tiles of one batch and the cells near region edges are held.

    python benchmarks/predict.py [--run RUN] [--sizes 1024 2048 4096 8192]

Without ``--run`` a quick run is trained first (packaged EfficientNet-Lite0, 32 synthetic 256² tiles, 4 epochs, 40x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks._common import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, write_results

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from cellembed.predict import PredictConfig, predict
t0 = time.perf_counter()
res = predict(PredictConfig(run=sys.argv[1], inputs=[sys.argv[2]], out=sys.argv[3], device=sys.argv[5],
                            region=int(sys.argv[6]), overwrite=True), log=lambda s: None)
info = res.images[0]
print(json.dumps({"seconds": time.perf_counter() - t0, "predict_seconds": info["seconds"], "cells": info["cells"],
                  "tiles_skipped": info["tiles_skipped"], "regions": info["regions"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def quick_run(work: Path) -> Path:
    from cellembed.cache import ExtractConfig, extract
    from cellembed.train import FitConfig, fit_decoder

    run = work / "run"
    if (run / "model.safetensors").is_file():
        return run
    extract(ExtractConfig(dataset="synthetic", out=str(work / "train"), encoder="efficientnet_lite0_in1k",
                          weights="packaged", device="cpu", num_workers=0, batch_size=16, shard_size=16,
                          dataset_options={"n_tiles": 32, "seed": 0, "size": 256}))
    return fit_decoder(FitConfig(out=str(run), cache=str(work / "train"), epochs=4, batch_size=4, device="cpu",
                                 num_workers=0, memory="ram")).run_dir


def make_slide(path: Path, side: int) -> None:
    """A side² pyramidal TIFF at 0.25 µm/px: a synthetic 1024² field repeated, the right quarter left blank
    (background for tissue detection to skip)."""
    import numpy as np
    import tifffile

    from cellembed.data._synthetic import make_synthetic_tile

    field = make_synthetic_tile(3, 0, size=1024).image
    reps = -(-side // 1024)
    image = np.tile(field, (reps, reps, 1))[:side, :side].copy()
    image[:, side - side // 4:] = 244
    opts = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolution=(4e4, 4e4),
                resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=side > 16384) as tw:
        tw.write(image, subifds=1, **opts)
        tw.write(image[::4, ::4], subfiletype=1, **opts)


def plotter(rows: list[dict]):
    def plot(ax):
        mps = [r["megapixels"] for r in rows]
        rss = [r["peak RSS MB"] for r in rows]
        ax.plot(mps, rss, "o-", label="peak RSS (MB)")
        ax.set_ylim(0, 1.15 * max(rss))
        ax.set_xscale("log")
        ax.set_xlabel("slide megapixels")
        ax.set_ylabel("peak RSS (MB)")
        ax2 = ax.twinx()
        ax2.plot(mps, [r["cells/s"] for r in rows], "s--", color="tab:orange", label="cells/s")
        ax2.set_ylim(0, 1.15 * max(r["cells/s"] for r in rows))
        ax2.set_ylabel("cells / s")
        ax.set_title("predict: memory and speed vs slide size")
        ax.legend(loc="lower left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)

    return plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a 40x cisca run (default: train a quick one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--region", type=int, default=1024,
                        help="predict's --region (smaller than the default 2048, so that memory is seen flat over "
                             "several multi-region sizes)")
    parser.add_argument("--name", default=None, help="results name (default predict_<cpu|gpu>)")
    parser.add_argument("--replot", default=None, metavar="JSON", help="redraw the table and figure of a results JSON")
    args = parser.parse_args()
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        print(write_results(Path(args.replot).stem, payload, payload["rows"], plotter(payload["rows"])).read_text())
        return
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cellembed-predict-"))
    run = Path(args.run) if args.run else quick_run(work)
    rows = []
    for side in args.sizes:
        slide = work / f"slide{side}.tif"
        make_slide(slide, side)
        out = subprocess.run([sys.executable, "-c", CHILD, str(run), str(slide), str(work / f"out{side}"),
                              str(args.threads), args.device, str(args.region)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"predict on the {side}² slide failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mp = side * side / 1e6
        rows.append({"slide": f"{side}²", "megapixels": round(mp, 2), "regions": r["regions"],
                     "tiles skipped (background)": r["tiles_skipped"], "cells": r["cells"],
                     "predict s": round(r["predict_seconds"], 1),
                     "cells/s": round(r["cells"] / r["predict_seconds"], 1),
                     "megapixels/min": round(60 * mp / r["predict_seconds"], 2),
                     "peak RSS MB": round(r["peak_rss_mb"])})
        print(rows[-1], flush=True)
    info = machine()
    gpu = info.get("gpu")
    name = args.name or ("predict_gpu" if gpu and args.device != "cpu" else "predict_cpu")
    description = (
        f"`cellembed predict` on synthetic pyramidal TIFF slides at 0.25 µm/px (a synthetic 1024² field repeated, the "
        f"right quarter blank), run `{run.name}` ({'given' if args.run else 'a quick synthetic run'}), "
        f"{args.threads} torch threads, device {args.device}, tissue detection on, region {args.region} px. Each size in a "
        "fresh process: 'peak RSS' is its maximum resident memory (Python, torch, the encoder and decoder included); "
        "'predict s' covers reading, encoder, decoder, blending, post-processing and writing GeoJSON / CSV / overlay.")

    plot = plotter(rows)
    payload = {"machine": info, "args": vars(args), "rows": rows, "description": description,
               "seconds": round(time.perf_counter() - t0, 1)}
    print(write_results(name, payload, rows, plot).read_text())


if __name__ == "__main__":
    main()
