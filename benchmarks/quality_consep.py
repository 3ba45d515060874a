"""Accuracy on real data (CoNSeP): pretrained vs random encoder weights, and cache (no / dihedral augmentation) vs live.

Data: the CoNSeP 256² tiles of ``../shared/realdata/consep_tiles256`` (or ``$CELLEMBED_REALDATA``), train images
only (432 tiles from 27 source images of 1000²), split *by source image* with the library's ``cisca`` scheme
(tiles grouped by ``group_regex='(.+)_\\d+$'``, seeded): 18 images (288 tiles) train, 3 (48) validation, 6 (96)
test. Tiles of one image overlap, so no image straddles two splits.

Every variant trains with ``fit_decoder``'s defaults (the point of the benchmark: a user who runs
``cellembed fit-decoder`` without tuning options gets these numbers), one run per seed, validates every epoch on
the validation cache (best checkpoint by validation PQ, then the minimum area tuned on validation), and is scored
on the test cache with ``score_run`` (PQ, mPQ+, AJI; CoNSeP's 4 classes); cells are mean ± sd over the seeds:

* ``pretrained, cache, dihedral``: EfficientNet-Lite0 with its packaged ImageNet weights, features cached,
  feature-space flips / quarter turns of the cached levels (targets recomputed);
* ``pretrained, live, full``: the encoder in the loop with CISCA's full image-space augmentation (what caching
  gives up);
* ``pretrained, cache, none``: no augmentation (the paper's cache protocol);
* ``random, cache, dihedral``: the same architecture with random weights.

Wall time per variant is the fit (training + validation every epoch) plus, for cache variants, the extraction of
the train and validation caches (shared by the two pretrained cache variants, counted for each). Skips cleanly
(exit 0) when the data are absent.

    python benchmarks/quality_consep.py [--seeds 0 1 2] [--variants ...] [--epochs E] [--lr LR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks._common import REALDATA, RESULTS, machine, write_results
    from benchmarks._diagnose import oracle_swaps, overlay_grid, per_source_image
    from benchmarks.ablation_consep import settings as ablation_settings
except ImportError:  # run as a script from the benchmarks folder
    from _common import REALDATA, RESULTS, machine, write_results
    from _diagnose import oracle_swaps, overlay_grid, per_source_image
    from ablation_consep import settings as ablation_settings

ENCODER = "efficientnet_lite0_in1k"
ABLATED = "pretrained, cache, dihedral"
"""Its first seed's run adds steps 5 and 6 to ``ablation_consep.py``'s table (untuned, then tuned)."""
GROUPS = r"(.+)_\d+$"
VIEWS = 4
"""Augmented copies per training tile of the 'cache + views' variant (``extract --augment-views``)."""
VARIANTS = {  # name: (weights, source, augment, augmented views of the training cache)
    "pretrained, cache, dihedral": ("packaged", "cache", "dihedral", 0),
    "pretrained, cache + views, dihedral": ("packaged", "cache", "dihedral", VIEWS),
    "pretrained, live, full": ("packaged", "live", "full", 0),
    "pretrained, cache, none": ("packaged", "cache", "none", 0),
    "random, cache, dihedral": ("random", "cache", "dihedral", 0),
}


def run_name(variant: str, seed: int) -> str:
    """``run-pretrained-cache-dihedral-0``, ``run-pretrained-cache+views-dihedral-0``, ..."""
    return f"run-{variant.replace(', ', '-').replace(' + ', '+')}-{seed}"


def cache_name(weights: str, views: int) -> str:
    return weights if not views else f"{weights}+views{views}"


def extract_folder(root: Path, out: Path | str, weights: str, workers: int, **options):
    """``extract`` of a folder dataset with this benchmark's encoder and settings (CPU, batch 32, 64-tile shards);
    ``options``: further ``ExtractConfig`` fields (split, scheme, blocks, augment_views, ...)."""
    from cellembed.cache import ExtractConfig, extract

    return extract(ExtractConfig(dataset="folder", root=str(root), out=str(out), encoder=ENCODER, weights=weights,
                                 device="cpu", num_workers=workers, batch_size=32, shard_size=64, **options))


def extract_splits(root: Path, weights: str, tmp: Path, workers: int, blocks: str = "default",
                   views: int = 0) -> tuple[dict, float]:
    """Train / val / test caches of one encoder weighting (and block selection; ``views`` augmented copies of every
    training tile); returns their paths and the train + val seconds."""
    paths, seconds = {}, 0.0
    for split in ("train", "val", "test"):
        out = tmp / (f"{weights}-{split}" if split != "train" or not views else f"{weights}-{split}-views{views}")
        res = extract_folder(root, out, weights, workers, split=split, scheme="cisca", blocks=blocks,
                             dataset_options={"group_regex": GROUPS}, augment_views=views if split == "train" else 0)
        paths[split] = str(out)
        if split != "test":
            seconds += res.seconds
    return paths, seconds


def run_variant(name: str, caches: dict, root: Path, args, tmp: Path, seed: int) -> dict:
    from cellembed.evaluate import score_run
    from cellembed.evaluate._run import load_run
    from cellembed.train import FitConfig, fit_decoder
    from cellembed.train._fit import _tune_min_area

    weights, source, augment, views = VARIANTS[name]
    c = caches[cache_name(weights, views)]
    # every fit option not named here is fit-decoder's default (the point: defaults that converge)
    common = {"out": str(tmp / run_name(name, seed)), "val_cache": c["val"], "augment": augment,
              "seed": seed, "device": "cpu", "num_workers": args.workers, "overwrite": True,
              **{k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size))
                 if v is not None}}
    # tune=False here and the same tuning as fit-decoder's default right after, so the table can show both
    common["tune"] = False
    if source == "cache":
        cfg = FitConfig(cache=c["train"], source="cache", memory="ram", **common)
    else:
        cfg = FitConfig(source="live", dataset="folder", root=str(root), split="train", encoder=ENCODER,
                        weights=weights, dataset_options={"group_regex": GROUPS}, **common)
    stamps = [time.perf_counter()]

    def on_epoch(e: int, n: int, m: dict) -> None:
        stamps.append(time.perf_counter())
        print(f"  [{name} seed {seed}] epoch {e}/{n} loss {m['train_loss']:.3f} val PQ {m.get('val_pq'):.3f}",
              flush=True)

    fit = fit_decoder(cfg, on_epoch=on_epoch)
    # an epoch's wall time minus its training part: validation, checkpoints, metrics line
    val_seconds = [b - a - h["train_seconds"] for a, b, h in zip(stamps, stamps[1:], fit.history)]
    untuned = score_run(fit.run_dir, c["test"], device="cpu", num_workers=args.workers, n_overlays=0, overwrite=True)
    ablation = []
    if name == ABLATED and seed == args.seeds[0]:
        ablation.append(_ablation_row("5 dihedral augmentation of the cache", cfg, fit, untuned, c["test"]))
    _tune_min_area(dataclasses.replace(cfg, tune=True), fit.run_dir, load_run(fit.run_dir).post)  # fit's default
    score = score_run(fit.run_dir, c["test"], device="cpu", num_workers=args.workers, n_overlays=0, overwrite=True)
    if ablation:
        ablation.append(_ablation_row("6 minimum area tuned on validation", cfg, fit, score, c["test"]))
        overlay_grid(fit.run_dir, c["test"], RESULTS / "overlays_consep_cpu.png")
        with (RESULTS / "ablation_consep_cpu.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in ablation)
    s = score.metrics["summary"]
    extract_s = c["seconds"] if source == "cache" else 0.0
    tuned = json.loads((fit.run_dir / "config.json").read_text())["postprocess"]["min_area"]
    return {"variant": name, "seed": seed, "weights": weights, "source": source, "augment": augment, "views": views,
            "config": {k: getattr(cfg, k) for k in ("epochs", "lr", "batch_size", "loss", "refine", "image_skip")},
            "pq": s["pq"], "mpq_plus": s["mpq_plus"], "aji": s["aji"], "dq": s["dq"], "sq": s["sq"],
            "pq_untuned": untuned.metrics["summary"]["pq"], "mpq_plus_untuned": untuned.metrics["summary"]["mpq_plus"],
            "best_epoch": fit.best["epoch"], "best_val_pq": fit.best["value"], "min_area": tuned,
            "fit_seconds": fit.seconds, "extract_seconds": extract_s,
            "score_seconds": score.seconds, "epoch_seconds": [h["train_seconds"] for h in fit.history],
            "val_seconds": val_seconds, "history": fit.history, "per_image": per_source_image(score.out, GROUPS)}


def _ablation_row(step: str, cfg, fit, score, test: str) -> dict:
    """A row of ``ablation_consep.py``'s table for this run (same data, split and settings as its steps)."""
    from cellembed.encoders import get_spec
    from cellembed.encoders._build import resolve_input_policy
    from cellembed.train._fit import _image_skip

    settings = ablation_settings(step)
    actual = {**{k: getattr(cfg, k) for k in settings if hasattr(cfg, k)}, "image_skip": _image_skip(cfg),
              "tune": settings["tune"],  # applied after the fit, as step 6 of the ablation does
              "input_policy": resolve_input_policy(get_spec(ENCODER), "auto")}  # the caches' (extract's default)
    if any(actual[k] != settings[k] for k in actual):  # the ablation's step must be what this run trained
        raise RuntimeError(f"{step}: this run's settings {actual} are not the ablation's {settings}")
    m = score.metrics["summary"]
    return {"step": step, "seed": cfg.seed, "settings": settings, "pq": m["pq"], "dq": m["dq"], "sq": m["sq"],
            "mpq_plus": m["mpq_plus"], "aji": m["aji"], "best_epoch": fit.best["epoch"], "fit_seconds": fit.seconds,
            "epoch_seconds": sorted(h["train_seconds"] for h in fit.history)[len(fit.history) // 2],
            "parameters": fit.n_params, "swaps": oracle_swaps(fit.run_dir, test), "history": fit.history,
            "source": "benchmarks/quality_consep.py, pretrained, cache, dihedral, first seed"}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    from cellembed.train import FitConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: fit-decoder's")
    parser.add_argument("--lr", type=float, default=None, help="OneCycle peak; default: fit-decoder's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: fit-decoder's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--name", default="quality_consep_cpu")
    parser.add_argument("--keep", default=None, help="work folder to keep (caches, runs) instead of a temporary one")
    parser.add_argument("--collect", default=None, help="report the finished runs of an interrupted invocation's "
                                                        "--keep folder (or the cellembed-consep-* temporary folder "
                                                        "of a killed one) without training")
    parser.add_argument("--collect-note", default="", help="with --collect: how the collected runs were trained "
                                                           "(threads, what shared the cores), for the description")
    parser.add_argument("--final", default=None, choices=list(VARIANTS),
                        help="train this variant on all 27 CoNSeP images and score it on MoNuSeg tiles instead")
    parser.add_argument("--heldout", nargs="+", default=None, metavar="[LABEL=]RUN",
                        help="score finished runs of this protocol on the MoNuSeg tiles instead of training")
    args = parser.parse_args()
    root = REALDATA / "consep_tiles256"
    if not (root / "labels.npz").is_file():
        print(f"quality_consep: no CoNSeP tiles at {root} (set CELLEMBED_REALDATA); skipped.")
        sys.exit(0)
    t0 = time.perf_counter()
    if args.collect:
        report(collect_rows(Path(args.collect), args), args, t0)
        return
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cellembed-consep-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if args.final or args.heldout:
        try:
            heldout_report(final_models(root, args, tmp) if args.final else heldout_runs(args, tmp), args, t0)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        caches = {}
        for weights, views in sorted({(VARIANTS[v][0], VARIANTS[v][3]) for v in args.variants}):
            paths, seconds = extract_splits(root, weights, tmp, args.workers, views=views)
            caches[cache_name(weights, views)] = {**paths, "seconds": seconds}
            print(f"extracted {cache_name(weights, views)} caches in {seconds:.0f} s (train + val)", flush=True)
        rows = [run_variant(name, caches, root, args, tmp, seed) for name in args.variants for seed in args.seeds]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args, t0)


