"""Where a trained run loses PQ: oracle swaps of its heads' maps, over- / under-segmentation, overlay grids.

``oracle_swaps`` predicts a cache with a run's best decoder and post-processes four versions of the maps:
the decoder's own, the decoder's with the ground-truth 3-class map swapped in, with the ground-truth
directional maps swapped in, and both ground-truth maps (the oracle: the ceiling of the post-processing on
these tiles). The gap each swap closes says which head is learned badly. ``segmentation_errors`` counts
splits (a true nucleus covered ≥ 20 % each by two or more predictions) and merges (a prediction covering
≥ 20 % each of two or more true nuclei). ``overlay_grid`` draws a few tiles: contours of truth and
prediction over the image, and the body probability and horizontal directional map, predicted vs target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SWAPS = ("decoder maps", "GT foreground, predicted boundary / body", "predicted foreground, GT boundary / body",
         "GT 3-class map", "GT directional maps", "GT both (oracle)")
"""The 3-class map is split in two questions: which pixels are nucleus (foreground = boundary + body), and
where, inside the foreground, one nucleus ends and the next begins (boundary vs body)."""


def _swap_classes(name: str, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The (B, 3, T, T) class probabilities (boundary, body, background) of swap ``name``.

    "GT foreground, predicted boundary / body": the ground-truth foreground, split between boundary and body in
    the decoder's proportions. "predicted foreground, GT boundary / body": the decoder's foreground probability,
    given to the ground-truth class (boundary or body) on true nucleus pixels; the decoder's maps elsewhere.
    """
    if name in ("GT 3-class map", "GT both (oracle)"):
        return gt
    if name == "GT foreground, predicted boundary / body":
        fg = gt[:, :2].sum(1, keepdims=True)
        split = pred[:, :2] / np.maximum(pred[:, :2].sum(1, keepdims=True), 1e-6)
        return np.concatenate([split * fg, 1.0 - fg], 1).astype(np.float32)
    if name == "predicted foreground, GT boundary / body":
        fg = pred[:, :2].sum(1, keepdims=True)
        swapped = np.concatenate([gt[:, :2] * fg, 1.0 - fg], 1)
        return np.where(gt[:, :2].sum(1, keepdims=True) > 0, swapped, pred).astype(np.float32)
    return pred


def pixel_dice(run_dir, cache_dir, group_regex: str = r"(.+)_\d+$", training_tiles: bool = False) -> dict:
    """Pixel Dice of the decoder's 3-class map on a cache: foreground (P(boundary) + P(body) >= 0.5, as the
    post-processing reads it), body and boundary (argmax), overall and per source image (foreground)."""
    import re

    _, batches = _predict(run_dir, cache_dir, training_tiles)
    pred = np.concatenate([b[0]["classes"] for b in batches])
    gt = np.concatenate([b[1]["classes"] for b in batches])
    keys = [k for b in batches for k in b[4]]
    dice = lambda a, b: float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    fg_p, fg_t = pred[:, :2].sum(1) >= 0.5, gt[:, :2].sum(1) > 0.5
    out = {"foreground": dice(fg_p, fg_t), "body": dice(pred.argmax(1) == 1, gt.argmax(1) == 1),
           "boundary": dice(pred.argmax(1) == 0, gt.argmax(1) == 0), "per_image": {}}
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        m = re.match(group_regex, k)
        groups.setdefault(m.group(1) if m else k, []).append(i)
    for g, idx in sorted(groups.items()):
        out["per_image"][g] = {"foreground": dice(fg_p[idx], fg_t[idx]),
                               "predicted / true foreground pixels": float(fg_p[idx].sum() / max(fg_t[idx].sum(), 1))}
    return out


def _predict(run_dir, cache_dir, training_tiles: bool = False):
    """(activated maps, GT target maps, true (N, T, T, 2), images, tile keys) per batch of a whole cache
    (``training_tiles``: the run's own training cache is allowed)."""
    from cellembed.cache import open_cache
    from cellembed.evaluate._predict import decoder_maps, true_maps
    from cellembed.evaluate._run import _loader, load_run

    run = load_run(run_dir)
    loader = _loader(run, open_cache(cache_dir), torch.device("cpu"), 16, 0, "test", training_tiles)
    out = []
    for batch in loader:
        _, maps = decoder_maps(run.model, batch, torch.device("cpu"))
        t = batch.targets
        gt = {"classes": torch.nn.functional.one_hot(t["classes"].long(), 3).permute(0, 3, 1, 2).float().numpy(),
              "directions": t["directions"].numpy()}
        out.append((maps, gt, true_maps(batch), batch.image.permute(0, 2, 3, 1).numpy(), list(batch.keys)))
    return run, out


