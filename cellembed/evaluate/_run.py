"""Score a trained run on a test cache, and tune its minimum area on a validation cache."""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cellembed.cache._manifest import CacheError, write_json_atomic
from cellembed.evaluate._predict import (
    INSTANCE_HEADS,
    SEMANTIC_IGNORE,
    Postprocess,
    batch_instances,
    class_pixel_counts,
    decoder_maps,
    semantic_scores,
    true_maps,
)

TABLE_KEYS = (("precision", "P"), ("recall", "R"), ("dq", "DQ"), ("sq", "SQ"), ("pq", "PQ"), ("mpq_plus", "mPQ+"))
ProgressFn = Callable[[int], None]  # tiles done in the last step


class Run(NamedTuple):
    """A trained run: its directory, its ``config.json`` record, the decoder with the best weights loaded."""

    path: Path
    record: dict
    model: torch.nn.Module
    post: Postprocess

    @property
    def num_classes(self) -> int:
        """Nucleus classes besides background; for the semantic head, every class."""
        return len(self.record["class_names"]) - (0 if self.post.head == "semantic" else 1)


def load_run(path: str | Path, device: torch.device | str = "cpu") -> Run:
    """Rebuild a run's decoder from ``config.json`` and load ``model.safetensors`` (the best epoch)."""
    from safetensors.torch import load_file

    from cellembed.decoders import build_decoder

    path = Path(path)
    config, weights = path / "config.json", path / "model.safetensors"
    for f in (config, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; is {path} a run written by `cellembed fit-decoder` that "
                                    "finished at least one epoch?")
    record = json.loads(config.read_text())
    dec = record["decoder"]
    model = build_decoder(dec["name"], record["levels"], record["tile_size"], dec["head"], dec["num_classes"],
                          image_skip=dec["image_skip"], **decoder_options(dec))
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types on a damaged file
        raise CacheError(f"{weights}: unreadable weights ({type(err).__name__}); rerun `cellembed fit-decoder` "
                         "with the same arguments to rebuild it") from None
    model.to(device).eval()
    return Run(path, record, model, Postprocess(**record["postprocess"]))


UNETR_OPTIONS = ("refine", "image_levels", "full_channels", "type_branch", "level_depth", "split_trunks")
"""The unetr build options a run records (from its FitConfig fields of the same names) and load_run rebuilds."""
LEGACY_DECODER = {"refine": False, "image_levels": 2, "type_branch": False, "level_depth": 1,
                  "split_trunks": False}
"""unetr options that runs recorded before each option existed used (their ``decoder`` record lacks the key):
the narrow design, no 1/4-resolution image block, types from the shared full-resolution features."""


def decoder_options(dec: dict) -> dict:
    """Build options recorded with a run's decoder, ``LEGACY_DECODER`` filling the keys older runs lack."""
    if dec["name"] != "unetr":
        return {}
    dec = {**LEGACY_DECODER, **dec}
    return {k: dec.get(k) for k in UNETR_OPTIONS}  # full_channels absent: the design's default width


def _device(name: str) -> torch.device:
    from cellembed.train._fit import _device as pick

    return pick(name)


def _loader(run: Run, cache, device, batch_size: int, num_workers: int, role: str, training_tiles: bool = False):
    """The run's evaluation loader on ``cache``; ``training_tiles`` lets diagnostics read the run's own training
    cache (refused otherwise: scores on training tiles are not test scores)."""
    from cellembed.cache import make_loader
    from cellembed.train._fit import check_run_cache

    if training_tiles:
        run = run._replace(record={**run.record, "source": "diagnostic"})
    check_run_cache(cache, run.record, role)
    return make_loader(cache, batch_size=batch_size, memory="stream", augment="none", head=run.post.head,
                       magnification=run.record["config"]["magnification"], shuffle=False,
                       num_workers=num_workers, device=device, levels=[lv["name"] for lv in run.record["levels"]])