MONUSEG_TILE = 256
MONUSEG_OFFSETS = (0, 248, 496, 744)
"""Top-left corners of the 4 × 4 tiles of 256² cut from each 1000² MoNuSeg image (8 px overlap)."""


def monuseg_tiles(out: Path, class_names: list[str]) -> Path:
    """The labelled MoNuSeg images of ``../shared/realdata/monuseg_ykrmm`` (13 training images of 1000² here, H&E, 40x,
    TCGA, several organs, class-agnostic) cut into 256² tiles as a folder dataset, for testing a CoNSeP model on other held-out tiles.

    MoNuSeg has no nucleus types, so every nucleus gets type 1 and the class names of the CoNSeP run (the test
    cache must match the run's): only the class-agnostic metrics (PQ, DQ, SQ, AJI) of these tiles mean anything.
    """
    import numpy as np
    from PIL import Image

    from cellembed.data import Tile, relabel, write_folder_dataset

    src = REALDATA / "monuseg_ykrmm"
    z = np.load(src / "labels.npz")

    def tiles():
        for name, inst in zip(z["names"], z["inst"]):
            image = np.asarray(Image.open(src / "images" / f"{name}.png").convert("RGB"))
            for a, y in enumerate(MONUSEG_OFFSETS):
                for b, x in enumerate(MONUSEG_OFFSETS):
                    cut = relabel(inst[y:y + MONUSEG_TILE, x:x + MONUSEG_TILE])
                    yield Tile(f"{name}_{4 * a + b:03d}", np.ascontiguousarray(image[y:y + MONUSEG_TILE, x:x + MONUSEG_TILE]),
                               cut, (cut > 0).astype(np.uint8), {})

    return write_folder_dataset(out, tiles(), class_names, overwrite=True)


CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]


def monuseg_cache(tmp: Path, weights: str, workers: int) -> str:
    """The MoNuSeg tiles' cache for the packaged (or random) encoder (resumed when already there)."""
    held = monuseg_tiles(tmp / "monuseg-tiles", CONSEP_CLASSES)
    out = str(tmp / f"{weights}-monuseg")
    extract_folder(held, out, weights, workers, split="all")
    return out


def heldout_row(run: Path, cache: str, workers: int, model: str, seed: int) -> dict:
    """A run's class-agnostic scores on the MoNuSeg tiles, beside its CoNSeP test scores when it has them."""
    from cellembed.evaluate import score_run

    run = Path(run)
    out = run / "score-monuseg"
    done = out / "metrics.json"
    if done.is_file() and done.stat().st_mtime > max((run / f).stat().st_mtime for f in ("model.safetensors",
                                                                                         "config.json")):
        metrics = json.loads(done.read_text())  # scored after the run last changed: reused
    else:
        metrics = score_run(run, cache, out=out, device="cpu", num_workers=workers, n_overlays=0,
                            overwrite=True).metrics
    s = metrics["summary"]
    consep = sorted(run.glob("score-*-test/metrics.json"))
    c = json.loads(consep[0].read_text())["summary"] if consep else {}
    record = json.loads((run / "config.json").read_text())
    return {"model": model, "seed": seed, "run": str(run), "n_tiles": len(metrics["per_image"]),
            "epochs": record["config"]["epochs"], "min_area": record["postprocess"]["min_area"],
            **{k: s[k] for k in ("pq", "dq", "sq", "aji", "precision", "recall")},
            "consep_test_pq": c.get("pq"), "per_image": per_source_image(out, GROUPS)}