def segmentation_errors(pred: np.ndarray, true: np.ndarray, frac: float = 0.2) -> dict:
    """Splits and merges over (N, T, T) instance maps (see the module docstring)."""
    splits = merges = n_true = n_pred = 0
    for p, t in zip(pred, true):
        pairs = np.stack([t.ravel(), p.ravel()], 1)
        pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
        uniq, counts = np.unique(pairs, axis=0, return_counts=True)
        t_area = np.bincount(t.ravel())
        p_area = np.bincount(p.ravel())
        big_t = counts >= frac * t_area[uniq[:, 0]] if len(uniq) else np.zeros(0, bool)
        big_p = counts >= frac * p_area[uniq[:, 1]] if len(uniq) else np.zeros(0, bool)
        splits += int((np.bincount(uniq[big_t, 0]) >= 2).sum()) if big_t.any() else 0
        merges += int((np.bincount(uniq[big_p, 1]) >= 2).sum()) if big_p.any() else 0
        n_true += len(np.unique(t)) - 1
        n_pred += len(np.unique(p)) - 1
    return {"true_instances": n_true, "pred_instances": n_pred, "split_true": splits, "merged_pred": merges}


def oracle_swaps(run_dir, cache_dir, preset: str | None = None) -> list[dict]:
    """One row per map swap: P, R, DQ, SQ, PQ, mPQ+, AJI, instance counts, splits, merges."""
    from cellembed.evaluate._predict import Postprocess, batch_instances
    from cellembed.metrics import score_arrays

    run, batches = _predict(run_dir, cache_dir)
    post = run.post if preset is None else Postprocess("cisca", preset)
    true = np.concatenate([b[2] for b in batches])
    rows = []
    for name in SWAPS:
        preds = []
        for maps, gt, *_ in batches:
            m = dict(maps)
            m["classes"] = _swap_classes(name, maps["classes"], gt["classes"])
            if name in ("GT directional maps", "GT both (oracle)"):
                m["directions"] = gt["directions"]
            preds.append(batch_instances(m, post))
        pred = np.concatenate(preds)
        s = score_arrays(pred, true, num_classes=run.num_classes)["summary"]
        rows.append({"maps": name, **{k: s[k] for k in ("precision", "recall", "dq", "sq", "pq", "mpq_plus", "aji")},
                     **segmentation_errors(pred[..., 0], true[..., 0])})
    return rows


