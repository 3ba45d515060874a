"""One compiled pass per image: every per-image statistic of ``image_counts`` without numpy temporaries.

The numpy path (``_image.py`` over ``_table.py``) builds the overlap table, then derives PQ, AJI, AJI+ and the
class counts with a few dozen array operations; at 256² and ~40 cells those calls, not the pixels, are most of
the time. Here a few numba functions read the instance and type maps as (P, 1 or 2) pixel rows in their own
integer dtype (no int64 copies; a copy only for a strided view), make two passes over the pixels (the id
range, then runs of equal labels), compact the ids with lookup tables, fill the dense instance and
(instance, class)-part overlap tables from the runs, and walk their non-zero entries for every statistic. Only AJI+'s
Hungarian pairing of the ambiguous pairs (true or predicted ids overlapping more than one partner) goes back to
``scipy.optimize.linear_sum_assignment``, on the same small IoU matrix as the numpy path.

Same definitions, same tie rules, same float formulas as ``_image.py`` (which stays the fallback for ids above
the lookup-table bound and for tables above the dense limit); ``tests/test_metrics.py`` asserts identical
``ImageCounts`` on adversarial pairs.
"""

from __future__ import annotations

import sys

import numba
import numpy as np
from scipy.optimize import linear_sum_assignment

EPS = 1.0e-6  # as _image.EPS (hover_net's AJI epsilon)
_DENSE_LIMIT = 1 << 22  # cells of a dense overlap table built here (int64: 32 MB); beyond, the numpy path


@numba.njit(cache=True, nogil=True)
def _number(lut):
    """Present ids (lut[v] = 1) → 1..n in sorted order, in place; returns the original id of each new id."""
    n = 0
    for v in range(1, lut.size):
        if lut[v]:
            n += 1
            lut[v] = n
    ids = np.zeros(n + 1, np.int64)
    for v in range(1, lut.size):
        if lut[v]:
            ids[lut[v]] = v
    lut[0] = 0
    return ids


@numba.njit(cache=True, nogil=True, inline="always")
def _unpack(v, typed):
    """(instance id, type) of one packed pixel: typed pixels are int64 holding the int32 pair (id in the low
    32 bits, little-endian), untyped ones the id itself."""
    w = np.int64(v)
    if typed:
        return (w << 32) >> 32, w >> 32
    return w, w - w


@numba.njit(cache=True, nogil=True)
def _tables(tk, pk, typed, k1, bound):
    """Instance table (nt+1, np+1) and, for typed maps, the part table over compact (instance, class) parts.
    ``tk``, ``pk``: (P,) C-contiguous pixels, packed as ``_unpack`` reads them (one int64 compare per pixel
    decides whether a run goes on, which keeps both pixel loops branch-light).

    Two passes over the pixels: the id range and the number of runs, then the runs of equal (true id, true
    type, predicted id, predicted type) in raster order, each id marked present once per run. Ids are then
    numbered in sorted order and the runs (a few per cent of the pixels) fill the dense tables.

    Returns (table, part_table, part_t_keys, part_p_keys); an empty table means "ids above ``bound``, negative
    ids, or a table above the dense limit: take the numpy path"."""
    n = tk.shape[0]
    empty = np.zeros((0, 0), np.int64)
    none = np.zeros(0, np.int64)
    if n == 0:
        return empty, empty, none, none
    top_t, top_p, low = 0, 0, 0
    n_runs = 1
    a0, b0 = tk[0], pk[0]
    for i in range(n):
        a, b = tk[i], pk[i]
        x, _ = _unpack(a, typed)
        y, _ = _unpack(b, typed)
        top_t = max(top_t, x)
        top_p = max(top_p, y)
        low = min(low, min(x, y))
        n_runs += (a != a0) | (b != b0)
        a0, b0 = a, b
    if low < 0 or top_t > bound or top_p > bound:
        return empty, empty, none, none
    lut_t = np.zeros(top_t + 1, np.int64)
    lut_p = np.zeros(top_p + 1, np.int64)
    runs = np.empty((n_runs, 5), np.int64)  # x, type of x, y, type of y, pixels (sized by the first pass)
    r = 0
    a0, b0 = tk[0], pk[0]
    count = 0
    for i in range(n):
        a, b = tk[i], pk[i]
        if a != a0 or b != b0:
            x0, tx0 = _unpack(a0, typed)
            y0, ty0 = _unpack(b0, typed)
            runs[r, 0], runs[r, 1], runs[r, 2], runs[r, 3], runs[r, 4] = x0, tx0, y0, ty0, count
            lut_t[x0], lut_p[y0] = 1, 1
            r += 1
            a0, b0, count = a, b, 0
        count += 1
    x0, tx0 = _unpack(a0, typed)
    y0, ty0 = _unpack(b0, typed)
    runs[r, 0], runs[r, 1], runs[r, 2], runs[r, 3], runs[r, 4] = x0, tx0, y0, ty0, count
    lut_t[x0], lut_p[y0] = 1, 1
    r += 1
    return tables_from_runs(runs, r, lut_t, lut_p, typed, k1)