def tile_metas(cache) -> dict[str, dict]:
    """Every tile's meta JSON (tissue, group, ...) by key, read without decoding features."""
    metas = {}
    for path in cache.shard_paths:
        try:
            for name, data in cache.shard_members(path, ".meta.json"):
                metas[name[: -len(".meta.json")]] = json.loads(data)
        except (tarfile.TarError, OSError, ValueError) as err:
            raise CacheError(f"{path}: unreadable shard ({err}); run `cellembed verify {cache.path}`, then "
                             "`cellembed extract ... --repair`") from None
    return metas


class ScoreResult(NamedTuple):
    """Where ``score`` wrote, and the metrics JSON it wrote."""

    out: Path
    metrics: dict
    seconds: float


def score_run(run_path: str | Path, cache_path: str | Path, out: str | Path | None = None, *,
              device: str = "auto", batch_size: int = 16, num_workers: int = 2, n_overlays: int = 4,
              on_progress: ProgressFn | None = None, overwrite: bool = False, tta: bool = False) -> ScoreResult:
    """Predict a test cache with a run's best decoder, post-process, score; write the results to ``out``.

    Writes ``predictions.npy`` ((N, T, T, 2) int32 instance and type maps, in cache order; ``keys.txt``
    gives the tile keys in the same order), ``metrics.json`` (the ``cellembed score --pred/--true`` layout
    plus ``run`` and ``protocol``), ``table.md`` (Mind the Gap's Table I columns) and ``overlay_*.png``.

    A run of the ``semantic`` head writes ``predictions.npy`` as (N, T, T) uint8 classes and ``metrics.json``
    as :func:`~cellembed.evaluate._predict.semantic_scores` gives it: Dice and IoU per class from pixel counts
    summed over the whole test split (not averaged per image), mDice / mIoU the unweighted mean over the classes
    present in the ground truth or the prediction, every class counted (class 0 too), pixels of value 255 ignored.

    Args:
        run_path: a directory written by ``cellembed fit-decoder``.
        cache_path: a test cache from the same encoder, blocks and input policy.
        out: output directory (default ``<run>/score-<cache directory name>``).
        device: "auto", "cpu" or "cuda".
        batch_size, num_workers: decoder batch size and cache reader workers.
        n_overlays: overlay PNGs of the first tiles with ground truth.
        on_progress: called with the number of tiles after every batch.
        overwrite: replace the scores of an earlier ``score`` in ``out`` (refused otherwise).
        tta: average the maps over the dihedral group (``decoder_maps``); recorded in the protocol.
    """
    from cellembed.cache import open_cache
    from cellembed.cache._location import location_name
    from cellembed.metrics import image_counts, score_counts

    t0 = time.perf_counter()
    dev = _device(device)
    run = load_run(run_path, dev)
    cache = open_cache(cache_path)
    loader = _loader(run, cache, dev, batch_size, num_workers, "test cache")
    out = Path(out) if out else run.path / f"score-{location_name(cache_path)}"
    if (out / "metrics.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds scores; pass --overwrite to replace them, or --out another folder")
    if out.is_file():
        raise ValueError(f"{out} is a file; give --out a folder")
    out.mkdir(parents=True, exist_ok=True)
    from cellembed.cache._stream import epoch_order

    order = epoch_order(loader.spec(0))
    if run.post.head not in INSTANCE_HEADS:
        scores = _score_semantic(run, cache, loader, order, out, dev, tta, n_overlays, on_progress)
        return ScoreResult(out, scores, time.perf_counter() - t0)
    n, size = len(cache), run.record["tile_size"]
    preds = np.lib.format.open_memmap(out / ".predictions.npy.tmp", "w+", np.int32, (n, size, size, 2))
    counts: list = [None] * n
    keys: list = [None] * n
    overlays: dict[int, tuple] = {}
    done = 0
    for batch in loader:
        _, maps = decoder_maps(run.model, batch, dev, tta=tta)
        pred, true = batch_instances(maps, run.post), true_maps(batch)
        for j, key in enumerate(batch.keys):
            i = order[done + j]
            preds[i], keys[i] = pred[j], key
            counts[i] = image_counts(pred[j], true[j], run.num_classes)
            if len(overlays) < n_overlays and true[j, ..., 0].any():
                overlays[i] = (batch.image[j].permute(1, 2, 0).cpu().numpy(), pred[j], true[j])
        done += len(batch.keys)
        if on_progress:
            on_progress(len(batch.keys))
    preds.flush()
    del preds  # closed before the rename
    _publish_predictions(out, keys)
    metas = tile_metas(cache)
    tissues = [metas.get(k, {}).get("tissue") for k in keys]
    scores = score_counts(counts, run.num_classes, tissues if all(tissues) else None)
    _write_scores(out, scores, run, cache, tta, table_markdown, {
        "matching": "IoU > 0.5, one-to-one",
        "pq": "mean over images with at least one true instance (Mind the Gap / CISCA)",
        "pq_conic": "mean over every image, empty images count 0 (CoNIC)",
        "mpq_plus": "TP/FP/FN/IoU pooled per class over the data set, PQ per class, mean over all classes (CoNIC)",
        "pannuke": "PanNuke-metrics: per image, NaN for absent classes, mean per tissue then over tissues"})
    for i, (image, pred, true) in sorted(overlays.items()):
        save_overlay(out / f"overlay_{keys[i]}.png", image, pred, true, run.record["class_names"])
    return ScoreResult(out, scores, time.perf_counter() - t0)