def overlay_grid(run_dir, cache_dir, path: Path, n: int = 4) -> Path:
    """PNG of ``n`` test tiles: truth / prediction contours, body probability and h map (pred vs target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from cellembed.evaluate._predict import batch_instances

    run, batches = _predict(run_dir, cache_dir)
    maps = {k: np.concatenate([b[0][k] for b in batches]) for k in batches[0][0]}
    gt = {k: np.concatenate([b[1][k] for b in batches]) for k in batches[0][1]}
    true = np.concatenate([b[2] for b in batches])
    images = np.concatenate([b[3] for b in batches])
    # the tiles with the most nuclei show touching cells best
    order = np.argsort([-len(np.unique(t[..., 0])) for t in true])[:n]
    cols = ("truth", "prediction", "P(body) predicted", "3-class target", "h map predicted", "h map target")
    fig, axes = plt.subplots(len(order), len(cols), figsize=(2.2 * len(cols), 2.2 * len(order)), squeeze=False)
    for r, i in enumerate(order):
        pred = batch_instances({k: v[i:i + 1] for k, v in maps.items()}, run.post)[0, ..., 0]
        panels = []
        for inst in (true[i, ..., 0], pred):
            img = images[i].copy()
            img[find_boundaries(inst, mode="inner")] = (0, 255, 0)
            panels.append(img)
        panels += [maps["classes"][i, 1], gt["classes"][i].argmax(0), maps["directions"][i, 0], gt["directions"][i, 0]]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            kw = {"vmin": -1, "vmax": 1, "cmap": "coolwarm"} if c >= 4 else ({"cmap": "viridis"} if c >= 2 else {})
            ax.imshow(panel, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r, 1].set_xlabel(f"{len(np.unique(pred)) - 1} predicted / {len(np.unique(true[i, ..., 0])) - 1} true",
                              fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def per_source_image(score_dir, group_regex: str = r"(.+)_\d+$") -> list[dict]:
    """PQ, DQ, SQ, P and R per source image of a ``score_run`` output (its per-tile counts regrouped).

    The tiles of one source image are pooled (their TP, FP, FN and IoU sums added; PQ = DQ × SQ of the
    pool), so one image with many nuclei counts as much as its nuclei, not as its tile count. Shows how
    much of a split's PQ comes from its hardest images.
    """
    import json
    import re

    score_dir = Path(score_dir)
    per_image = json.loads((score_dir / "metrics.json").read_text())["per_image"]
    keys = (score_dir / "keys.txt").read_text().split()
    pools: dict[str, dict] = {}
    for key, counts in zip(keys, per_image):
        match = re.fullmatch(group_regex, key)
        pool = pools.setdefault(match.group(1) if match else key, {"tiles": 0, "tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
        pool["tiles"] += 1
        for k in ("tp", "fp", "fn"):
            pool[k] += counts[k]
        pool["iou"] += counts["iou_sum"]
    rows = []
    for name, p in pools.items():
        tp, fp, fn = p["tp"], p["fp"], p["fn"]
        dq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else 0.0
        sq = p["iou"] / tp if tp else 0.0
        rows.append({"image": name, "tiles": p["tiles"], "true nuclei": tp + fn, "predicted": tp + fp, "pq": dq * sq,
                     "dq": dq, "sq": sq, "precision": tp / (tp + fp) if tp + fp else 0.0,
                     "recall": tp / (tp + fn) if tp + fn else 0.0})
    return sorted(rows, key=lambda r: r["pq"])


GRID = {"preset": ("40x", "20x"), "min_area": (24, 40, 60, 80), "contour_threshold": (0.45, 0.57, 0.7),
        "fg_threshold": (0.4, 0.5)}
"""CISCA post-processing constants ``postprocess_grid`` tries (the preset sets the structuring elements)."""


def postprocess_grid(run_dir, cache_dir, grid: dict = GRID) -> list[dict]:
    """PQ, DQ, SQ, mPQ+, P and R of a run's own maps under every combination of CISCA constants in ``grid``.

    The decoder runs once; each combination post-processes the same maps. Tells whether the post-processing's
    constants, rather than the maps, limit a run.
    """
    import itertools
    from dataclasses import replace

    from cellembed.metrics import image_counts, score_counts
    from cellembed.postprocess import CISCA_PRESETS, cisca_instances

    run, batches = _predict(run_dir, cache_dir)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    rows = []
    for combo in combos:
        params = replace(CISCA_PRESETS[combo["preset"]], **{k: v for k, v in combo.items() if k != "preset"})
        counts = []
        for maps, _, true, *_ in batches:
            for i in range(len(true)):
                typed = maps["types"][i] if "types" in maps else None
                inst, types = cisca_instances(maps["classes"][i], maps["directions"][i], typed, params)
                counts.append(image_counts(np.stack([inst, types], -1).astype(np.int32), true[i], run.num_classes))
        s = score_counts(counts, run.num_classes)["summary"]
        rows.append({**combo, **{k: s[k] for k in ("pq", "dq", "sq", "mpq_plus", "precision", "recall")}})
    return rows


def grid_report(args) -> None:
    """``grid``: the post-processing grid of a run on its validation and test caches."""
    try:
        from benchmarks._common import machine, write_results
    except ImportError:
        from _common import machine, write_results
    from cellembed.evaluate._run import load_run
    from cellembed.postprocess import CISCA_PRESETS

    post = load_run(args.run).post
    if post.head != "cisca":
        raise SystemExit(f"{args.run}: the grid tries CISCA post-processing constants; this run's head is "
                         f"{post.head!r} (train with --head cisca)")
    val, test = postprocess_grid(args.run, args.val_cache), postprocess_grid(args.run, args.test_cache)
    constants = CISCA_PRESETS[post.preset]
    preset = {"preset": post.preset, "min_area": post.effective_min_area,
              "contour_threshold": constants.contour_threshold, "fg_threshold": constants.fg_threshold}
    keys = list(GRID)
    table = [{**{k: v[k] for k in keys}, "run's setting": "yes" if all(v[k] == preset[k] for k in keys) else "",
              "val PQ": f"{v['pq']:.3f}", "test PQ": f"{t['pq']:.3f}", "test DQ": f"{t['dq']:.3f}",
              "test SQ": f"{t['sq']:.3f}", "test mPQ+": f"{t['mpq_plus']:.3f}"}
             for v, t in sorted(zip(val, test), key=lambda vt: -vt[0]["pq"])]
    description = (f"Run `{args.run}`: its own maps post-processed with every combination of CISCA constants "
                   f"({', '.join(f'{k} {v}' for k, v in GRID.items())}; the preset sets the structuring elements), "
                   "sorted by validation PQ. The run's own setting: "
                   + ", ".join(f"{k} {v}" for k, v in preset.items()) + ".")

    def plot(ax):
        ax.scatter([v["pq"] for v in val], [t["pq"] for t in test], s=12)
        ax.set_xlabel("validation PQ")
        ax.set_ylabel("test PQ")
        ax.set_title("post-processing constants: validation vs test PQ")

    write_results(args.name or "postprocess_grid_consep_cpu",
                  {"machine": machine(), "run": args.run, "val": val, "test": test, "description": description},
                  table, plot)


def foreground_errors(run_dir, cache_dir, path: Path, n: int = 4) -> Path:
    """Draw the test tiles at the worst, quartiles and best foreground Dice: image, foreground errors
    (white: both, red: predicted only, blue: missed), P(body)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, batches = _predict(run_dir, cache_dir)
    pred = np.concatenate([b[0]["classes"] for b in batches])
    gt = np.concatenate([b[1]["classes"] for b in batches])
    images = np.concatenate([b[3] for b in batches])
    fg_p, fg_t = pred[:, :2].sum(1) >= 0.5, gt[:, :2].sum(1) > 0.5
    has = np.flatnonzero(fg_t.any((1, 2)))
    dice = 2 * (fg_p & fg_t).sum((1, 2)) / np.maximum(fg_p.sum((1, 2)) + fg_t.sum((1, 2)), 1)
    order = has[np.argsort(dice[has])]
    picks = [order[round(q * (len(order) - 1))] for q in np.linspace(0, 1, n)]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n))
    for row, i in zip(axes, picks):
        err = np.zeros(fg_p[i].shape + (3,))
        err[fg_p[i] & fg_t[i]] = 1
        err[fg_p[i] & ~fg_t[i]] = (1, 0, 0)
        err[~fg_p[i] & fg_t[i]] = (0, 0.6, 1)
        image = images[i] if images[i].dtype == np.uint8 else np.clip(images[i], 0, 1)
        for ax, img, title in zip(row, (image, err, pred[i, 1]),
                                  (f"tile {i}: foreground Dice {dice[i]:.2f}", "white both, red predicted only, "
                                   "blue missed", "P(body) predicted")):
            ax.imshow(img, vmin=0, vmax=1) if img.ndim == 2 else ax.imshow(img)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def swaps_report(args) -> None:
    """``swaps``: oracle swaps of a run's maps on the test cache, and pixel Dice of its 3-class map on the
    training and test caches (foreground per source image too)."""
    try:
        from benchmarks._common import RESULTS, machine, write_results
    except ImportError:
        from _common import RESULTS, machine, write_results

    rows = oracle_swaps(args.run, args.test_cache)
    dice = {"test": pixel_dice(args.run, args.test_cache)}
    if args.train_cache:
        dice["train"] = pixel_dice(args.run, args.train_cache, training_tiles=True)
    table = [{"maps": r["maps"], "PQ": f"{r['pq']:.3f}", "DQ": f"{r['dq']:.3f}", "SQ": f"{r['sq']:.3f}",
              "precision": f"{r['precision']:.3f}", "recall": f"{r['recall']:.3f}",
              "pred / true nuclei": f"{r['pred_instances']} / {r['true_instances']}",
              "split / merged": f"{r['split_true']} / {r['merged_pred']}"} for r in rows]
    table += [{"maps": f"pixel Dice, {split}", "PQ": "", "DQ": "", "SQ": "",
               "precision": f"foreground {d['foreground']:.3f}", "recall": f"body {d['body']:.3f}",
               "pred / true nuclei": f"boundary {d['boundary']:.3f}",
               "split / merged": ", ".join(f"{g}: {v['foreground']:.2f}" for g, v in d["per_image"].items())
               if split == "test" else ""} for split, d in dice.items()]
    description = (f"Run `{args.run}` on the test cache `{args.test_cache}`: the decoder's maps post-processed as "
                   "they are, then with parts of the 3-class map or the directional maps replaced by the ground "
                   "truth's (foreground = boundary + body; boundary / body = where, inside the foreground, one "
                   "nucleus ends). The gap a swap closes is what that part of the maps costs. Last rows: pixel Dice "
                   "of the 3-class map (foreground as the post-processing reads it, P(boundary) + P(body) >= 0.5; "
                   "body and boundary by argmax) on the training and test tiles, and the test foreground Dice per "
                   "source image.")

    def plot(ax):
        ax.barh([r["maps"] for r in rows][::-1], [r["pq"] for r in rows][::-1])
        ax.set_xlabel("test PQ")
        ax.set_title("which maps cost the PQ")

    name = args.name or "swaps_consep_cpu"
    write_results(name, {"machine": machine(), "run": args.run, "swaps": rows, "pixel_dice": dice,
                         "description": description + f" `{name}_foreground.png`: test tiles from the worst to "
                         "the best foreground Dice, errors in colour."}, table, plot)
    foreground_errors(args.run, args.test_cache, RESULTS / f"{name}_foreground.png")


