"""Plain numpy twins of the kernels, and a straightforward per-instance scorer written the official way.

The twins are the executable spec of ``_kernels.py``. ``image_counts_reference`` follows hover_net /
CoNIC / PanNuke-metrics (shared/METRICS.md §1): ``remap_label``, one boolean mask per instance, the
predicted ids under each true mask, IoU per overlapping pair, matching at IoU > 0.5, argmax for AJI and
``linear_sum_assignment`` on the full IoU matrix for AJI+, ``inst * (type == c)`` per class, PanNuke's
``binarize`` for the parts. Where the official code crashes (no background pixel, empty maps) it takes
the conventions of the fast path. It is slow on purpose: tests and ``benchmarks/score.py`` compare to it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellembed.metrics._image import EPS, ImageCounts


def compact_ids_np(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Twin of ``_kernels.compact_ids``: (P,) int64 -> (compact (P,) int64, ids (n + 1,) int64)."""
    uniq, inverse = np.unique(flat, return_inverse=True)
    ids = uniq if uniq.size and uniq[0] == 0 else np.concatenate([[0], uniq])
    return (inverse + (ids.size - uniq.size)).astype(np.int64), ids.astype(np.int64)


def class_keys_np(inst: np.ndarray, types: np.ndarray, n_types: int) -> np.ndarray:
    """Twin of ``_kernels.class_keys``."""
    return np.where((inst > 0) & (types > 0), inst * n_types + types, 0).astype(np.int64)


def overlap_counts_np(true: np.ndarray, pred: np.ndarray, n_true: int, n_pred: int) -> np.ndarray:
    """Twin of ``_kernels.overlap_counts``."""
    counts = np.bincount(true * (n_pred + 1) + pred, minlength=(n_true + 1) * (n_pred + 1))
    return counts.reshape(n_true + 1, n_pred + 1).astype(np.int64)


def remap_label(labels: np.ndarray) -> np.ndarray:
    """hover_net ``remap_label(by_size=False)``: ids 1..n in sorted order (also without a 0 pixel)."""
    out = np.zeros(labels.shape, np.int64)
    for new, old in enumerate(i for i in np.unique(labels) if i != 0):
        out[labels == old] = new + 1
    return out


def pairwise(true: np.ndarray, pred: np.ndarray):
    """Per-instance masks and (n_true, n_pred) intersection / union matrices (0 where no overlap)."""
    n_t, n_p = int(true.max(initial=0)), int(pred.max(initial=0))
    t_masks = [true == t for t in range(1, n_t + 1)]
    p_masks = [pred == p for p in range(1, n_p + 1)]
    inter, union = np.zeros((n_t, n_p), np.int64), np.zeros((n_t, n_p), np.int64)
    for t, t_mask in enumerate(t_masks):
        for p in np.unique(pred[t_mask]):
            if p == 0:
                continue
            p_mask = p_masks[p - 1]
            total = int(t_mask.sum() + p_mask.sum())
            inter[t, p - 1] = int((t_mask & p_mask).sum())
            union[t, p - 1] = total - inter[t, p - 1]
    areas = (np.array([m.sum() for m in t_masks], np.int64), np.array([m.sum() for m in p_masks], np.int64))
    return inter, union, areas


def pq_reference(true: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, float]:
    """hover_net ``get_fast_pq`` counts on remapped maps: (TP, FP, FN, sum of matched IoU)."""
    inter, union, _ = pairwise(remap_label(true), remap_label(pred))
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    paired = iou > 0.5
    tp = int(paired.sum())
    return tp, inter.shape[1] - tp, inter.shape[0] - tp, float(iou[paired].sum())


def _aji(inter, union, areas, pairs_t, pairs_p) -> tuple[int, int]:
    """Sum the chosen pairs, then add every unpaired true and never-chosen predicted area."""
    total_i, total_u = int(inter[pairs_t, pairs_p].sum()), int(union[pairs_t, pairs_p].sum())
    used_t, used_p = set(pairs_t.tolist()), set(pairs_p.tolist())
    total_u += int(sum(a for t, a in enumerate(areas[0]) if t not in used_t))
    total_u += int(sum(a for p, a in enumerate(areas[1]) if p not in used_p))
    return total_i, total_u