@numba.njit(cache=True, nogil=True)
def tables_from_runs(runs, r, lut_t, lut_p, typed, k1):
    """``_tables``' output from its first ``r`` runs (rows x, type of x, y, type of y, pixels) and the presence
    lookup tables ``lut_t`` / ``lut_p`` (1 where an id occurs): ids numbered in sorted order, then the dense
    instance table and, for typed maps, the part table filled from the runs."""
    empty = np.zeros((0, 0), np.int64)
    none = np.zeros(0, np.int64)
    ids_t, ids_p = _number(lut_t), _number(lut_p)
    nt, np_ = ids_t.size - 1, ids_p.size - 1
    if (nt + 1) * (np_ + 1) > _DENSE_LIMIT:
        return empty, empty, none, none
    table = np.zeros((nt + 1, np_ + 1), np.int64)
    for j in range(r):
        table[lut_t[runs[j, 0]], lut_p[runs[j, 2]]] += runs[j, 4]
    if not typed:
        return table, empty, none, none
    key_t = np.zeros((nt + 1) * k1, np.int64)
    key_p = np.zeros((np_ + 1) * k1, np.int64)
    for j in range(r):
        t, p = lut_t[runs[j, 0]], lut_p[runs[j, 2]]
        if t > 0 and runs[j, 1] > 0:
            key_t[t * k1 + runs[j, 1]] = 1
        if p > 0 and runs[j, 3] > 0:
            key_p[p * k1 + runs[j, 3]] = 1
    parts_t, parts_p = _number(key_t), _number(key_p)
    if parts_t.size * parts_p.size > _DENSE_LIMIT:
        return empty, empty, none, none
    part = np.zeros((parts_t.size, parts_p.size), np.int64)
    for j in range(r):
        t, p = lut_t[runs[j, 0]], lut_p[runs[j, 2]]
        a = key_t[t * k1 + runs[j, 1]] if t > 0 and runs[j, 1] > 0 else 0
        b = key_p[p * k1 + runs[j, 3]] if p > 0 and runs[j, 3] > 0 else 0
        if a > 0 or b > 0:
            part[a, b] += runs[j, 4]
    return table, part, parts_t, parts_p


@numba.njit(cache=True, nogil=True)
def _pairs(table):
    """Non-zero foreground entries in row-major order (true id, then predicted id) and both area vectors."""
    nt, np_ = table.shape[0] - 1, table.shape[1] - 1
    area_t = np.zeros(nt + 1, np.int64)
    area_p = np.zeros(np_ + 1, np.int64)
    m = 0
    for g in range(nt + 1):
        for p in range(np_ + 1):
            v = table[g, p]
            area_t[g] += v
            area_p[p] += v
            if g > 0 and p > 0 and v > 0:
                m += 1
    gs, ps, inter = np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m, np.int64)
    k = 0
    for g in range(1, nt + 1):
        for p in range(1, np_ + 1):
            if table[g, p] > 0:
                gs[k], ps[k], inter[k] = g, p, table[g, p]
                k += 1
    return gs, ps, inter, area_t, area_p


@numba.njit(cache=True, nogil=True)
def _pq(gs, ps, inter, area_t, area_p):
    """(tp, fp, fn, iou_sum) of IoU > 0.5 matching (2 · inter > union)."""
    tp, iou_sum = 0, 0.0
    for k in range(gs.size):
        union = area_t[gs[k]] + area_p[ps[k]] - inter[k]
        if 2 * inter[k] > union:
            tp += 1
            iou_sum += inter[k] / union
    return tp, area_p.size - 1 - tp, area_t.size - 1 - tp, iou_sum


@numba.njit(cache=True, nogil=True)
def _unpaired(area_t, area_p, chosen_t, chosen_p):
    """Areas of the true ids not chosen plus the predicted ids never chosen (AJI's union tail)."""
    rest = 0
    for g in range(1, area_t.size):
        if not chosen_t[g]:
            rest += area_t[g]
    for p in range(1, area_p.size):
        if not chosen_p[p]:
            rest += area_p[p]
    return rest