DYE_MAX_RGB = 90
"""A pixel whose brightest RGB channel is below this is near-black (tissue-marking dye in CoNSeP's train_2 and
train_4; no nucleus pixel of the 27 training images is that dark)."""


def _tile_images(keys: list[str], root: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(root / "images" / f"{k}.jpg").convert("RGB")) for k in keys])


def without_dye(pred: np.ndarray, images: np.ndarray, frac: float = 0.5) -> np.ndarray:
    """``pred`` ((N, T, T, 2) instance, type) without the instances that lie mostly (> ``frac``) on near-black
    pixels (``DYE_MAX_RGB``): what the split would score if the decoder never took dye for nuclei."""
    out = pred.copy()
    dark = images.max(-1) < DYE_MAX_RGB
    for i in range(len(out)):
        inst = out[i, ..., 0]
        ids, on_dark = np.unique(inst[dark[i]], return_counts=True)
        areas = np.bincount(inst.ravel(), minlength=int(inst.max()) + 1)
        for j, n in zip(ids, on_dark):
            if j and n > frac * areas[j]:
                out[i][inst == j] = 0
    return out


def without_border(maps: np.ndarray) -> np.ndarray:
    """``maps`` ((N, T, T, 2) instance, type) without the instances touching the tile's edge (zeroed in both
    channels): applied to truth and prediction alike, it scores the interior nuclei only, i.e. what the tile
    protocol costs against whole-image scoring, where a nucleus cut by a tile edge is whole."""
    out = maps.copy()
    for i in range(len(out)):
        inst = out[i, ..., 0]
        edge = np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]]))
        cut = np.isin(inst, edge[edge > 0])
        out[i][cut] = 0
    return out


