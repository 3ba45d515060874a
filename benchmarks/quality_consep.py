"""Accuracy on real data (CoNSeP): pretrained vs random encoder weights, and cache (no / dihedral augmentation) vs live.

Data: the CoNSeP 256² tiles of ``../shared/realdata/consep_tiles256`` (or ``$CELLEMBED_REALDATA``), train images
only (432 tiles from 27 source images of 1000²), split *by source image* with the library's ``cisca`` scheme
(tiles grouped by ``group_regex='(.+)_\\d+$'``, seeded): 18 images (288 tiles) train, 3 (48) validation, 6 (96)
test. Tiles of one image overlap, so no image straddles two splits.

Every variant trains the unetr decoder with CISCA heads through ``fit_decoder`` for the same epochs, batch size,
learning rate and seed, validates every epoch on the validation cache (best checkpoint by validation PQ), and is
scored on the test cache with ``score_run`` (PQ, mPQ+, AJI; CoNSeP's 4 classes):

* ``pretrained, cache, none``: EfficientNet-Lite0 with its packaged ImageNet weights, features cached, no
  augmentation (the paper's cache protocol);
* ``random, cache, none``: the same architecture with random weights;
* ``pretrained, cache, dihedral``: feature-space flips / quarter turns of the cached levels (targets recomputed);
* ``pretrained, live, full``: the encoder in the loop with CISCA's full image-space augmentation.

Wall time per variant is the fit (training + validation every epoch) plus, for cache variants, the extraction of
the train and validation caches (shared by the two pretrained cache variants, counted for each). Skips cleanly
(exit 0) when the data are absent.

    python benchmarks/quality_consep.py [--epochs 10] [--lr 3e-3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks._common import REALDATA, machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import REALDATA, machine, write_results

ENCODER = "efficientnet_lite0_in1k"
GROUPS = r"(.+)_\d+$"
VARIANTS = {  # name: (weights, source, augment)
    "pretrained, cache, none": ("packaged", "cache", "none"),
    "random, cache, none": ("random", "cache", "none"),
    "pretrained, cache, dihedral": ("packaged", "cache", "dihedral"),
    "pretrained, live, full": ("packaged", "live", "full"),
}


def extract_splits(root: Path, weights: str, tmp: Path, workers: int) -> tuple[dict, float]:
    """Train / val / test caches of one encoder weighting; returns their paths and the train + val seconds."""
    from cellembed.cache import ExtractConfig, extract

    paths, seconds = {}, 0.0
    for split in ("train", "val", "test"):
        out = tmp / f"{weights}-{split}"
        res = extract(ExtractConfig(dataset="folder", root=str(root), out=str(out), encoder=ENCODER, weights=weights,
                                    split=split, scheme="cisca", device="cpu", num_workers=workers, batch_size=32,
                                    shard_size=64, dataset_options={"group_regex": GROUPS}))
        paths[split] = str(out)
        if split != "test":
            seconds += res.seconds
    return paths, seconds


def run_variant(name: str, caches: dict, root: Path, args, tmp: Path) -> dict:
    from cellembed.evaluate import score_run
    from cellembed.train import FitConfig, fit_decoder

    weights, source, augment = VARIANTS[name]
    c = caches[weights]
    common = {"out": str(tmp / f"run-{name.replace(', ', '-')}"), "val_cache": c["val"], "decoder": "unetr",
              "head": "cisca", "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "augment": augment, "seed": 0, "device": "cpu", "num_workers": args.workers, "best_metric": "pq",
              "overwrite": True}
    if source == "cache":
        cfg = FitConfig(cache=c["train"], source="cache", memory="ram", **common)
    else:
        cfg = FitConfig(source="live", dataset="folder", root=str(root), split="train", encoder=ENCODER,
                        weights=weights, dataset_options={"group_regex": GROUPS}, **common)
    stamps = [time.perf_counter()]

    def on_epoch(e: int, n: int, m: dict) -> None:
        stamps.append(time.perf_counter())
        print(f"  [{name}] epoch {e}/{n} loss {m['train_loss']:.3f} val PQ {m.get('val_pq')}", flush=True)

    fit = fit_decoder(cfg, on_epoch=on_epoch)
    # an epoch's wall time minus its training part: validation, checkpoints, metrics line
    val_seconds = [b - a - h["train_seconds"] for a, b, h in zip(stamps, stamps[1:], fit.history)]
    score = score_run(fit.run_dir, c["test"], device="cpu", num_workers=args.workers, n_overlays=0, overwrite=True)
    s = score.metrics["summary"]
    extract_s = c["seconds"] if source == "cache" else 0.0
    return {"variant": name, "weights": weights, "source": source, "augment": augment,
            "pq": s["pq"], "mpq_plus": s["mpq_plus"], "aji": s["aji"], "best_epoch": fit.best["epoch"],
            "best_val_pq": fit.best["value"], "fit_seconds": fit.seconds, "extract_seconds": extract_s,
            "score_seconds": score.seconds, "epoch_seconds": [h["train_seconds"] for h in fit.history],
            "val_seconds": val_seconds,
            "history": fit.history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3, help="OneCycle peak (the library default 1e-4 is for "
                                                                "100-epoch runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--name", default="quality_consep_cpu")
    args = parser.parse_args()
    root = REALDATA / "consep_tiles256"
    if not (root / "labels.npz").is_file():
        print(f"quality_consep: no CoNSeP tiles at {root} (set CELLEMBED_REALDATA); skipped.")
        sys.exit(0)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="cellembed-consep-"))
    try:
        caches = {}
        for weights in sorted({VARIANTS[v][0] for v in args.variants}):
            paths, seconds = extract_splits(root, weights, tmp, args.workers)
            caches[weights] = {**paths, "seconds": seconds}
            print(f"extracted {weights} caches in {seconds:.0f} s (train + val)", flush=True)
        rows = [run_variant(name, caches, root, args, tmp) for name in args.variants]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = [{"variant": r["variant"], "PQ": f"{r['pq']:.3f}", "mPQ+": f"{r['mpq_plus']:.3f}",
              "AJI": f"{r['aji']:.3f}", "best epoch (val PQ)": f"{r['best_epoch']} ({r['best_val_pq']:.3f})",
              "median epoch s (train)": f"{statistics.median(r['epoch_seconds']):.1f}",
              "median validation s": f"{statistics.median(r['val_seconds']):.1f}",
              "fit s (train + val)": f"{r['fit_seconds']:.0f}", "extract s (train + val)": f"{r['extract_seconds']:.0f}",
              "total s": f"{r['fit_seconds'] + r['extract_seconds']:.0f}"} for r in rows]
    description = (
        f"CoNSeP train images only (432 tiles of 256², 27 source images), split by source image with the `cisca` "
        f"scheme (group_regex `{GROUPS}`): 288 train / 48 validation / 96 test tiles (18 / 3 / 6 images). Encoder "
        f"{ENCODER} (224² input, default stages); decoder unetr with CISCA heads, Mind-the-Gap loss; "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW + OneCycle to a peak lr of {args.lr:g} (short runs "
        "need a higher peak than the 100-epoch default of 1e-4), seed 0; validation every epoch, best checkpoint by "
        "validation PQ, scored on the test split (40x post-processing defaults). Cache runs read from RAM. Wall "
        f"times on this CPU ({torch.get_num_threads()} torch threads, {args.workers} workers); 'total' adds the "
        "extraction of the train and validation caches to cache variants. One seed: differences of a few PQ "
        "points are within run-to-run noise at this size.")
    payload = {"machine": machine(), "args": vars(args), "rows": rows, "seconds": time.perf_counter() - t0,
               "description": description}

    def plot(ax):
        for i, r in enumerate(rows):
            ax.plot([h["epoch"] for h in r["history"]], [h.get("val_pq") or 0 for h in r["history"]],
                    marker="o", color=f"C{i}", label=f"{r['variant']} (test PQ {r['pq']:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation PQ")
        ax.set_title("CoNSeP, EfficientNet-Lite0 + unetr/CISCA")
        ax.legend(fontsize=7)

    md = write_results(args.name, payload, table, plot)
    print(md.read_text())


if __name__ == "__main__":
    main()