@numba.njit(cache=True, nogil=True)
def _aji(gs, ps, inter, area_t, area_p):
    """AJI (hover_net ``get_fast_aji``): each true id's best-IoU pair, ties to the lowest predicted id."""
    nt = area_t.size - 1
    best = np.full(nt + 1, -1, np.int64)
    best_iou = np.zeros(nt + 1)
    for k in range(gs.size):  # row-major: within a true id, predicted ids ascend, so '>' keeps the lowest on ties
        union = area_t[gs[k]] + area_p[ps[k]] - inter[k]
        iou = inter[k] / (union + EPS)
        if best[gs[k]] < 0 or iou > best_iou[gs[k]]:
            best[gs[k]], best_iou[gs[k]] = k, iou
    chosen_t = np.zeros(nt + 1, np.bool_)
    chosen_p = np.zeros(area_p.size, np.bool_)
    num, den = 0, 0
    for g in range(1, nt + 1):
        k = best[g]
        if k >= 0:
            chosen_t[g], chosen_p[ps[k]] = True, True
            num += inter[k]
            den += area_t[gs[k]] + area_p[ps[k]] - inter[k]
    return num, den + _unpaired(area_t, area_p, chosen_t, chosen_p)


@numba.njit(cache=True, nogil=True)
def _aji_plus_singles(gs, ps, inter, area_t, area_p):
    """AJI+ pairs that need no assignment (their true and predicted ids overlap nothing else): their (ΣI, ΣU)
    and chosen masks, plus the indices of the other pairs (for the Hungarian step)."""
    deg_t = np.zeros(area_t.size, np.int64)
    deg_p = np.zeros(area_p.size, np.int64)
    for k in range(gs.size):
        deg_t[gs[k]] += 1
        deg_p[ps[k]] += 1
    chosen_t = np.zeros(area_t.size, np.bool_)
    chosen_p = np.zeros(area_p.size, np.bool_)
    num, den, n_rest = 0, 0, 0
    for k in range(gs.size):
        if deg_t[gs[k]] == 1 and deg_p[ps[k]] == 1:
            chosen_t[gs[k]], chosen_p[ps[k]] = True, True
            num += inter[k]
            den += area_t[gs[k]] + area_p[ps[k]] - inter[k]
        else:
            n_rest += 1
    rest = np.empty(n_rest, np.int64)
    r = 0
    for k in range(gs.size):
        if not (deg_t[gs[k]] == 1 and deg_p[ps[k]] == 1):
            rest[r] = k
            r += 1
    return num, den, chosen_t, chosen_p, rest


@numba.njit(cache=True, nogil=True)
def _ajip_matrix(gs, ps, inter, area_t, area_p, rest):
    """The IoU matrix (true ids × predicted ids of the ambiguous pairs ``rest``, both ascending) that AJI+'s
    Hungarian step solves, and the pair index of each cell (-1: no overlap)."""
    row = np.full(area_t.size, -1, np.int64)
    col = np.full(area_p.size, -1, np.int64)
    for k in rest:
        row[gs[k]] = 0
        col[ps[k]] = 0
    nr, nc = 0, 0
    for g in range(area_t.size):
        if row[g] == 0:
            row[g] = nr
            nr += 1
    for q in range(area_p.size):
        if col[q] == 0:
            col[q] = nc
            nc += 1
    iou = np.zeros((nr, nc))
    index = np.full((nr, nc), -1, np.int64)
    for k in rest:
        union = area_t[gs[k]] + area_p[ps[k]] - inter[k]
        iou[row[gs[k]], col[ps[k]]] = inter[k] / (union + EPS)
        index[row[gs[k]], col[ps[k]]] = k
    return iou, index


@numba.njit(cache=True, nogil=True)
def _ajip_finish(a, b, iou, index, gs, ps, inter, area_t, area_p, chosen_t, chosen_p, num, den):
    """Add the Hungarian pairs with IoU > 0 to the singles' (ΣI, ΣU), then the unpaired areas."""
    for m in range(a.size):
        if iou[a[m], b[m]] > 0:
            k = index[a[m], b[m]]
            chosen_t[gs[k]], chosen_p[ps[k]] = True, True
            num += inter[k]
            den += area_t[gs[k]] + area_p[ps[k]] - inter[k]
    return num, den + _unpaired(area_t, area_p, chosen_t, chosen_p)


@numba.njit(cache=True, nogil=True)
def _instance_stats(table):
    """Everything from the instance table: PQ terms, foreground counts, AJI, and AJI+'s singles."""
    gs, ps, inter, area_t, area_p = _pairs(table)
    pq = _pq(gs, ps, inter, area_t, area_p)
    fg_t, fg_p, fg_i = area_t[1:].sum(), area_p[1:].sum(), inter.sum()
    aji = _aji(gs, ps, inter, area_t, area_p)
    singles = _aji_plus_singles(gs, ps, inter, area_t, area_p)
    return (gs, ps, inter, area_t, area_p), pq, (fg_t, fg_p, fg_i), aji, singles


