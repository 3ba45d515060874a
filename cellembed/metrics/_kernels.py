"""Numba kernels for scoring: plain int64 arrays in and out, one pass over the pixels each.

Each kernel has a numpy twin in ``_reference.py`` (the executable spec) and is called only through the
validating wrappers in ``_table.py``. Inputs are flattened, C-contiguous int64 arrays.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def compact_ids(flat, max_id):
    """Renumber the positive values of ``flat`` to 1..n in sorted order, keeping 0 as 0.

    Args:
        flat: (P,) int64, values in [0, max_id].
        max_id: int, an upper bound of ``flat`` (the lookup table has max_id + 1 entries).

    Returns:
        compact: (P,) int64 in 0..n; ids: (n + 1,) int64, ``ids[k]`` = the original value of new id k
        (``ids[0] = 0``).
    """
    lut = np.zeros(max_id + 1, np.int64)
    for i in range(flat.size):
        lut[flat[i]] = 1
    n = 0
    for v in range(1, max_id + 1):
        if lut[v]:
            n += 1
            lut[v] = n
    ids = np.zeros(n + 1, np.int64)
    for v in range(1, max_id + 1):
        if lut[v]:
            ids[lut[v]] = v
    lut[0] = 0
    out = np.empty(flat.size, np.int64)
    for i in range(flat.size):
        out[i] = lut[flat[i]]
    return out, ids


@numba.njit(cache=True, nogil=True)
def class_keys(inst, types, n_types):
    """Key of each pixel's (instance, class) part: ``inst * n_types + type``, 0 where either is 0.

    Args:
        inst: (P,) int64 compact instance ids.
        types: (P,) int64 class ids in [0, n_types).
        n_types: int, number of classes + 1.

    Returns:
        (P,) int64 keys; ``key % n_types`` is the class, ``key // n_types`` the instance.
    """
    out = np.zeros(inst.size, np.int64)
    for i in range(inst.size):
        if inst[i] > 0 and types[i] > 0:
            out[i] = inst[i] * n_types + types[i]
    return out


@numba.njit(cache=True, nogil=True)
def overlap_counts(true, pred, n_true, n_pred):
    """Contingency table of two compact label maps in one pass.

    Args:
        true: (P,) int64 in 0..n_true.
        pred: (P,) int64 in 0..n_pred.

    Returns:
        (n_true + 1, n_pred + 1) int64, entry [g, p] = number of pixels with true == g and pred == p.
    """
    table = np.zeros((n_true + 1, n_pred + 1), np.int64)
    for i in range(true.size):
        table[true[i], pred[i]] += 1
    return table