def final_models(root: Path, args, tmp: Path) -> list[dict]:
    """``--final``: the variant ``args.final`` trained with fit-decoder's defaults on all 27 CoNSeP images (432 tiles;
    no validation split, so the last epoch is kept and the preset's minimum area is used), scored on the labelled
    MoNuSeg images cut into tiles (other held-out H&E tiles at 40x)."""
    from cellembed.train import FitConfig, fit_decoder

    weights, source, augment, views = VARIANTS[args.final]
    if source != "cache":
        raise SystemExit(f"--final trains a cache variant; {args.final!r} is not one")
    held = monuseg_cache(tmp, weights, args.workers)
    train = str(tmp / f"{weights}-consep-all")
    extract_folder(root, train, weights, args.workers, split="all", augment_views=views)
    rows = []
    for seed in args.seeds:
        cfg = FitConfig(cache=train, out=str(tmp / f"final-{seed}"), augment=augment, seed=seed, device="cpu",
                        num_workers=args.workers, memory="ram", overwrite=True,
                        **{k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size))
                           if v is not None})
        fit = fit_decoder(cfg, on_epoch=lambda e, n, m: print(f"  [final seed {seed}] epoch {e}/{n} loss "
                                                             f"{m['train_loss']:.3f}", flush=True))
        rows.append(heldout_row(fit.run_dir, held, args.workers, f"{args.final}, all 27 CoNSeP images", seed))
    return rows


