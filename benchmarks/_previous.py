"""Implementations replaced by later work, kept only to be timed side by side with their successors.

``tables_before``: the pixel pass of ``cellembed.metrics._fused._tables`` before issue 15 (pixels read as (P, 1 or 2)
rows, a (P, 5) run buffer allocated per image); the tables are then filled by the same ``tables_from_runs``.
``fused_counts_before`` feeds it to the same statistics.
"""

from __future__ import annotations

import numba
import numpy as np

from cellembed.metrics._fused import counts_from_tables, tables_from_runs


@numba.njit(cache=True, nogil=True)
def tables_before(tr, pr, k1, bound):
    """Instance table (nt+1, np+1) and, for typed maps (``tr.shape[1] == 2``), the part table over compact
    (instance, class) parts. ``tr``, ``pr``: (P, 1 or 2) C-contiguous (instance[, type]) pixels.

    Two passes over the pixels: the id range, then runs of equal (true id, true type, predicted id, predicted
    type) in raster order, each id marked present once per run. Ids are then numbered in sorted order and the
    runs (a few per cent of the pixels) fill the dense tables.

    Returns (table, part_table, part_t_keys, part_p_keys); an empty table means "ids above ``bound``, negative
    ids, or a table above the dense limit: take the numpy path"."""
    n = tr.shape[0]
    typed = tr.shape[1] == 2
    empty = np.zeros((0, 0), np.int64)
    none = np.zeros(0, np.int64)
    top_t, top_p, low = 0, 0, 0
    for i in range(n):
        x, y = tr[i, 0], pr[i, 0]
        top_t = max(top_t, x)
        top_p = max(top_p, y)
        low = min(low, min(x, y))
    if low < 0 or top_t > bound or top_p > bound or n == 0:
        return empty, empty, none, none
    lut_t = np.zeros(top_t + 1, np.int64)
    lut_p = np.zeros(top_p + 1, np.int64)
    c = 1 if typed else 0
    runs = np.empty((n, 5), np.int64)  # x, type of x, y, type of y, pixels
    r = 0
    x0, tx0, y0, ty0 = tr[0, 0], tr[0, c], pr[0, 0], pr[0, c]
    count = 0
    for i in range(n):
        x, tx, y, ty = tr[i, 0], tr[i, c], pr[i, 0], pr[i, c]
        if x != x0 or y != y0 or tx != tx0 or ty != ty0:
            runs[r, 0], runs[r, 1], runs[r, 2], runs[r, 3], runs[r, 4] = x0, tx0, y0, ty0, count
            lut_t[x0], lut_p[y0] = 1, 1
            r += 1
            x0, tx0, y0, ty0, count = x, tx, y, ty, 0
        count += 1
    runs[r, 0], runs[r, 1], runs[r, 2], runs[r, 3], runs[r, 4] = x0, tx0, y0, ty0, count
    lut_t[x0], lut_p[y0] = 1, 1
    r += 1
    return tables_from_runs(runs, r, lut_t, lut_p, typed, k1)


def fused_counts_before(pred: np.ndarray, true: np.ndarray, n_classes: int | None):
    """``fused_counts`` as it was before issue 15 (same statistics, the previous pixel pass)."""
    typed = true.ndim == 3
    tr = np.ascontiguousarray(true).reshape(-1, 2 if typed else 1)
    pr = np.ascontiguousarray(pred).reshape(-1, 2 if typed else 1)
    k1 = (n_classes or 0) + 1
    return counts_from_tables(tables_before(tr, pr, k1, 4 * tr.shape[0] + 65536), typed, k1)