def tile_report(args) -> None:
    """``tiles``: a scored run's test PQ tile by tile, grouped by source image (the split's PQ is the mean over
    tiles with at least one true nucleus, so sparse tiles weigh as much as dense ones), and the split's scores
    with the predictions on tissue-marking dye removed."""
    import json
    import re

    try:
        from benchmarks._common import REALDATA, machine, write_results
    except ImportError:
        from _common import REALDATA, machine, write_results
    from cellembed.metrics import score_arrays

    score = Path(args.score)
    root = Path(args.root) if args.root else REALDATA / "consep_tiles256"
    keys = (score / "keys.txt").read_text().split()
    per_tile = json.loads((score / "metrics.json").read_text())["per_image"]
    labels = np.load(root / "labels.npz")
    index = {str(n): i for i, n in enumerate(labels["names"])}
    rows_of = [index[k] for k in keys]
    true = np.stack([labels["inst"][rows_of], labels["cls"][rows_of]], -1).astype(np.int32)
    pred = np.load(score / "predictions.npy")
    images = _tile_images(keys, root)
    groups: dict[str, list] = {}
    for k, c in zip(keys, per_tile):
        if c["pq"] is not None and c["tp"] + c["fn"]:
            groups.setdefault(re.fullmatch(args.group_regex, k).group(1), []).append((c["tp"] + c["fn"], c["pq"]))
    scored = sum(len(v) for v in groups.values())
    table = []
    for g, v in sorted(groups.items(), key=lambda kv: np.mean([p for _, p in kv[1]])):
        sparse = [p for n, p in v if n < 5]
        table.append({"source image": g, "tiles scored": len(v), "true nuclei": sum(n for n, _ in v),
                      "mean tile PQ": f"{np.mean([p for _, p in v]):.3f}",
                      "tiles < 5 nuclei (mean PQ)": f"{len(sparse)} ({np.mean(sparse):.2f})" if sparse else "0",
                      "share of the split's PQ": f"{sum(p for _, p in v) / scored:.3f}"})
    splits = {"as predicted": score_arrays(pred, true, args.num_classes)["summary"],
              "dye predictions removed": score_arrays(without_dye(pred, images), true, args.num_classes)["summary"],
              "edge-touching nuclei removed (truth and prediction)":
                  score_arrays(without_border(pred), without_border(true), args.num_classes)["summary"]}
    table += [{"source image": f"split, {name}", "tiles scored": scored, "true nuclei": "",
               "mean tile PQ": f"{s['pq']:.3f}", "tiles < 5 nuclei (mean PQ)": f"mPQ+ {s['mpq_plus']:.3f}",
               "share of the split's PQ": f"DQ {s['dq']:.3f}, SQ {s['sq']:.3f}"} for name, s in splits.items()]
    description = (f"Scores of `{score}` tile by tile. The split's PQ is the mean of the per-tile PQ over the tiles "
                   "with at least one true nucleus (CISCA / Mind the Gap), so a tile with 2 true nuclei weighs as "
                   "much as one with 129; 'share of the split's PQ' is each source image's sum of tile PQs over the "
                   "number of tiles scored (the shares add up to the split's PQ). Last rows: the split scored as "
                   f"predicted, and with every predicted instance lying mostly on near-black pixels (max RGB < "
                   f"{DYE_MAX_RGB}: tissue-marking dye, which no training image shows) removed, and with every true and "
                   "predicted instance touching the tile's edge removed (interior nuclei only: the share of the PQ "
                   "lost to nuclei cut by the 256² tiling, which whole-image scoring does not cut).")

    def plot(ax):
        for g, v in groups.items():
            ax.scatter([n for n, _ in v], [p for _, p in v], s=14, label=g)
        ax.set_xscale("symlog", linthresh=5)
        ax.set_xlabel("true nuclei in the tile")
        ax.set_ylabel("tile PQ")
        ax.legend(fontsize=7)
        ax.set_title("per-tile PQ by source image")

    write_results(args.name or "tiles_consep_cpu", {"machine": machine(), "score": str(score), "rows": table,
                                                     "splits": splits, "description": description}, table, plot)


