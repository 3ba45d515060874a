"""Per-image sufficient statistics from the overlap table: PQ counts, AJI, AJI+, Dice, per-class counts."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellembed.metrics import _kernels
from cellembed.metrics._table import Overlap, _compact, _overlap, flat

EPS = 1.0e-6  # hover_net's epsilon in the AJI / AJI+ IoU; it decides argmax ties and the assignment


class ImageCounts(NamedTuple):
    """Everything needed to rebuild every per-image value and every aggregate.

    Attributes:
        tp, fp, fn: int, instance matches at IoU > 0.5 on the instance channel.
        iou_sum: float, sum of IoU over the matched pairs.
        aji_inter, aji_union: int, AJI numerator and denominator (hover_net ``get_fast_aji``).
        ajip_inter, ajip_union: int, the same for AJI+ (Hungarian pairing).
        fg_true, fg_pred, fg_inter: int, foreground pixel counts for Dice.
        class_tp, class_fp, class_fn: (K,) int64, per class 1..K (index c - 1), matching each map's
            ``inst * (type == c)`` (CoNIC's per-pixel class split); empty when untyped.
        class_iou: (K,) float64 IoU sums per class.
        part_tp, part_fp, part_fn: int and part_iou: float, binary matching of the (instance, class)
            parts over all classes (PanNuke's ``binarize`` of the class channels, for bPQ); without types
            the instance channel itself.
    """

    tp: int
    fp: int
    fn: int
    iou_sum: float
    aji_inter: int
    aji_union: int
    ajip_inter: int
    ajip_union: int
    fg_true: int
    fg_pred: int
    fg_inter: int
    class_tp: np.ndarray
    class_fp: np.ndarray
    class_fn: np.ndarray
    class_iou: np.ndarray
    part_tp: int
    part_fp: int
    part_fn: int
    part_iou: float


def matches(ov: Overlap, keep: np.ndarray | None = None) -> np.ndarray:
    """(M,) bool: pairs with IoU > 0.5 strictly (2 * inter > union, exact in integers), among ``keep``."""
    hit = 2 * ov.inter > ov.union
    return hit if keep is None else hit & keep


def _unpaired_area(ov: Overlap, chosen: np.ndarray) -> int:
    """Areas of the true ids not in a chosen pair plus the predicted ids never chosen (AJI's union tail)."""
    used_p = np.unique(ov.pred[chosen])
    return int(ov.area_true[1:].sum() - ov.area_true[ov.true[chosen]].sum()
               + ov.area_pred[1:].sum() - ov.area_pred[used_p].sum())


def aji_terms(ov: Overlap) -> tuple[int, int]:
    """AJI: every true id takes its best-IoU prediction (ties to the lowest id); returns (ΣI, ΣU)."""
    iou = ov.inter / (ov.union + EPS)
    order = np.lexsort((ov.pred, -iou, ov.true))
    first = np.ones(order.size, bool)
    first[1:] = ov.true[order[1:]] != ov.true[order[:-1]]
    chosen = order[first]
    return int(ov.inter[chosen].sum()), int(ov.union[chosen].sum()) + _unpaired_area(ov, chosen)


def aji_plus_terms(ov: Overlap) -> tuple[int, int]:
    """AJI+: one-to-one pairs maximising total IoU (Hungarian), pairs with IoU > 0; returns (ΣI, ΣU).

    Pairs whose true and predicted ids overlap nothing else are taken directly; the rest go through
    ``linear_sum_assignment`` on their own (small) IoU matrix, which has the same optimum as the full one.
    """
    deg_t = np.bincount(ov.true, minlength=ov.area_true.size)
    deg_p = np.bincount(ov.pred, minlength=ov.area_pred.size)
    single = (deg_t[ov.true] == 1) & (deg_p[ov.pred] == 1)
    chosen = [np.flatnonzero(single)]
    rest = np.flatnonzero(~single)
    if rest.size:
        rows, r = np.unique(ov.true[rest], return_inverse=True)
        cols, c = np.unique(ov.pred[rest], return_inverse=True)
        iou = np.zeros((rows.size, cols.size))
        index = np.full((rows.size, cols.size), -1)
        iou[r, c] = ov.inter[rest] / (ov.union[rest] + EPS)
        index[r, c] = rest
        a, b = linear_sum_assignment(-iou)
        chosen.append(index[a, b][iou[a, b] > 0])
    chosen = np.concatenate(chosen)
    return int(ov.inter[chosen].sum()), int(ov.union[chosen].sum()) + _unpaired_area(ov, chosen)


def _pq_terms(ov: Overlap, hit: np.ndarray) -> tuple[int, int, int, float]:
    tp = int(hit.sum())
    iou_sum = float((ov.inter[hit] / ov.union[hit]).sum())
    return tp, ov.area_pred.size - 1 - tp, ov.area_true.size - 1 - tp, iou_sum


def _class_terms(g_flat, p_flat, true_type, pred_type, n_classes):
    """Per-class counts (K,) and the (instance, class) part matching, from compact instance maps."""
    k1 = n_classes + 1
    gk, g_keys = _compact(_kernels.class_keys(g_flat, true_type, k1))
    pk, p_keys = _compact(_kernels.class_keys(p_flat, pred_type, k1))
    ov = _overlap(gk, pk, g_keys.size - 1, p_keys.size - 1)
    cls_t, cls_p = g_keys % k1, p_keys % k1
    part = _pq_terms(ov, matches(ov))
    hit = matches(ov, cls_t[ov.true] == cls_p[ov.pred])
    tp = np.bincount(cls_t[ov.true[hit]], minlength=k1)[1:]
    iou = np.bincount(cls_t[ov.true[hit]], ov.inter[hit] / ov.union[hit], minlength=k1)[1:]
    n_t = np.bincount(cls_t[1:], minlength=k1)[1:]
    n_p = np.bincount(cls_p[1:], minlength=k1)[1:]
    return (tp, n_p - tp, n_t - tp, iou.astype(np.float64)), part


def image_counts_unchecked(pred: np.ndarray, true: np.ndarray, n_classes: int | None) -> ImageCounts:
    """``image_counts`` without validation: (H, W) or (H, W, 2) non-negative integer maps, types <= K.

    Takes the compiled one-pass path (``_fused.fused_counts``) unless ids or tables are too large for it."""
    from cellembed.metrics._fused import fused_counts

    fast = fused_counts(pred, true, n_classes)
    return fast if fast is not None else image_counts_numpy(pred, true, n_classes)


def image_counts_numpy(pred: np.ndarray, true: np.ndarray, n_classes: int | None) -> ImageCounts:
    """The numpy path of :func:`image_counts_unchecked` (any ids, sparse tables for huge id counts)."""
    typed = true.ndim == 3
    g, g_ids = _compact(flat(true[..., 0] if typed else true))
    p, p_ids = _compact(flat(pred[..., 0] if typed else pred))
    ov = _overlap(g, p, g_ids.size - 1, p_ids.size - 1)
    tp, fp, fn, iou_sum = _pq_terms(ov, matches(ov))
    fg = (int(ov.area_true[1:].sum()), int(ov.area_pred[1:].sum()), int(ov.inter.sum()))
    if typed:
        cls, part = _class_terms(g, p, flat(true[..., 1]), flat(pred[..., 1]), n_classes)
    else:
        empty = np.zeros(0, np.int64)
        cls, part = (empty, empty, empty, np.zeros(0)), (tp, fp, fn, iou_sum)
    return ImageCounts(tp, fp, fn, iou_sum, *aji_terms(ov), *aji_plus_terms(ov), *fg, *cls, *part)