def _score_semantic(run: Run, cache, loader, order: list[int], out: Path, dev, tta: bool, n_overlays: int,
                    on_progress: ProgressFn | None) -> dict:
    """``score`` for the semantic head: (N, T, T) uint8 class predictions, Dice / IoU per class from pixel counts
    pooled over the split (``semantic_scores``), ``table.md`` and class overlays."""
    n, size = len(cache), run.record["tile_size"]
    names = run.record["class_names"]
    k = run.record["decoder"]["num_classes"]
    preds = np.lib.format.open_memmap(out / ".predictions.npy.tmp", "w+", np.uint8, (n, size, size))
    keys: list = [None] * n
    counts, overlays, done = np.zeros((k, 3), np.int64), {}, 0
    for batch in loader:
        _, maps = decoder_maps(run.model, batch, dev, tta=tta)
        pred, true = maps["semantic"].argmax(1).astype(np.uint8), batch.targets["semantic"].cpu().numpy()
        counts += class_pixel_counts(pred, true, k)
        for j, key in enumerate(batch.keys):
            i = order[done + j]
            preds[i], keys[i] = pred[j], key
            if len(overlays) < n_overlays:
                overlays[i] = (batch.image[j].permute(1, 2, 0).cpu().numpy(), pred[j], true[j])
        done += len(batch.keys)
        if on_progress:
            on_progress(len(batch.keys))
    preds.flush()
    del preds  # closed before the rename
    _publish_predictions(out, keys)
    scores = semantic_scores(counts, names)
    _write_scores(out, scores, run, cache, tta, semantic_table_markdown, {
        "dice": "per class 2|P∩T| / (|P| + |T|) from pixel counts summed over the whole test split",
        "iou": "per class |P∩T| / |P∪T| from the same pooled counts",
        "mean": "mdice / miou: unweighted mean over every class of classes.txt (class 0 included) present in "
                "the ground truth or the prediction (FM benchmark: mean over classes)",
        "ignore": f"ground-truth pixels of value {SEMANTIC_IGNORE} are counted nowhere"})
    for i, (image, pred, true) in sorted(overlays.items()):
        from PIL import Image

        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        panels = [image, gap, draw_classes(image, pred), gap, draw_classes(image, true)]
        Image.fromarray(np.concatenate(panels, 1)).save(out / f"overlay_{keys[i]}.png")
    return scores


def _publish_predictions(out: Path, keys: list[str]) -> None:
    """Give the finished (flushed, closed) ``.predictions.npy.tmp`` its name and write ``keys.txt`` beside it."""
    (out / ".predictions.npy.tmp").replace(out / "predictions.npy")
    (out / "keys.txt").write_text("\n".join(keys) + "\n")


