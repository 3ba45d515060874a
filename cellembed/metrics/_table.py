"""Validating wrappers around the kernels: compact relabelling and the sparse overlap table."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cellembed.metrics import _kernels

_DENSE_LIMIT = 1 << 24  # largest (n_true + 1) * (n_pred + 1) table built densely; beyond, a sorted sparse table


class Overlap(NamedTuple):
    """Sparse overlap table of two compact label maps (ids 0..n, 0 = background).

    Attributes:
        true: (M,) int64 ground-truth id (>= 1) of each overlapping pair.
        pred: (M,) int64 predicted id (>= 1) of each overlapping pair.
        inter: (M,) int64 pixels shared by the pair (> 0).
        area_true: (n_true + 1,) int64 pixels per ground-truth id; [0] counts background pixels.
        area_pred: (n_pred + 1,) int64 pixels per predicted id; [0] counts background pixels.
    """

    true: np.ndarray
    pred: np.ndarray
    inter: np.ndarray
    area_true: np.ndarray
    area_pred: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """(M,) int64 union of each pair."""
        return self.area_true[self.true] + self.area_pred[self.pred] - self.inter


def check_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Validate an integer, non-negative label array and return it (raises ValueError otherwise)."""
    labels = np.asarray(labels)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {labels.min()}")
    if labels.size and labels.dtype == np.uint64 and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} ids must fit in int64, got maximum {labels.max()}")
    return labels


def flat(labels: np.ndarray) -> np.ndarray:
    """(…) integer array -> (P,) C-contiguous int64 view or copy (the kernels' one signature)."""
    return np.ascontiguousarray(labels, dtype=np.int64).ravel()


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unchecked: (P,) int64 -> compact (P,) int64 and ids (n + 1,) int64 (see ``compact_labels``)."""
    top = int(values.max()) if values.size else 0
    if top <= 4 * values.size + 65536:
        return _kernels.compact_ids(values, top)
    uniq, inverse = np.unique(values, return_inverse=True)  # huge ids: sort instead of a lookup table
    if uniq[0] != 0:
        return inverse.astype(np.int64) + 1, np.concatenate([[0], uniq]).astype(np.int64)
    return inverse.astype(np.int64), uniq.astype(np.int64)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber positive ids to 1..n keeping their sorted order (hover_net ``remap_label(by_size=False)``).

    Args:
        labels: (H, W) any non-negative integer dtype; 0 = background (need not occur), ids arbitrary
            (ids above 4 * size + 65536 are ranked by sorting instead of a lookup table: slower, same result).

    Returns:
        compact: (H, W) int64 in 0..n; ids: (n + 1,) int64 with ``ids[k]`` the original id of k, ``ids[0] = 0``.

    Example:
        >>> compact_labels(np.array([[0, 7], [7, 3]]))[0].tolist()
        [[0, 2], [2, 1]]
    """
    labels = check_labels(labels)
    out, ids = _compact(flat(labels))
    return out.reshape(labels.shape), ids


def _overlap(true: np.ndarray, pred: np.ndarray, n_true: int, n_pred: int) -> Overlap:
    """Unchecked: compact flat int64 maps -> ``Overlap``."""
    if (n_true + 1) * (n_pred + 1) <= _DENSE_LIMIT:
        table = _kernels.overlap_counts(true, pred, n_true, n_pred)
        g, p = np.nonzero(table[1:, 1:])
        return Overlap(g + 1, p + 1, table[g + 1, p + 1], table.sum(1), table.sum(0))
    keys, counts = np.unique(true * (n_pred + 1) + pred, return_counts=True)
    g, p = np.divmod(keys, n_pred + 1)
    both = (g > 0) & (p > 0)
    return Overlap(g[both], p[both], counts[both], np.bincount(true, minlength=n_true + 1),
                   np.bincount(pred, minlength=n_pred + 1))


def overlap(true_inst: np.ndarray, pred_inst: np.ndarray) -> tuple[Overlap, np.ndarray, np.ndarray]:
    """Overlap table of two instance maps in one pass over the pixels.

    Args:
        true_inst: (H, W) non-negative integer instance ids, 0 = background; any ids, any order.
        pred_inst: (H, W) same shape.

    Returns:
        The ``Overlap`` in compact ids, and the (n + 1,) int64 original ids of the true and predicted maps.
    """
    true_inst, pred_inst = check_labels(true_inst, "true_inst"), check_labels(pred_inst, "pred_inst")
    if true_inst.shape != pred_inst.shape:
        raise ValueError(f"shapes differ: true {true_inst.shape} vs pred {pred_inst.shape}")
    g, g_ids = _compact(flat(true_inst))
    p, p_ids = _compact(flat(pred_inst))
    return _overlap(g, p, len(g_ids) - 1, len(p_ids) - 1), g_ids, p_ids
