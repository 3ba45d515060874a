"""Public scoring entry points: validation, the per-image loop and the JSON layout."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cellembed._parallel import map_threads
from cellembed.metrics._aggregate import class_table, image_values, pannuke, summary
from cellembed.metrics._image import ImageCounts, image_counts_unchecked
from cellembed.metrics._table import check_labels


def _check_pair(pred, true, num_classes, batched: bool) -> tuple[np.ndarray, np.ndarray, int | None]:
    pred, true = check_labels(pred, "pred"), check_labels(true, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    base = 3 if batched else 2
    if pred.ndim not in (base, base + 1) or (pred.ndim == base + 1 and pred.shape[-1] != 2):
        layout = "(N, H, W) or (N, H, W, 2)" if batched else "(H, W) or (H, W, 2)"
        raise ValueError(f"expected {layout} (instance[, type]) arrays, got shape {pred.shape}")
    if batched and pred.shape[0] < 1:
        raise ValueError("need at least one image (N >= 1)")
    typed = pred.ndim == base + 1
    if not typed:
        if num_classes is not None:
            raise ValueError("num_classes needs typed (..., 2) arrays")
        return pred, true, None
    top = int(max(pred[..., 1].max(initial=0), true[..., 1].max(initial=0)))
    if num_classes is None:
        return pred, true, top
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if top > num_classes:
        raise ValueError(f"type values must be <= num_classes={num_classes}, found {top}")
    return pred, true, int(num_classes)


def image_counts(pred: np.ndarray, true: np.ndarray, num_classes: int | None = None) -> ImageCounts:
    """Sufficient statistics of one image (matching, AJI, AJI+, Dice, per-class and part counts).

    Args:
        pred: (H, W) instance ids or (H, W, 2) (instance, type); any non-negative integer dtype,
            0 = background, ids arbitrary (non-contiguous, huge, no background pixel are all fine).
        true: same shape as ``pred``.
        num_classes: K for typed maps (types 0..K, 0 = none); default the largest type present.

    Returns:
        ``ImageCounts`` (class arrays have length K; empty for (H, W) maps).
    """
    pred, true, k = _check_pair(pred, true, num_classes, batched=False)
    return image_counts_unchecked(pred, true, k)


def score_arrays(pred: np.ndarray, true: np.ndarray, num_classes: int | None = None,
                 tissues: Sequence[str] | None = None) -> dict:
    """Score predicted against ground-truth instance (and type) maps with the official metrics.

    Matching: a predicted and a true instance match iff IoU > 0.5 strictly (one-to-one by construction).
    Ids are compacted internally, so any non-negative ids work. An instance's class is per pixel, as in
    CoNIC (``inst * (type == c)``) and PanNuke's channels: an instance whose pixels carry two types is two
    class parts; instance pixels of type 0 belong to no class. Values use the exact formulas without the
    official code's 1e-6 epsilons (differences < 1e-5); counts are exact.

    Args:
        pred: (N, H, W, 2) integer (instance, type) maps, or (N, H, W) instance maps (no class metrics).
        true: same shape as ``pred``.
        num_classes: K, classes 1..K; default the largest type present in either array. mPQ+ averages
            over all K, so pass the data set's K (CoNIC 6, PanNuke 5).
        tissues: (N,) tissue name per image; enables the PanNuke block.

    Returns:
        A JSON-ready dict; ``None`` marks an undefined value.

        - ``per_image``: one dict per image. ``tp``, ``fp``, ``fn``, ``iou_sum`` (instance channel);
          ``dq`` = TP/(TP+½FP+½FN) (= F1), ``sq`` = iou_sum/TP (0 if TP = 0), ``pq`` = DQ·SQ,
          ``precision`` = TP/(TP+FP), ``recall`` = TP/(TP+FN) (0 on a zero denominator); all five are
          None when both maps are empty. ``aji`` / ``aji_plus`` (hover_net; best-IoU pairing, ties to the
          lowest id / Hungarian pairing): None when both maps are empty, 0 when the prediction is empty.
          ``dice`` of the binary foregrounds: None when both are empty.
        - ``per_class``: {"1".."K": ``tp``, ``fp``, ``fn``, ``iou_sum`` summed over all images, and
          ``dq``, ``sq``, ``pq`` from those sums (CoNIC PQ+; None for a class absent everywhere)};
          empty for instance-only input.
        - ``summary``: ``pq``, ``dq``, ``sq``, ``precision``, ``recall``, ``aji``, ``aji_plus``, ``dice``
          = mean over the images with at least one true instance (CISCA / Mind the Gap; None if there
          are none). ``pq_conic`` = mean of ``pq`` over every image, an empty image counting 0 (CoNIC).
          ``mpq_plus`` = mean of ``per_class`` PQ over all K classes, an absent class counting 0 (CoNIC
          mPQ+); None without types.
        - ``pannuke`` (None without ``tissues``): PanNuke-metrics ``run.py``. Per image, bPQ of the
          class parts (``binarize``) and PQ per class, NaN where the true map (of that class) is empty;
          per-image mPQ = nanmean over classes. ``per_tissue``: {name: ``bpq``, ``mpq`` (nanmean over
          the tissue's images), ``n_images``}; ``bpq``, ``mpq`` = nanmean over tissues; ``per_class``:
          {"c": nanmean over images of the class PQ}. NaN is written as None.

    Raises:
        ValueError: on mismatched shapes, a non-integer dtype, negative ids, N < 1, types > K, or a
            ``tissues`` length other than N.
    """
    pred, true, k = _check_pair(pred, true, num_classes, batched=True)
    if tissues is not None and len(tissues) != pred.shape[0]:
        raise ValueError(f"tissues has {len(tissues)} entries for {pred.shape[0]} images")
    return score_counts(counts_many(pred, true, k), k, tissues)


def counts_many(pred: np.ndarray, true: np.ndarray, k: int | None, workers: int | None = None) -> list[ImageCounts]:
    """``image_counts_unchecked`` of every image of checked (N, H, W[, 2]) arrays, in order, on ``workers``
    threads (``map_threads``; default one per core, at most one per 8 images, so one thread below 16 images)."""
    n = pred.shape[0]
    workers = workers or max(1, min(os.cpu_count() or 1, n // 8))
    return map_threads(lambda i: image_counts_unchecked(pred[i], true[i], k), range(n), workers)


def score_counts(counts: Sequence[ImageCounts], num_classes: int | None = None,
                 tissues: Sequence[str] | None = None) -> dict:
    """The :func:`score_arrays` JSON from per-image :func:`image_counts` (for scoring image by image).

    Args:
        counts: one ``ImageCounts`` per image, all made with the same ``num_classes``.
        num_classes: the K they were made with (None for instance-only counts).
        tissues: (N,) tissue name per image; enables the PanNuke block.
    """
    if not counts:
        raise ValueError("need at least one image")
    if tissues is not None and len(tissues) != len(counts):
        raise ValueError(f"tissues has {len(tissues)} entries for {len(counts)} images")
    images = [image_values(c) for c in counts]
    per_class = class_table(counts, num_classes or 0)
    return {"per_image": images, "per_class": per_class, "summary": summary(images, per_class),
            "pannuke": None if tissues is None else pannuke(counts, tissues, num_classes or 0)}