def heldout_runs(args, tmp: Path) -> list[dict]:
    """``--heldout RUN ...``: finished runs of this protocol (18 training images) scored on the MoNuSeg tiles."""
    runs = []
    for item in args.heldout:  # RUN or LABEL=RUN
        label, _, path = item.rpartition("=")
        if not (Path(path) / "model.safetensors").is_file():
            raise SystemExit(f"--heldout {item}: {path} is not a finished run (no model.safetensors); give a run "
                             "folder of fit-decoder")
        runs.append((label, Path(path)))
    held = monuseg_cache(tmp, "packaged", args.workers)
    rows = []
    for label, run in runs:
        record = json.loads((run / "config.json").read_text())
        variant = label or next((v for v in VARIANTS if run.name.startswith(run_name(v, 0)[:-1])), run.name)
        rows.append(heldout_row(run, held, args.workers, f"{variant}, 18 CoNSeP images", record["config"]["seed"]))
    return rows


def heldout_report(rows: list[dict], args, t0: float) -> None:
    """``<name>_heldout``: class-agnostic scores on the MoNuSeg tiles per model, mean ± sd over seeds."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        consep = [r["consep_test_pq"] for r in rs if r["consep_test_pq"] is not None]
        table.append({"model": model, "seeds": ", ".join(str(r["seed"]) for r in rs),
                      "test tiles": f"MoNuSeg, {rs[0]['n_tiles'] // 16} images, {rs[0]['n_tiles']} tiles",
                      **{k.upper(): _mean_sd([r[k] for r in rs]) for k in ("pq", "dq", "sq", "aji")},
                      "precision": _mean_sd([r["precision"] for r in rs]),
                      "recall": _mean_sd([r["recall"] for r in rs]),
                      "CoNSeP test PQ (same runs)": _mean_sd(consep)})
    description = (
        "Other held-out H&E tiles at 40x: the labelled MoNuSeg images of `../shared/realdata` (TCGA, several "
        "organs) cut into 4 × 4 tiles of 256² (8 px overlap), scored class-agnostically (PQ, DQ, SQ, AJI; mean "
        "over tiles with nuclei, as for CoNSeP) with each run's own post-processing (its tuned minimum area). "
        "Models: runs of this benchmark's protocol (`--heldout RUN ...`: trained on the 18 CoNSeP training-split "
        "images, their CoNSeP test PQ beside), or with `--final` the variant trained on all 27 CoNSeP images (no "
        "validation: last epoch, the preset's minimum area). MoNuSeg outlines every nucleus, and its stains and "
        "organs differ from CoNSeP's colorectal tiles: a transfer check, not the same task.")

    def plot(ax):
        models = list(dict.fromkeys(r["model"] for r in rows))
        for i, model in enumerate(models):
            per = {}
            for r in rows:
                if r["model"] == model:
                    for p in r["per_image"]:
                        per.setdefault(p["image"], []).append(p["pq"])
            order = sorted(per)
            ax.bar([j + 0.8 * i / len(models) for j in range(len(order))], [statistics.mean(per[k]) for k in order],
                   width=0.8 / len(models), label=model)
            ax.set_xticks(range(len(order)), [k[5:12] for k in order], rotation=90, fontsize=6)
        ax.set_ylabel("PQ (pooled tiles, mean over seeds)")
        ax.set_title("CoNSeP models on MoNuSeg images")
        ax.legend(fontsize=7)

    payload = {"machine": machine(), "args": vars(args), "rows": rows, "seconds": time.perf_counter() - t0,
               "description": description}
    print(write_results(f"{args.name}_heldout", payload, table, plot).read_text())


def collect_rows(folder: Path, args) -> list[dict]:
    """Rows of the runs that finished (scored) in ``folder``; what a run's files do not keep is None (the PQ with the
    preset's area, extraction seconds) or summed from its epochs (fit seconds: training epochs only)."""
    rows = []
    for name in args.variants:
        weights, source, augment, views = VARIANTS[name]
        for seed in args.seeds:
            run = folder / run_name(name, seed)
            scored = run / f"score-{weights}-test" / "metrics.json"
            if not scored.is_file():
                print(f"collect: {run} has no test scores (unfinished); left out", flush=True)
                continue
            s = json.loads(scored.read_text())["summary"]
            record = json.loads((run / "config.json").read_text())
            history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            best = max(history, key=lambda h: h["val_pq"])
            rows.append({"variant": name, "seed": seed, "weights": weights, "source": source, "augment": augment,
                         "views": views, "config": {k: record["config"][k] for k in ("epochs", "lr", "batch_size", "loss", "refine",
                                                                    "image_skip")},
                         "pq": s["pq"], "mpq_plus": s["mpq_plus"], "aji": s["aji"], "dq": s["dq"], "sq": s["sq"],
                         "pq_untuned": None, "mpq_plus_untuned": None, "best_epoch": best["epoch"],
                         "best_val_pq": best["val_pq"], "min_area": record["postprocess"]["min_area"],
                         "fit_seconds": sum(h["train_seconds"] for h in history), "extract_seconds": None,
                         "epoch_seconds": [h["train_seconds"] for h in history], "history": history,
                         "per_image": per_source_image(scored.parent, GROUPS), "collected": str(run)})
    if not rows:
        raise SystemExit(f"collect: no finished runs in {folder}")
    return rows


