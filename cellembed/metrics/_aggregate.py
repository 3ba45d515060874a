"""From per-image ``ImageCounts`` to the JSON layout: per-image values and every named aggregate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellembed.metrics._image import ImageCounts

_BINARY = ("pq", "dq", "sq", "precision", "recall", "aji", "aji_plus", "dice")


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def pq_parts(tp: int, fp: int, fn: int, iou_sum: float) -> tuple[float, float, float] | None:
    """(DQ, SQ, PQ) without epsilons; SQ = 0 when TP = 0; None when TP = FP = FN = 0."""
    if tp + fp + fn == 0:
        return None
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return float(dq), float(sq), float(dq * sq)


def image_values(c: ImageCounts) -> dict:
    """The ``per_image`` entry of one image (see ``score_arrays``)."""
    dsp = pq_parts(c.tp, c.fp, c.fn, c.iou_sum)
    out = {"tp": c.tp, "fp": c.fp, "fn": c.fn, "iou_sum": float(c.iou_sum),
           "precision": None if dsp is None else (_ratio(c.tp, c.tp + c.fp) or 0.0),
           "recall": None if dsp is None else (_ratio(c.tp, c.tp + c.fn) or 0.0)}
    out.update(zip(("dq", "sq", "pq"), dsp or (None, None, None)))
    out["aji"] = _ratio(c.aji_inter, c.aji_union)
    out["aji_plus"] = _ratio(c.ajip_inter, c.ajip_union)
    out["dice"] = _ratio(2 * c.fg_inter, c.fg_true + c.fg_pred)
    return out


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _nanmean(values) -> float:
    values = np.asarray(list(values), float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def class_table(counts: Sequence[ImageCounts], n_classes: int) -> dict:
    """``per_class``: TP / FP / FN / IoU sums pooled over all images, then DQ, SQ, PQ per class."""
    out = {}
    for k in range(n_classes):
        tp, fp, fn = (int(sum(getattr(c, f)[k] for c in counts)) for f in ("class_tp", "class_fp", "class_fn"))
        iou = float(sum(c.class_iou[k] for c in counts))
        dsp = pq_parts(tp, fp, fn, iou) or (None, None, None)
        out[str(k + 1)] = {"tp": tp, "fp": fp, "fn": fn, "iou_sum": iou, **dict(zip(("dq", "sq", "pq"), dsp))}
    return out


def summary(images: Sequence[dict], per_class: dict) -> dict:
    """``summary``: means over images with ground truth, ``pq_conic`` over all, ``mpq_plus`` over classes."""
    with_gt = [im for im in images if im["tp"] + im["fn"] > 0]
    out = {key: _mean(im[key] for im in with_gt) for key in _BINARY}
    out["pq_conic"] = _mean(im["pq"] or 0.0 for im in images)
    out["mpq_plus"] = _mean(v["pq"] or 0.0 for v in per_class.values())
    return out


def _pannuke_pq(tp: int, fp: int, fn: int, iou_sum: float) -> float:
    return float("nan") if tp + fn == 0 else pq_parts(tp, fp, fn, iou_sum)[2]


def pannuke(counts: Sequence[ImageCounts], tissues: Sequence[str], n_classes: int) -> dict:
    """PanNuke-metrics ``run.py``: per-image bPQ / class PQ (NaN without GT), tissue means, mean of tissues."""
    bpq = np.array([_pannuke_pq(c.part_tp, c.part_fp, c.part_fn, c.part_iou) for c in counts])
    cls = np.array([[_pannuke_pq(c.class_tp[k], c.class_fp[k], c.class_fn[k], c.class_iou[k])
                     for k in range(n_classes)] for c in counts]).reshape(len(counts), n_classes)
    mpq = np.array([_nanmean(row) for row in cls])
    tissues = np.asarray([str(t) for t in tissues])
    per_tissue = {}
    for name in sorted(set(tissues.tolist())):
        sel = tissues == name
        per_tissue[name] = {"bpq": _nanmean(bpq[sel]), "mpq": _nanmean(mpq[sel]), "n_images": int(sel.sum())}
    out = {"bpq": _nanmean(t["bpq"] for t in per_tissue.values()),
           "mpq": _nanmean(t["mpq"] for t in per_tissue.values()),
           "per_class": {str(k + 1): _nanmean(cls[:, k]) for k in range(n_classes)},
           "per_tissue": per_tissue}
    if n_classes == 0:
        out["mpq"] = float("nan")
        for t in per_tissue.values():
            t["mpq"] = float("nan")
    return _nan_to_none(out)


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and np.isnan(obj):
        return None
    return obj