def aji_reference(true: np.ndarray, pred: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """hover_net ``get_fast_aji`` and ``get_fast_aji_plus`` as (ΣI, ΣU) each (no prediction: 0 / ΣGT)."""
    inter, union, areas = pairwise(remap_label(true), remap_label(pred))
    iou = inter / (union + EPS)
    if iou.shape[1] == 0:
        none = np.zeros(0, np.int64)
        return _aji(inter, union, areas, none, none), _aji(inter, union, areas, none, none)
    best, best_iou = np.argmax(iou, axis=1), np.max(iou, axis=1)
    keep = np.nonzero(best_iou > 0.0)[0]
    aji = _aji(inter, union, areas, keep, best[keep])
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0.0
    return aji, _aji(inter, union, areas, rows[keep], cols[keep])


def binarize(inst: np.ndarray, types: np.ndarray, n_classes: int) -> np.ndarray:
    """PanNuke ``binarize`` of the class channels ``inst * (types == c)``, c = 1..K, numbered in order."""
    out, offset = np.zeros(inst.shape, np.int64), 0
    for c in range(1, n_classes + 1):
        channel = remap_label(inst * (types == c))
        out[channel > 0] = channel[channel > 0] + offset
        offset += int(channel.max(initial=0))
    return out


def image_counts_reference(pred: np.ndarray, true: np.ndarray, n_classes: int | None = None) -> ImageCounts:
    """Straightforward per-instance twin of ``image_counts`` (same arguments, same result)."""
    typed = true.ndim == 3
    t_inst, p_inst = (true[..., 0], pred[..., 0]) if typed else (true, pred)
    tp, fp, fn, iou_sum = pq_reference(t_inst, p_inst)
    aji, aji_plus = aji_reference(t_inst, p_inst)
    fg_t, fg_p = t_inst > 0, p_inst > 0
    fg = (int(fg_t.sum()), int(fg_p.sum()), int((fg_t & fg_p).sum()))
    if not typed:
        cls = [np.zeros(0, np.int64)] * 3 + [np.zeros(0)]
        return ImageCounts(tp, fp, fn, iou_sum, *aji, *aji_plus, *fg, *cls, tp, fp, fn, iou_sum)
    per = [pq_reference(t_inst * (true[..., 1] == c), p_inst * (pred[..., 1] == c))
           for c in range(1, n_classes + 1)]
    cls = [np.array([x[i] for x in per], np.int64) for i in range(3)] + [np.array([x[3] for x in per], float)]
    part = pq_reference(binarize(t_inst, true[..., 1], n_classes), binarize(p_inst, pred[..., 1], n_classes))
    return ImageCounts(tp, fp, fn, iou_sum, *aji, *aji_plus, *fg, *cls, *part)


def _disc(canvas: np.ndarray, cy: float, cx: float, r: float, value, half: int = 0) -> None:
    """Paint a disc (or, with half = ±1, one half of it) into ``canvas`` in place."""
    h, w = canvas.shape[:2]
    y0, y1, x0, x1 = max(int(cy - r), 0), min(int(cy + r) + 2, h), max(int(cx - r), 0), min(int(cx + r) + 2, w)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if half:
        inside &= (xx - cx) * half >= 0
    canvas[y0:y1, x0:x1][inside] = value


def random_pair(rng: np.random.Generator, size: int = 64, n_cells: int = 12, n_classes: int = 3,
                radius: tuple[float, float] = (3.0, 9.0), scramble: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Seeded adversarial (pred, true) pair, each (size, size, 2) int64 (instance, type).

    Touching and overlapping discs; the prediction shifts, resizes, drops, splits and merges cells, adds
    false positives, flips types (also on half a cell or to 0), then, with ``scramble``, ids are scrambled
    (huge, non-contiguous, sometimes no background pixel).
    """
    true, pred = np.zeros((size, size, 2), np.int64), np.zeros((size, size, 2), np.int64)
    for i in range(1, n_cells + 1):
        cy, cx, r, t = *rng.uniform(0, size, 2), rng.uniform(*radius), rng.integers(1, n_classes + 1)
        _disc(true, cy, cx, r, (i, t))
        u = rng.random()
        pt = t if rng.random() < 0.8 else rng.integers(0, n_classes + 1)
        if u < 0.1:
            continue
        if u < 0.2:  # split into two halves
            _disc(pred, cy, cx, r, (i, pt), half=1)
            _disc(pred, cy, cx, r, (n_cells + i, rng.integers(1, n_classes + 1)), half=-1)
            continue
        dy, dx, dr = *rng.integers(-3, 4, 2), rng.uniform(-1.5, 1.5)
        label = i - 1 if (u < 0.3 and i > 1) else i  # merge with the previous cell's id
        _disc(pred, cy + dy, cx + dx, max(r + dr, 1.0), (label, pt))
        if rng.random() < 0.1:  # half the cell gets another type
            _disc(pred[..., 1], cy + dy, cx + dx, max(r + dr, 1.0), rng.integers(0, n_classes + 1), half=1)
    for j in range(rng.integers(0, 4)):  # false positives
        _disc(pred, *rng.uniform(0, size, 2), rng.uniform(*radius), (3 * n_cells + j, rng.integers(1, n_classes + 1)))
    return (_scramble(rng, pred), _scramble(rng, true)) if scramble else (pred, true)


def _scramble(rng: np.random.Generator, maps: np.ndarray) -> np.ndarray:
    """Map ids to random distinct large values; sometimes fill the background with one more instance."""
    inst = maps[..., 0]
    if rng.random() < 0.15:
        inst[inst == 0] = inst.max() + 1
    top = int(inst.max()) + 1
    new = np.sort(rng.choice(2**40 if rng.random() < 0.5 else 4 * top + 8, size=top, replace=False))
    new = rng.permutation(new) if rng.random() < 0.5 else new
    keep_zero = (inst == 0).any()
    out = maps.copy()
    out[..., 0] = np.where(inst == 0, 0, new[inst] + 1) if keep_zero else new[inst] + 1
    return out