def _write_scores(out: Path, scores: dict, run: Run, cache, tta: bool, table, protocol: dict) -> None:
    """Add the run's description and the protocol (with the post-processing, image count and TTA every score
    records) to ``scores``; write ``metrics.json`` and ``table.md`` (``table(scores)``)."""
    scores["run"] = _run_info(run, cache)
    scores["protocol"] = {**protocol, "postprocess": run.post.to_dict(), "n_images": len(cache),
                          "tta": "dihedral (8 variants, maps averaged)" if tta else "none"}
    write_json_atomic(out / "metrics.json", scores)
    (out / "table.md").write_text(table(scores))


def semantic_table_markdown(scores: dict) -> str:
    """mDice, mIoU, pixel accuracy, then Dice and IoU per class (the FM benchmark's columns)."""
    info, s = scores["run"], scores["summary"]
    lines = ["| encoder | levels | decoder | mDice | mIoU | pixel acc. | decoder params |",
             "|---|---|---|---:|---:|---:|---:|",
             f"| {info['encoder']} | {', '.join(info['levels'])} | {info['decoder']}/{info['head']} | "
             f"{_fmt(s['mdice'])} | {_fmt(s['miou'])} | {_fmt(s['pixel_accuracy'])} | "
             f"{info['decoder_parameters'] / 1e6:.2f} M |", "",
             f"{scores['protocol']['n_images']} images; Dice and IoU per class from pixel counts pooled over the "
             "split; mDice / mIoU = mean over the classes present (class 0 included).", "",
             "| class | Dice | IoU | true pixels | predicted pixels |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {v['name']} | {_fmt(v['dice'])} | {_fmt(v['iou'])} | {v['true']} | {v['predicted']} |"
              for v in scores["per_class"].values()]
    return "\n".join(lines) + "\n"


def draw_classes(image: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) uint8 half-blended with a colour per class of ``classes`` (H, W); ignored pixels
    (``SEMANTIC_IGNORE``) keep the image."""
    palette = np.concatenate([TYPE_COLOURS[1:], TYPE_COLOURS[:1]])
    colour = palette[classes.astype(np.int64) % len(palette)]
    blend = (image.astype(np.uint16) + colour) // 2
    return np.where((classes == SEMANTIC_IGNORE)[..., None], image, blend).astype(np.uint8)


def _run_info(run: Run, cache) -> dict:
    enc = run.record["identity"]["encoder"]
    return {"run": str(run.path), "cache": str(cache.path), "cache_key": cache.cache_key,
            "encoder": enc["encoder"], "levels": [lv["name"] for lv in run.record["levels"]],
            "decoder": run.record["decoder"]["name"], "head": run.record["decoder"]["head"],
            "decoder_parameters": run.record["decoder"]["trainable_parameters"],
            "class_names": run.record["class_names"]}


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def table_markdown(scores: dict) -> str:
    """Mind the Gap's Table I layout: P, R, DQ, SQ, PQ, mPQ+ and the decoder's parameter count."""
    info, s = scores["run"], scores["summary"]
    head = "| encoder | levels | decoder | " + " | ".join(label for _, label in TABLE_KEYS) + " | decoder params |"
    rule = "|---|---|---|" + "---:|" * (len(TABLE_KEYS) + 1)
    row = (f"| {info['encoder']} | {', '.join(info['levels'])} | {info['decoder']}/{info['head']} | "
           + " | ".join(_fmt(s[k]) for k, _ in TABLE_KEYS) + f" | {info['decoder_parameters'] / 1e6:.2f} M |")
    lines = [head, rule, row, "", f"{scores['protocol']['n_images']} images; PQ etc. averaged over images with "
             "ground truth; mPQ+ pooled per class (CoNIC)."]
    per_class = scores.get("per_class") or {}
    if per_class:
        names = info["class_names"]
        lines += ["", "| class | TP | FP | FN | PQ+ |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {names[int(c)] if int(c) < len(names) else c} | {v['tp']} | {v['fp']} | {v['fn']} | "
                  f"{_fmt(v['pq'])} |" for c, v in per_class.items()]
    if scores.get("pannuke"):
        p = scores["pannuke"]
        lines += ["", f"PanNuke (per tissue, official): bPQ {_fmt(p['bpq'])}, mPQ {_fmt(p['mpq'])}"]
    return "\n".join(lines) + "\n"


TYPE_COLOURS = np.array([[255, 255, 255], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                         [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.uint8)


def save_overlay(path: Path, image: np.ndarray, pred: np.ndarray, true: np.ndarray, class_names) -> None:
    """Prediction contours coloured by type (left) beside the ground truth's (right)."""
    from PIL import Image

    panels = [draw_contours(image, maps) for maps in (pred, true)]
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([panels[0], gap, panels[1]], 1)).save(path)