def main() -> None:
    """``python benchmarks/_diagnose.py grid RUN VAL_CACHE TEST_CACHE [--name NAME]``: the post-processing grid;
    ``python benchmarks/_diagnose.py swaps RUN TEST_CACHE [--train-cache TRAIN] [--name NAME]``: oracle swaps and
    pixel Dice; ``python benchmarks/_diagnose.py tiles SCORE_DIR [--name NAME]``: PQ tile by tile. Each writes
    ``results/<NAME>.{json,md,png}``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grid", help="CISCA post-processing constants over a run's own maps")
    g.add_argument("run")
    g.add_argument("val_cache")
    g.add_argument("test_cache")
    g.add_argument("--name", default=None)
    w = sub.add_parser("swaps", help="oracle swaps of a run's maps and pixel Dice of its 3-class map")
    w.add_argument("run")
    w.add_argument("test_cache")
    w.add_argument("--train-cache", default=None, help="the run's training cache: pixel Dice on training tiles too")
    w.add_argument("--name", default=None)
    t = sub.add_parser("tiles", help="a scored run's PQ tile by tile, and without its predictions on dye")
    t.add_argument("score", help="a `cellembed score` output folder (keys.txt, metrics.json, predictions.npy)")
    t.add_argument("--root", default=None, help="the CoNSeP tiles folder (default: realdata's consep_tiles256)")
    t.add_argument("--group-regex", default=r"(.+)_\d+$")
    t.add_argument("--num-classes", type=int, default=4)
    t.add_argument("--name", default=None)
    args = parser.parse_args()
    {"grid": grid_report, "swaps": swaps_report, "tiles": tile_report}[args.what](args)


if __name__ == "__main__":
    main()