def report(rows: list[dict], args, t0: float) -> None:
    """Write the results' JSON, markdown (mean ± sd per variant) and PNG (validation PQ per epoch and seed)."""
    from cellembed.train import FitConfig

    table = []
    for name in args.variants:
        rs = [r for r in rows if r["variant"] == name]
        fit_s = [r["fit_seconds"] for r in rs]
        table.append({"variant": name, "seeds": len(rs), "PQ": _mean_sd([r["pq"] for r in rs]),
                      "PQ, preset min area": _mean_sd([r["pq_untuned"] for r in rs if r["pq_untuned"] is not None]),
                      "mPQ+": _mean_sd([r["mpq_plus"] for r in rs]), "AJI": _mean_sd([r["aji"] for r in rs]),
                      "DQ": _mean_sd([r["dq"] for r in rs]), "SQ": _mean_sd([r["sq"] for r in rs]),
                      "best epochs": ", ".join(str(r["best_epoch"]) for r in rs),
                      "min area (tuned)": ", ".join(str(r["min_area"]) for r in rs),
                      "median epoch s (train)": f"{statistics.median(sum((r['epoch_seconds'] for r in rs), [])):.1f}",
                      "fit s per seed": f"{statistics.mean(fit_s):.0f}",
                      "seeds run": ", ".join(str(r["seed"]) for r in rs),
                      "extract s (train + val)": ("n/a" if rs[0]["extract_seconds"] is None
                                                  else f"{rs[0]['extract_seconds']:.0f}")})
    d = FitConfig(out="-")
    cfg = rows[0]["config"]
    description = (
        f"CoNSeP train images only (432 tiles of 256², 27 source images), split by source image with the `cisca` "
        f"scheme (group_regex `{GROUPS}`): 288 train / 48 validation / 96 test tiles (18 / 3 / 6 images). Encoder "
        f"{ENCODER}, frozen, packaged ImageNet weights unless 'random', input at the tile's native 256 px "
        f"(`--input-policy auto`); everything else is `fit-decoder`'s defaults: unetr decoder with the "
        f"full-resolution refinement (refine={d.refine}) and the image skip (on for unetr), CISCA heads, loss "
        f"{d.loss}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW + OneCycle to a peak lr of "
        f"{cfg['lr']:g}, best epoch by validation PQ, then the minimum instance area tuned on validation "
        "(`--tune`); scored on the test split with 40x CISCA post-processing. Cache runs read from RAM; "
        "'dihedral' flips / quarter-turns the cached levels, image and GT together; 'cache + views' extracts "
        f"{VIEWS} augmented copies of every training tile with CISCA's full image-space augmentation (`extract "
        f"--augment-views {VIEWS}`) and serves one of the {VIEWS + 1} views per tile per epoch (same epoch cost); "
        "'live, full' runs the encoder in the loop with CISCA's full image-space augmentation. Each cell: mean ± sd over the seeds run (the seed "
        f"sets decoder init and batch order). Wall times on this CPU ({torch.get_num_threads()} torch threads, "
        f"{args.workers} workers)."
        + (" Collected with `--collect` from a folder of finished runs (an interrupted invocation's, or runs "
           "trained with this protocol outside it): 'fit s' counts their training epochs only, and the PQ at the "
           "preset's minimum area was not kept. " + args.collect_note
           if any("collected" in r for r in rows) else ""))
    payload = {"machine": machine(), "args": vars(args), "rows": rows, "seconds": time.perf_counter() - t0,
               "description": description}

    def plot(ax):
        for i, r in enumerate(rows):
            ax.plot([h["epoch"] for h in r["history"]], [h.get("val_pq") or 0 for h in r["history"]],
                    color=f"C{args.variants.index(r['variant'])}", alpha=0.8,
                    label=f"{r['variant']}, seed {r['seed']} (test PQ {r['pq']:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation PQ")
        ax.set_title("CoNSeP, EfficientNet-Lite0 + unetr/CISCA, fit-decoder defaults")
        ax.legend(fontsize=7)

    md = write_results(args.name, payload, table, plot)
    print(md.read_text())
    per_image_report(rows, args)


