"""CISCA's oversampling of rare classes (CISCA.md §4.3, ``datasetscript/oversample_{pannuke,conic}3.py``).

Pure numpy: a table of per-tile instance counts per class in, the oversampled list of tile indices out.

    >>> counts = np.array([[0, 5, 0, 1], [0, 9, 1, 0], [0, 7, 0, 0], [0, 8, 2, 3]])
    >>> out = cisca_oversample(counts, OversampleScheme((1.0, 1.0), 100.0))
    >>> out.classes.tolist(), out.n_draws.tolist(), len(out.indices)
    ([2, 3], [4, 3], 11)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class OversampleScheme(NamedTuple):
    """One data set's constants.

    Attributes:
        multipliers: one factor per extra class, ordered from the rarest extra class to the commonest.
        percentile: per-tile counts of a class are clipped at this percentile before drawing.
    """

    multipliers: tuple[float, ...]
    percentile: float


OVERSAMPLE_SCHEMES = {
    "cisca-pannuke": OversampleScheme((1.0, 1.0, 1.0, 1.0), 98.5),
    "cisca-conic": OversampleScheme((1.6, 1.6, 0.9, 0.9, 0.9), 97.0),
}


class Oversampled(NamedTuple):
    """Result of :func:`cisca_oversample`.

    Attributes:
        indices: (N + sum(n_draws),) int64 tile indices: every tile once plus the draws, shuffled.
        classes: (E,) int64 the extra classes, rarest first.
        n_draws: (E,) int64 tiles drawn for each extra class (after the multipliers).
    """

    indices: np.ndarray
    classes: np.ndarray
    n_draws: np.ndarray


def instance_class_counts(inst_map: np.ndarray, type_map: np.ndarray, n_classes: int) -> np.ndarray:
    """Instances of each class in one tile; an instance's class is the maximum of ``type_map`` over its pixels.

    Args:
        inst_map: (H, W) non-negative integer, 0 = background.
        type_map: (H, W) integer in 0..n_classes.
        n_classes: K, the number of classes besides background.

    Returns:
        (K + 1,) int64; entry 0 counts instances whose pixels all have type 0.
    """
    inst = np.asarray(inst_map).ravel()
    typ = np.asarray(type_map).ravel().astype(np.int64)
    if inst.shape != typ.shape:
        raise ValueError(f"inst_map and type_map sizes differ: {inst.size} vs {typ.size}")
    fg = inst > 0
    if not fg.any():
        return np.zeros(n_classes + 1, np.int64)
    if typ.min(initial=0) < 0 or typ.max(initial=0) > n_classes:
        raise ValueError(f"type_map values span {typ.min()}..{typ.max()}, expected 0..{n_classes}")
    _, ids = np.unique(inst[fg], return_inverse=True)
    top = np.zeros(ids.max() + 1, np.int64)
    np.maximum.at(top, ids, typ[fg])
    return np.bincount(top, minlength=n_classes + 1).astype(np.int64)


def extra_classes(counts: np.ndarray) -> np.ndarray:
    """The classes CISCA oversamples: all but background (column 0) and the most frequent, rarest first.

    Args:
        counts: (N, K + 1) per-tile instance counts per class, column 0 = background.

    Returns:
        (K - 1,) int64 class indices ordered by total count (ties by class index).
    """
    totals = np.asarray(counts).sum(axis=0)
    order = np.argsort(totals[1:], kind="stable") + 1
    return order[:-1].astype(np.int64)


def cisca_oversample(counts: np.ndarray, scheme: OversampleScheme | str, seed: int = 5) -> Oversampled:
    """CISCA's oversampled training list (CISCA.md §4.3).

    1. Extra classes: see :func:`extra_classes` (CISCA drops the smallest total, background's 0, and the
       largest).
    2. For each extra class c: n_c = sqrt(total / count_c), rescaled so that the rarest class gets N (the
       number of tiles), times the scheme's multiplier, truncated to an integer.
    3. n_c tiles are drawn with replacement, with probability proportional to their count of class c clipped
       at the scheme's percentile (``np.percentile``, linear).
    4. The draws are appended to ``arange(N)`` and the whole list shuffled.

    Draws use one ``np.random.RandomState(seed)`` (the stream of ``np.random.seed(5)``): classes rarest first,
    ``choice`` per class, then ``shuffle``. The original scripts' exact call sequence is not published, so the
    multiset of indices follows the recipe but the lists need not equal the shipped folds.csv row for row.

    Args:
        counts: (N, K + 1) non-negative integer instance counts per tile and class, column 0 = background
            (see :func:`instance_class_counts`).
        scheme: an :class:`OversampleScheme` or a name in ``OVERSAMPLE_SCHEMES``.
        seed: RandomState seed (CISCA: 5).

    Raises:
        ValueError: a malformed table, a number of extra classes other than the multipliers', an extra class
            with no instance, or one whose clipped counts are all 0.
    """
    scheme = _scheme(scheme)
    counts = _check_counts(counts)
    classes = extra_classes(counts)
    if len(classes) != len(scheme.multipliers):
        raise ValueError(f"the scheme has {len(scheme.multipliers)} multipliers, for {len(scheme.multipliers) + 1} "
                         f"classes besides background; the counts have {counts.shape[1] - 1}")
    totals = counts.sum(axis=0).astype(np.float64)
    absent = [int(c) for c in classes if totals[c] == 0]
    if absent:
        raise ValueError(f"classes {absent} have no instance in any tile; oversampling them is undefined")
    n = np.sqrt(totals.sum() / totals[classes])
    n = (n / n[0] * len(counts) * np.asarray(scheme.multipliers)).astype(np.int64)
    rng = np.random.RandomState(seed)
    draws = [np.arange(len(counts), dtype=np.int64)]
    for c, n_c in zip(classes, n):
        weights = np.minimum(counts[:, c], np.percentile(counts[:, c], scheme.percentile))
        if weights.sum() <= 0:
            raise ValueError(f"class {c}: no tile has a count above 0 after clipping at the "
                             f"{scheme.percentile}th percentile")
        draws.append(rng.choice(len(counts), size=int(n_c), replace=True, p=weights / weights.sum()))
    indices = np.concatenate(draws).astype(np.int64)
    rng.shuffle(indices)
    return Oversampled(indices, classes, n)


def _scheme(scheme: OversampleScheme | str) -> OversampleScheme:
    if isinstance(scheme, OversampleScheme):
        return scheme
    if scheme not in OVERSAMPLE_SCHEMES:
        raise ValueError(f"unknown oversampling scheme {scheme!r}; valid: {', '.join(OVERSAMPLE_SCHEMES)}")
    return OVERSAMPLE_SCHEMES[scheme]


def _check_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 3:
        raise ValueError(f"counts must be (N >= 1, K + 1 >= 3) per tile and class, got shape {counts.shape}")
    if counts.dtype == bool or not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0:
        raise ValueError("counts must be non-negative integers")
    return counts.astype(np.int64)
