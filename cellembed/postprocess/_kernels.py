"""Numba kernels of the post-processing: binary morphology, labels, watershed, voting (twins in
``_reference`` / scipy / scikit-image; validating wrappers in ``_ops``; float filters in ``_filter_kernels``).

Kernels take plain arrays that their callers have already checked (C-contiguous, the documented dtypes).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# ---------------------------------------------------------------- binary morphology


@njit(cache=True, nogil=True)
def morph(mask, footprint, dilate, border):
    """Binary dilation (``dilate``) or erosion by a point-symmetric odd footprint; pixels outside the
    image count as ``border`` (erosion) or background (dilation). One pass per footprint tap, vectorised
    (faster than per-row run lookups for every footprint CISCA uses, up to 11x11, at 256² and 1024²)."""
    h, w = mask.shape
    kh, kw = footprint.shape
    ry, rx = kh // 2, kw // 2
    padded = np.full((h + 2 * ry, w + 2 * rx), bool(border) and not dilate)
    padded[ry:ry + h, rx:rx + w] = mask
    out = np.full((h, w), not dilate)
    for r in range(h):
        dst = out[r]
        for a in range(kh):
            for b in range(kw):
                if footprint[a, b]:
                    src = padded[r + a, b:b + w]
                    for c in range(w):
                        dst[c] = (dst[c] | src[c]) if dilate else (dst[c] & src[c])
    return out


@njit(cache=True, nogil=True)
def fill_holes(mask):
    """``scipy.ndimage.binary_fill_holes``: background not 4-connected to the image border becomes set."""
    h, w = mask.shape
    bg, n = label(~mask, False)
    open_ = np.zeros(n + 1, np.bool_)
    for r in range(h):
        step = 1 if r == 0 or r == h - 1 else max(w - 1, 1)
        for c in range(0, w, step):
            open_[bg[r, c]] = True
    out = np.empty((h, w), np.bool_)
    for r in range(h):
        for c in range(w):
            out[r, c] = mask[r, c] or not open_[bg[r, c]]
    return out


# ---------------------------------------------------------------- labels


@njit(cache=True, nogil=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
def _runs(mask):
    """Foreground runs of each row: (row, start, stop) arrays in raster order and each row's first run."""
    h, w = mask.shape
    cap = h * ((w + 1) // 2)
    row, start, stop = np.empty(cap, np.int32), np.empty(cap, np.int32), np.empty(cap, np.int32)
    first = np.empty(h + 1, np.int64)
    n = 0
    for r in range(h):
        first[r] = n
        c = 0
        while c < w:
            if mask[r, c]:
                row[n], start[n] = r, c
                while c < w and mask[r, c]:
                    c += 1
                stop[n] = c
                n += 1
            c += 1
    first[h] = n
    return row[:n], start[:n], stop[:n], first


@njit(cache=True, nogil=True)
def label(mask, conn8):
    """Connected components of a 2-D bool mask, numbered 1..n in raster order of first pixels (as
    ``scipy.ndimage.label``). Union-find over row runs; a component's root is its first run."""
    row, start, stop, first = _runs(mask)
    parent = np.arange(row.size)
    d = 1 if conn8 else 0
    for r in range(1, mask.shape[0]):
        k0 = first[r - 1]
        for j in range(first[r], first[r + 1]):
            while k0 < first[r] and stop[k0] + d <= start[j]:
                k0 += 1
            k = k0
            while k < first[r] and start[k] < stop[j] + d:
                a, b = _find(parent, j), _find(parent, k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                k += 1
    out = np.zeros(mask.shape, np.int32)
    ids = np.empty(row.size, np.int32)
    n = 0
    for j in range(row.size):
        root = _find(parent, j)
        if root == j:
            n += 1
        ids[j] = n if root == j else ids[root]
        out[row[j], start[j]:stop[j]] = ids[j]
    return out, n


@njit(cache=True, nogil=True)
def areas(labels, n):
    """Pixel count of each id 0..n (runs of equal ids are counted at once)."""
    flat = labels.ravel()
    area = np.zeros(n + 1, np.int64)
    i = 0
    while i < flat.size:
        j, lab = i + 1, flat[i]
        while j < flat.size and flat[j] == lab:
            j += 1
        area[lab] += j - i
        i = j
    return area


@njit(cache=True, nogil=True)
def relabel_kept(labels, keep):
    """Ids with ``keep[id]`` renumbered 1..m in id order, the rest 0: ((H, W) int32, m)."""
    new = np.zeros(keep.size, np.int32)
    m = 0
    for k in range(1, keep.size):
        if keep[k]:
            m += 1
            new[k] = m
    flat = labels.ravel()
    out = np.empty(flat.size, np.int32)
    for i in range(flat.size):
        out[i] = new[flat[i]]
    return out.reshape(labels.shape), m


@njit(cache=True, nogil=True)
def remove_small(labels, n, min_area):
    """Zero labels (ids 1..n) with fewer than ``min_area`` pixels; relabel 1..m keeping the id order."""
    area = areas(labels, n)
    return relabel_kept(labels, (area >= min_area) & (area > 0))


@njit(cache=True, nogil=True)
def rescue(eroded, labels, n):
    """Eroded pixels plus the whole components of ``labels`` (ids 1..n) that have no eroded pixel."""
    survives = np.zeros(n + 1, np.bool_)
    lab, ero = labels.ravel(), eroded.ravel()
    for i in range(lab.size):
        if ero[i]:
            survives[lab[i]] = True
    out = np.empty(labels.shape, np.bool_)
    flat = out.ravel()
    for i in range(lab.size):
        flat[i] = ero[i] or (lab[i] > 0 and not survives[lab[i]])
    return out


@njit(cache=True, nogil=True)
def keep_groups(kept, groups, n, min_size):
    """Pixels of ``kept`` whose group (``groups`` id 1..n) holds at least ``min_size`` kept pixels."""
    count = np.zeros(n + 1, np.int64)
    k, g = kept.ravel(), groups.ravel()
    for i in range(k.size):
        if k[i]:
            count[g[i]] += 1
    out = np.empty(kept.shape, np.bool_)
    flat = out.ravel()
    for i in range(k.size):
        flat[i] = k[i] and count[g[i]] >= min_size
    return out


@njit(cache=True, nogil=True)
def union_filter(labels, n, min_area):
    """CISCA's final filter: ids with fewer than ``min_area`` px, and pixels of 4-connected components
    of ``labels > 0`` with fewer than ``min_area`` px, become 0; the rest is renumbered 1..m in id order."""
    comps, nc = label(labels > 0, False)
    big_comp, big_id = areas(comps, nc) >= min_area, areas(labels, n) >= min_area
    flat, cf = labels.ravel(), comps.ravel()
    kept = np.empty(flat.size, np.int32)
    for i in range(flat.size):
        kept[i] = flat[i] if big_id[flat[i]] and big_comp[cf[i]] else 0
    kept = kept.reshape(labels.shape)
    return relabel_kept(kept, areas(kept, n) > 0)


# ---------------------------------------------------------------- watershed


@njit(cache=True, nogil=True, inline="always")
def _before(v1, k1, v2, k2):
    """Heap order of scikit-image's watershed: value, then age (the high 32 bits of the key)."""
    return v1 < v2 or (v1 == v2 and (k1 >> 32) < (k2 >> 32))


@njit(cache=True, nogil=True, inline="always")
def _push(val, key, n, v, k):
    """Append (v, k) and sift it up (scikit-image's heap); returns the new size."""
    child = n
    while child > 0:
        parent = (child + 1) // 2 - 1
        if not _before(v, k, val[parent], key[parent]):
            break
        val[child], key[child] = val[parent], key[parent]
        child = parent
    val[child], key[child] = v, k
    return n + 1


@njit(cache=True, nogil=True, inline="always")
def _pop(val, key, n):
    """Drop the root: the last item goes to the root and sifts down (scikit-image's heap); new size."""
    n -= 1
    v, k = val[n], key[n]
    i = 0
    while 2 * i + 1 < n:
        lo = 2 * i + 1
        s, sv, sk = i, v, k
        if _before(val[lo], key[lo], sv, sk):
            s, sv, sk = lo, val[lo], key[lo]
        if lo + 1 < n and _before(val[lo + 1], key[lo + 1], sv, sk):
            s, sv, sk = lo + 1, val[lo + 1], key[lo + 1]
        if s == i:
            break
        val[i], key[i] = sv, sk
        i = s
    val[i], key[i] = v, k
    return n


@njit(cache=True, nogil=True)
def pad_markers(markers, mask):
    """Raveled, 1-px zero-padded copies of ``markers * mask`` (int32) and ``mask`` for ``watershed``."""
    h, w = markers.shape
    out = np.zeros((h + 2) * (w + 2), np.int32)
    padded = np.zeros((h + 2) * (w + 2), np.bool_)
    for r in range(h):
        base = (r + 1) * (w + 2) + 1
        for c in range(w):
            padded[base + c] = mask[r, c]
            out[base + c] = markers[r, c] if mask[r, c] else 0
    return out, padded


@njit(cache=True, nogil=True)
def flood(padded_image, markers, mask, offsets):
    """``watershed`` on a landscape already zero-padded by 1 px: (H, W) int32 labels from (H, W) int32 markers
    and an (H, W) bool mask; ``offsets`` for the padded width (``_ops.neighbour_offsets``)."""
    h, w = markers.shape
    out, padded_mask = pad_markers(markers, mask)
    watershed(padded_image.ravel(), out, padded_mask, offsets)
    return out.reshape(h + 2, w + 2)[1:-1, 1:-1].copy()


@njit(cache=True, nogil=True)
def watershed(image, output, mask, offsets):
    """Marker flooding on raveled, zero-padded arrays in scikit-image's exact order (value, then age;
    markers in raster order with age 0); a pushed pixel costs at least its parent's cost. ``output``
    holds the markers (none outside ``mask``) and is filled in place; ``mask`` is False on the padding.
    Heap keys pack (age << 32) | index, so images must have fewer than 2**32 pixels."""
    val, key = np.empty(image.size), np.empty(image.size, np.int64)
    n, age = 0, 0
    for i in range(image.size):
        if output[i]:
            n = _push(val, key, n, image[i], np.int64(i))
    while n > 0:
        cur, level = key[0] & 0xFFFFFFFF, val[0]
        n = _pop(val, key, n)
        for off in offsets:
            j = cur + off
            if mask[j] and not output[j]:
                age += 1
                output[j] = output[cur]
                n = _push(val, key, n, max(image[j], level), (np.int64(age) << 32) | j)
    return output


# ---------------------------------------------------------------- voting


@njit(cache=True, nogil=True)
def vote_soft(inst, n, probs, background):
    """Per-instance sums of (K, H, W) probabilities, float64 (n + 1, K), each summed in raster order
    (as ``np.bincount``); a run of equal ids along a row is accumulated at once. Row 0 (background)
    stays 0 unless ``background``."""
    k = probs.shape[0]
    sums = np.zeros((n + 1, k))
    acc = np.empty(k)
    h, w = inst.shape
    for r in range(h):
        q = 0
        while q < w:
            lab = inst[r, q]
            if lab == 0 and not background:
                q += 1
                continue
            acc[:] = sums[lab]
            while q < w and inst[r, q] == lab:
                for c in range(k):
                    acc[c] += probs[c, r, q]
                q += 1
            sums[lab] = acc
    return sums


@njit(cache=True, nogil=True)
def vote_argmax(inst, n, probs, background):
    """Per-instance counts of each pixel's argmax class (first maximum, as ``np.argmax``): (n + 1, K);
    row 0 (background) stays 0 unless ``background``."""
    k, h, w = probs.shape
    counts = np.zeros((n + 1, k), np.int64)
    for r in range(h):
        for q in range(w):
            if inst[r, q] == 0 and not background:
                continue
            best = 0
            for c in range(1, k):  # np.argmax: the first maximum, and the first NaN beats any number
                v, b = probs[c, r, q], probs[best, r, q]
                if v > b or (np.isnan(v) and not np.isnan(b)):
                    best = c
            counts[inst[r, q], best] += 1
    return counts


@njit(cache=True, nogil=True)
def lookup(inst, table):
    """``table[inst]`` for a (H, W) int32 map and a (n + 1,) uint8 table."""
    out = np.empty(inst.shape, np.uint8)
    src, dst = inst.ravel(), out.ravel()
    for i in range(src.size):
        dst[i] = table[src[i]]
    return out