def draw_contours(image: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the instance contours of ``maps`` (H, W, 2: instance, type)
    drawn in :data:`TYPE_COLOURS` by type."""
    from skimage.segmentation import find_boundaries

    panel = image.copy()
    edge = find_boundaries(maps[..., 0], mode="inner")
    panel[edge] = TYPE_COLOURS[np.minimum(maps[..., 1][edge], len(TYPE_COLOURS) - 1)]
    return panel


def _base_area(post: Postprocess) -> int:
    return post.effective_min_area or (10 if post.head == "hovernet" else 1)


def area_candidates(post: Postprocess) -> list[int]:
    """The minimum areas ``tune`` tries by default: ``post``'s area (hovernet without one: 10) × 0, ¼, …, 2."""
    base = _base_area(post)
    return sorted({int(round(base * f)) for f in (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2)})


def tune_run(run_path: str | Path, cache_path: str | Path, *, metric: str = "pq", areas: list[int] | None = None,
             device: str = "auto", batch_size: int = 16, num_workers: int = 2,
             on_progress: ProgressFn | None = None) -> dict:
    """Pick the minimum instance area that maximises ``metric`` on a validation cache; save it with the run.

    The decoder runs once; every candidate area post-processes the same maps. The chosen area is written to
    the run's ``config.json`` (``postprocess.min_area``), so ``cellembed score`` uses it; ``tune.json``
    keeps the whole table.

    Args:
        metric: a ``summary`` key of the scores ("pq", "mpq_plus", "aji", ...).
        areas: candidate areas (default: the preset's area times 0, 0.25, ..., 2).
    """
    from cellembed.cache import open_cache
    from cellembed.metrics import image_counts, score_counts

    dev = _device(device)
    run = load_run(run_path, dev)
    if run.post.head not in INSTANCE_HEADS:
        raise ValueError(f"{run.path}: only instance heads (cisca, hovernet) have a minimum area to tune")
    base = _base_area(run.post)
    areas = sorted(set(areas if areas else area_candidates(run.post)))
    loader = _loader(run, open_cache(cache_path), dev, batch_size, num_workers, "validation cache")
    posts = {a: replace(run.post, min_area=a) for a in areas}
    counts: dict[int, list] = {a: [] for a in areas}
    for batch in loader:
        _, maps = decoder_maps(run.model, batch, dev)
        true = true_maps(batch)
        for a, post in posts.items():
            counts[a] += [image_counts(p, t, run.num_classes) for p, t in zip(batch_instances(maps, post), true)]
        if on_progress:
            on_progress(len(batch.keys))
    table = {a: score_counts(c, run.num_classes)["summary"] for a, c in counts.items()}
    if metric not in next(iter(table.values())):
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(next(iter(table.values())))}")
    value = lambda a: -1.0 if table[a][metric] is None else table[a][metric]
    best = max(areas, key=lambda a: (value(a), -abs(a - base)))
    record = dict(run.record, postprocess=replace(run.post, min_area=best).to_dict())
    write_json_atomic(run.path / "config.json", record)
    result = {"metric": metric, "min_area": best, "value": table[best][metric], "cache": str(cache_path),
              "table": [{"min_area": a, **table[a]} for a in areas]}
    write_json_atomic(run.path / "tune.json", result)
    return result
