"""Candidate changes measured on top of fit-decoder's defaults on real CoNSeP tiles (kept or dropped).

``ablation_consep.py`` records the changes that were *kept* (each step adds one to the step above). This script
records the ones tried after that, each as a single change on top of the current defaults, so that a dropped
idea leaves its evidence too. Same data, split, encoder and defaults as ``quality_consep.py`` ("pretrained,
cache, dihedral"): CoNSeP train images only, split by source image (288 / 48 / 96 tiles), frozen packaged
EfficientNet-Lite0, cached features, 20 epochs, best epoch by validation PQ, minimum area tuned on validation,
scored on the test split.

Screening: ``--stop-after E`` stops a candidate after E of its 20 epochs (the OneCycle schedule is the 20-epoch
one, so its train loss and validation PQ at epoch E compare with the defaults' at the same epoch). Rows are
appended to ``results/candidates_consep_cpu.jsonl``; the markdown / PNG are rebuilt from every row there.

    python benchmarks/candidates_consep.py --candidates "full-resolution width 32" [--stop-after 10] [--threads 1]
    python benchmarks/candidates_consep.py --import-run "defaults" RUN_DIR   # a finished or stopped run's history
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks._common import REALDATA, RESULTS, machine, write_results
    from benchmarks.quality_consep import extract_splits
except ImportError:  # run as a script from the benchmarks folder
    from _common import REALDATA, RESULTS, machine, write_results
    from quality_consep import extract_splits

ENCODER = "efficientnet_lite0_in1k"
NAME = "candidates_consep_cpu"
JSONL = RESULTS / f"{NAME}.jsonl"


@contextlib.contextmanager
def _input_scale(factor: int):
    """The encoder sees the tile resized by ``factor`` (EfficientNet-Lite0 at 512 px: grids 128/64/32/16)."""
    import cellembed.encoders._build as build

    original = build.input_hw_for
    build.input_hw_for = lambda spec, policy, tile: tuple(factor * s for s in original(spec, policy, tile))
    try:
        yield
    finally:
        build.input_hw_for = original


@contextlib.contextmanager
def _dice_without_background():
    """The 3-class Dice term averaged over boundary and body only (CISCA's choice), not all three classes."""
    import cellembed.train.losses as losses

    dice, mindthegap = losses.dice_loss, losses._mindthegap

    def patched(outputs, targets, msge=False):
        losses.dice_loss = lambda p, o, smooth=1.0: dice(p, o, smooth)[:2]
        try:
            return mindthegap(outputs, targets, msge)
        finally:
            losses.dice_loss = dice

    losses._mindthegap = patched
    try:
        yield
    finally:
        losses._mindthegap = mindthegap


@contextlib.contextmanager
def _decoder_width(factor: int):
    """Every unetr level twice as wide (64, 128, 256, 512 channels); use with full_channels=32."""
    import cellembed.decoders._unetr as unetr

    channels = unetr.CHANNELS
    unetr.CHANNELS = tuple(factor * c for c in channels)
    try:
        yield
    finally:
        unetr.CHANNELS = channels


@contextlib.contextmanager
def _all_views():
    """Serve every view of a cache with augmented views each epoch (the loader's default serves one per tile)."""
    import cellembed.cache._loader as loader

    views = loader.cache_views
    loader.cache_views = lambda cache: 1
    try:
        yield
    finally:
        loader.cache_views = views


TYPE_BRANCH = "types from a half-resolution branch (--type-branch)"
FULL_SHUFFLE = "whole-split shuffle (--shuffle-buffer 288)"
VIEWS_ONE = "4 augmented views per tile (extract --augment-views 4), one per epoch"
VIEWS_ALL_4 = "4 augmented views per tile, all 5 served every epoch, 4 epochs (20 tile epochs)"
VIEWS_ALL_8 = "4 augmented views per tile, all 5 served every epoch, 8 epochs (40 tile epochs)"
VIEWS_40 = "4 augmented views per tile, one per epoch, 40 epochs"
MAG_20X = "20x targets and post-processing (--magnification 20x)"
EPOCHS_60 = "60 epochs (the 1-hour budget of 2 cores)"
AFTER_TYPE_BRANCH = ("two 3×3 blocks per decoder level (--level-depth 2)",
                     "separate full-resolution stacks per map (--split-trunks)",
                     "all seven stage ends cached (blocks 0,2,4,7,10,14,15)",
                     "live encoder + full image-space augmentation",
                     VIEWS_ONE, VIEWS_ALL_4, VIEWS_ALL_8, FULL_SHUFFLE, VIEWS_40, MAG_20X, EPOCHS_60)
"""Candidates tried once the type branch was the default: their baseline is the type-branch runs."""


def baseline(name: str) -> str:
    """The candidate whose runs ``name`` is compared with (the defaults of the day it was tried)."""
    return TYPE_BRANCH if name in AFTER_TYPE_BRANCH else "defaults"


CANDIDATES = {  # name: (fit options, extraction options, context manager factory or None)
    "defaults": ({}, {}, None),
    "encoder input x2 (512 px)": ({}, {"scale": 2}, lambda: _input_scale(2)),
    "image branch at 1/4 too (--image-levels 3)": ({"image_levels": 3}, {}, None),
    "full-resolution width 32 (--full-channels 32)": ({"full_channels": 32}, {}, None),
    "Dice on boundary + body only": ({}, {}, _dice_without_background),
    "decoder x2 wide + full width 32": ({"full_channels": 32}, {}, lambda: _decoder_width(2)),
    "random encoder weights (control)": ({}, {"weights": "random"}, None),
    "types from a half-resolution branch (--type-branch)": ({"type_branch": True}, {}, None),
    # on top of the defaults with the type branch (its default since then): compared with that candidate's seeds
    "two 3×3 blocks per decoder level (--level-depth 2)": ({"level_depth": 2}, {}, None),
    "separate full-resolution stacks per map (--split-trunks)": ({"split_trunks": True}, {}, None),
    "all seven stage ends cached (blocks 0,2,4,7,10,14,15)": ({}, {"blocks": "0,2,4,7,10,14,15"}, None),
    "live encoder + full image-space augmentation": ({"source": "live", "augment": "full"}, {}, None),
    VIEWS_ONE: ({}, {"views": 4}, None),
    FULL_SHUFFLE: ({"shuffle_buffer": 288}, {}, None),  # the auto buffer holds 74 of the 288 training tiles
    VIEWS_ALL_4: ({"epochs": 4}, {"views": 4}, _all_views),
    VIEWS_ALL_8: ({"epochs": 8}, {"views": 4}, _all_views),
    VIEWS_40: ({"epochs": 40}, {"views": 4}, None),
    # CoNSeP's nuclei are 15 px across (median), MoNuSeg's 23 px at the same stated 40x: CISCA's 20x targets
    # (1 px boundaries) and post-processing (24 px base minimum area) may fit them better
    MAG_20X: ({"magnification": "20x"}, {}, None),
    # 20 epochs take ~12 min alone on 2 cores: does the rest of the hour buy PQ? (training PQ 0.459 -> 0.534)
    EPOCHS_60: ({"epochs": 60}, {}, None),
}


def caches(root: Path, tmp: Path, weights: str = "packaged", scale: int = 1, blocks: str = "default",
           views: int = 0) -> dict:
    """Train / val / test caches as ``quality_consep.py`` extracts them (resumed when already there)."""
    folder = tmp / (f"x{scale}" if blocks == "default" else f"x{scale}-blocks-{blocks.replace(',', '-')}")
    with _input_scale(scale) if scale != 1 else contextlib.nullcontext():
        return extract_splits(root, weights, folder, workers=2, blocks=blocks, views=views)[0]


class _Stop(Exception):
    pass


def run_candidate(name: str, root: Path, tmp: Path, seed: int, stop_after: int | None, threads: int) -> dict:
    from cellembed.evaluate import score_run
    from cellembed.train import FitConfig, fit_decoder

    fit_options, extract_options, hook = CANDIDATES[name]
    c = caches(root, tmp, **extract_options)
    run = tmp / f"run-{len(name)}-{abs(hash(name)) % 10 ** 6}-{seed}"
    if fit_options.get("source") == "live":  # the encoder in the loop on the same training tiles
        try:
            from benchmarks.quality_consep import ENCODER as enc, GROUPS
        except ImportError:
            from quality_consep import ENCODER as enc, GROUPS
        fit_options = {**fit_options, "dataset": "folder", "root": str(root), "split": "train", "encoder": enc,
                       "weights": extract_options.get("weights", "packaged"),
                       "dataset_options": {"group_regex": GROUPS}}
        config = FitConfig(out=str(run), val_cache=c["val"], seed=seed, device="cpu", num_workers=1, overwrite=True,
                           **fit_options)
    else:
        config = FitConfig(out=str(run), cache=c["train"], val_cache=c["val"], seed=seed, device="cpu",
                           num_workers=1, memory="ram", overwrite=True, **fit_options)
    history: list[dict] = []

    def on_epoch(e: int, n: int, m: dict) -> None:
        history.append(m)
        print(f"  [{name}] epoch {e}/{n} loss {m['train_loss']:.3f} val PQ {m.get('val_pq'):.3f}", flush=True)
        if stop_after and e >= stop_after and e < n:
            raise _Stop

    t0 = time.perf_counter()
    test = None
    with hook() if hook else contextlib.nullcontext():
        try:
            fit = fit_decoder(config, on_epoch=on_epoch)
            s = score_run(fit.run_dir, c["test"], device="cpu", num_workers=1, n_overlays=0, overwrite=True)
            test = {k: s.metrics["summary"][k] for k in ("pq", "dq", "sq", "mpq_plus", "aji")}
            test["best_epoch"] = fit.best["epoch"]
            test["parameters"] = fit.n_params
        except _Stop:
            pass
    return {"candidate": name, "seed": seed, "fit_options": fit_options, "extract_options": extract_options,
            "epochs": config.epochs, "threads": threads, "history": history, "test": test,
            "seconds": time.perf_counter() - t0, "source": "benchmarks/candidates_consep.py"}


def import_run(name: str, run: Path, threads: int) -> dict:
    """A row from a run directory's ``metrics.jsonl`` (and its test score when ``score-*-test`` exists)."""
    record = json.loads((run / "config.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    test = None
    scores = sorted(run.glob("score-*test*/metrics.json"))
    if scores and len(history) == record["config"]["epochs"]:
        s = json.loads(scores[0].read_text())["summary"]
        best = max(history, key=lambda h: h["val_pq"])
        test = {**{k: s[k] for k in ("pq", "dq", "sq", "mpq_plus", "aji")}, "best_epoch": best["epoch"],
                "parameters": record["decoder"]["trainable_parameters"]}
    fit_options, extract_options, _ = CANDIDATES[name]
    return {"candidate": name, "seed": record["config"]["seed"], "fit_options": fit_options,
            "extract_options": extract_options, "epochs": record["config"]["epochs"], "threads": threads,
            "history": history, "test": test, "seconds": None, "source": f"imported from {run.name}"}


def _at(history: list[dict], epoch: int, key: str) -> float | None:
    return next((h[key] for h in history if h["epoch"] == epoch), None)


def render(rows: list[dict]) -> None:
    table = []
    for r in rows:
        base = [b for b in rows if b["candidate"] == baseline(r["candidate"]) and b is not r]
        if r["candidate"] == baseline(r["candidate"]):
            base = [b for b in rows if b["candidate"] == r["candidate"]]
        last = r["history"][-1]["epoch"] if r["history"] else 0
        if r["epochs"] != 20:  # another schedule: its epoch e is not the defaults' epoch e
            base = []
        ref_loss = [_at(b["history"], last, "train_loss") for b in base]
        ref_pq = [_at(b["history"], last, "val_pq") for b in base]
        ref_loss, ref_pq = [v for v in ref_loss if v is not None], [v for v in ref_pq if v is not None]
        same = lambda refs: ", ".join(f"{v:.3f}" for v in refs) if refs else "other schedule"
        t = r["test"]
        secs = sorted(h["train_seconds"] for h in r["history"])
        table.append({
            "candidate": r["candidate"], "seed": r["seed"], "epochs run": f"{last} / {r['epochs']}",
            "train loss at that epoch (defaults)": f"{_at(r['history'], last, 'train_loss'):.3f} ({same(ref_loss)})"
                                                   if last else "n/a",
            "val PQ at that epoch (defaults)": f"{_at(r['history'], last, 'val_pq'):.3f} ({same(ref_pq)})"
                                               if last else "n/a",
            "best val PQ": f"{max(h['val_pq'] for h in r['history']):.3f}" if last else "n/a",
            "test PQ": f"{t['pq']:.3f}" if t else "stopped", "test mPQ+": f"{t['mpq_plus']:.3f}" if t else "",
            "test SQ": f"{t['sq']:.3f}" if t else "", "test DQ": f"{t['dq']:.3f}" if t else "",
            "median s / epoch (threads)": f"{secs[len(secs) // 2]:.0f} ({r['threads']})" if secs else "n/a"})
    description = (
        "Each candidate is one change on top of fit-decoder's defaults (quality_consep.py's 'pretrained, cache, "
        "dihedral': CoNSeP train images only, split by source image 288 / 48 / 96 tiles, frozen packaged "
        f"{ENCODER}, cached features, 20-epoch OneCycle schedule, best epoch by validation PQ, minimum area "
        "tuned on validation, test split). 'epochs run' < 20: the candidate was stopped there (screening); its "
        "train loss and validation PQ compare with the defaults' runs at the same epoch of the same schedule "
        "(in brackets, one value per seed of the defaults). Candidates tried after the type branch became the "
        f"default ({', '.join(AFTER_TYPE_BRANCH)}) compare with the type-branch runs instead (its seeds 1 and 2 "
        "are quality_consep.py's). Rows with another number of epochs (the augmented views served all at once, "
        "each epoch 5 passes over the tiles) have no same-epoch comparison; in them a tile's 5 views sit side by "
        "side in a shard, so with the 74-sample shuffle buffer a batch often holds two views of one tile (the "
        "loader's default, one view per tile per epoch, avoids that). A live run's train loss is measured on augmented tiles. Seconds per epoch depend on the threads and on "
        "what else ran on the 2 cores (candidates were screened two at a time with 1 thread each), so compare "
        "the decoder step in cache_vs_live.py instead.")

    def plot(ax):
        for r in rows:
            if r["history"]:
                style = "k-" if r["candidate"] == "defaults" else ".-"
                ax.plot([h["epoch"] for h in r["history"]], [h["val_pq"] for h in r["history"]], style,
                        label=f"{r['candidate']} (s{r['seed']})", lw=1.5 if style == "k-" else 1)
        ax.set_xlabel("epoch (of 20)")
        ax.set_ylabel("validation PQ")
        ax.set_title("CoNSeP: candidates on top of the defaults")
        ax.legend(fontsize=6)

    write_results(NAME, {"machine": machine(), "rows": rows, "description": description}, table, plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="*", default=[], choices=list(CANDIDATES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=None, help="stop each candidate after this epoch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--keep", default=None, help="work folder to keep (caches, runs)")
    parser.add_argument("--import-run", nargs=2, metavar=("CANDIDATE", "RUN_DIR"), action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = REALDATA / "consep_tiles256"
    new = [import_run(name, Path(path), args.threads) for name, path in args.import_run]
    if args.candidates and not (root / "labels.npz").is_file():
        print(f"candidates_consep: no CoNSeP tiles at {root} (set CELLEMBED_REALDATA); skipped.")
        sys.exit(0)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cellembed-candidates-"))
    for name in args.candidates:
        new.append(run_candidate(name, root, tmp, args.seed, args.stop_after, args.threads))
    if new:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with JSONL.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
    rows = [json.loads(line) for line in JSONL.read_text().splitlines()] if JSONL.is_file() else []
    render(rows)
    print(f"{len(rows)} rows -> {RESULTS / NAME}.md")


if __name__ == "__main__":
    main()