def per_image_report(rows: list[dict], args) -> None:
    """``<name>_per_image``: test PQ per source image (tiles pooled), mean ± sd over the seeds of each variant."""
    table, images = [], sorted({p["image"] for r in rows for p in r.get("per_image") or []})
    for name in args.variants:
        rs = [r for r in rows if r["variant"] == name and r.get("per_image")]
        for image in images:
            ps = [p for r in rs for p in r["per_image"] if p["image"] == image]
            if ps:
                table.append({"variant": name, "source image": image, "true nuclei": ps[0]["true nuclei"],
                              "seeds": len(ps), "PQ": _mean_sd([p["pq"] for p in ps]),
                              "DQ": _mean_sd([p["dq"] for p in ps]), "SQ": _mean_sd([p["sq"] for p in ps]),
                              "precision": _mean_sd([p["precision"] for p in ps]),
                              "recall": _mean_sd([p["recall"] for p in ps])})
    if not table:
        return
    description = (
        "The test split's PQ by source image: the 16 tiles of each CoNSeP image pooled (TP, FP, FN and IoU sums "
        "added, PQ = DQ × SQ of the pool), mean ± sd over seeds. The split's PQ (the mean over tiles) is "
        "dominated by its hardest images; look at their overlays before reading a change in the mean.")

    def plot(ax):
        for i, name in enumerate(args.variants):
            part = [t for t in table if t["variant"] == name]
            ax.bar([j + 0.8 * i / len(args.variants) for j in range(len(part))],
                   [float(t["PQ"].split(" ")[0]) for t in part], width=0.8 / len(args.variants), label=name)
        ax.set_xticks(range(len(images)), images, fontsize=7)
        ax.set_ylabel("test PQ (pooled tiles)")
        ax.set_title("CoNSeP test split, PQ per source image")
        ax.legend(fontsize=7)

    write_results(f"{args.name}_per_image", {"machine": machine(), "rows": table, "description": description},
                  table, plot)


if __name__ == "__main__":
    main()