@numba.njit(cache=True, nogil=True)
def _classes(part, parts_t, parts_p, k1):
    """Per-class (tp, fp, fn, iou) over classes 1..K and the part matching (tp, fp, fn, iou) of all parts."""
    gs, ps, inter, area_t, area_p = _pairs(part)
    k = k1 - 1
    tp, fp, fn = np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros(k, np.int64)
    iou = np.zeros(k)
    for a in range(1, parts_t.size):
        fn[parts_t[a] % k1 - 1] += 1
    for b in range(1, parts_p.size):
        fp[parts_p[b] % k1 - 1] += 1
    part_tp, part_iou = 0, 0.0
    for m in range(gs.size):
        union = area_t[gs[m]] + area_p[ps[m]] - inter[m]
        if 2 * inter[m] > union:
            value = inter[m] / union
            part_tp += 1
            part_iou += value
            c = parts_t[gs[m]] % k1
            if c == parts_p[ps[m]] % k1:
                tp[c - 1] += 1
                iou[c - 1] += value
    for c in range(k):
        fp[c] -= tp[c]
        fn[c] -= tp[c]
    return tp, fp, fn, iou, part_tp, parts_p.size - 1 - part_tp, parts_t.size - 1 - part_tp, part_iou


def _packed(x: np.ndarray, typed: bool) -> np.ndarray | None:
    """Pixels as ``_tables`` reads them: an (H, W) map flattened; an (H, W, 2) map as one int64 per pixel
    holding its int32 (id, type) pair (other integer dtypes are cast to int32 first; None when they do not
    fit, or on a big-endian machine)."""
    if not typed:
        return np.ascontiguousarray(x).reshape(-1)
    if sys.byteorder != "little":
        return None
    if x.dtype != np.int32:
        if x.size and (int(x.max()) > np.iinfo(np.int32).max or int(x.min()) < np.iinfo(np.int32).min):
            return None
        x = x.astype(np.int32)
    return np.ascontiguousarray(x).view(np.int64).reshape(-1)


def fused_counts(pred: np.ndarray, true: np.ndarray, n_classes: int | None):
    """``ImageCounts`` of one (H, W) or (H, W, 2) pair in one compiled pass, or None when the ids or the tables
    are too large for lookup tables (the caller then takes the numpy path)."""
    typed = true.ndim == 3
    if true.dtype.kind not in "iu" or true.dtype == np.uint64 or pred.dtype != true.dtype:
        return None  # uint64 mixes with int64 as float in numba; mixed dtypes would compile one more variant
    tk, pk = _packed(true, typed), _packed(pred, typed)
    if tk is None or pk is None:
        return None
    k1 = (n_classes or 0) + 1
    return counts_from_tables(_tables(tk, pk, typed, k1, 4 * tk.shape[0] + 65536), typed, k1)


def counts_from_tables(tables: tuple, typed: bool, k1: int):
    """``ImageCounts`` from ``_tables``' output (None when it declined)."""
    from cellembed.metrics._image import ImageCounts

    table, part, parts_t, parts_p = tables
    if table.size == 0:
        return None
    pairs, (tp, fp, fn, iou_sum), fg, aji, singles = _instance_stats(table)
    num, den, chosen_t, chosen_p, rest = singles
    if rest.size:
        iou, index = _ajip_matrix(*pairs, rest)
        a, b = linear_sum_assignment(-iou)
        ajip = _ajip_finish(a.astype(np.int64), b.astype(np.int64), iou, index, *pairs, chosen_t, chosen_p, num, den)
    else:
        ajip = (num, den + _unpaired(pairs[3], pairs[4], chosen_t, chosen_p))
    if typed:
        c_tp, c_fp, c_fn, c_iou, *part_terms = _classes(part, parts_t, parts_p, k1)
        cls = (c_tp, c_fp, c_fn, c_iou)
    else:
        empty = np.zeros(0, np.int64)
        cls, part_terms = (empty, empty, empty, np.zeros(0)), (tp, fp, fn, iou_sum)
    return ImageCounts(int(tp), int(fp), int(fn), float(iou_sum), int(aji[0]), int(aji[1]), int(ajip[0]),
                       int(ajip[1]), int(fg[0]), int(fg[1]), int(fg[2]), *cls,
                       *(int(v) if i < 3 else float(v) for i, v in enumerate(part_terms)))
