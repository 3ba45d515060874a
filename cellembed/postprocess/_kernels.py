"""Numba kernels of the post-processing (each twinned in ``_reference``; wrappers in ``_ops``)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True)
def label(mask, conn8):
    """Connected components of a 2-D bool mask, numbered 1..n in raster order of first pixels."""
    h, w = mask.shape
    parent = np.arange(h * w, dtype=np.int64)
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                continue
            i = r * w + c
            for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                if (dr != 0 and dc != 0 and not conn8) or r + dr < 0 or not 0 <= c + dc < w:
                    continue
                if mask[r + dr, c + dc]:
                    a, b = _find(parent, i), _find(parent, (r + dr) * w + c + dc)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    out = np.zeros((h, w), np.int32)
    ids = np.zeros(h * w, np.int32)
    n = 0
    for r in range(h):
        for c in range(w):
            if mask[r, c]:
                root = _find(parent, r * w + c)
                if ids[root] == 0:
                    n += 1
                    ids[root] = n
                out[r, c] = ids[root]
    return out, n


@njit(cache=True)
def remove_small(labels, n, min_area):
    """Zero labels (ids 1..n) with fewer than ``min_area`` pixels; relabel 1..m keeping the id order."""
    flat = labels.ravel()
    area = np.zeros(n + 1, np.int64)
    for i in range(flat.size):
        area[flat[i]] += 1
    new = np.zeros(n + 1, np.int32)
    m = 0
    for k in range(1, n + 1):
        if area[k] >= min_area and area[k] > 0:
            m += 1
            new[k] = m
    out = np.empty(flat.size, np.int32)
    for i in range(flat.size):
        out[i] = new[flat[i]]
    return out.reshape(labels.shape), m


@njit(cache=True)
def rescue(eroded, labels, n):
    """Eroded pixels plus the whole components of ``labels`` (ids 1..n) that have no eroded pixel."""
    survives = np.zeros(n + 1, np.bool_)
    lab, ero = labels.ravel(), eroded.ravel()
    for i in range(lab.size):
        if ero[i]:
            survives[lab[i]] = True
    out = np.zeros(labels.shape, np.bool_)
    flat = out.ravel()
    for i in range(lab.size):
        flat[i] = ero[i] or (lab[i] > 0 and not survives[lab[i]])
    return out


@njit(cache=True)
def _push(val, age, idx, n, v, a, j):
    child = n
    val[child], age[child], idx[child] = v, a, j
    while child > 0:
        parent = (child + 1) // 2 - 1
        if val[child] < val[parent] or (val[child] == val[parent] and age[child] < age[parent]):
            val[child], val[parent] = val[parent], val[child]
            age[child], age[parent] = age[parent], age[child]
            idx[child], idx[parent] = idx[parent], idx[child]
            child = parent
        else:
            break
    return n + 1


@njit(cache=True)
def _pop(val, age, idx, n):
    """Remove the root (scikit-image's heap: last item to the root, then sift down); returns new size."""
    n -= 1
    if n == 0:
        return 0
    val[0], age[0], idx[0] = val[n], age[n], idx[n]
    i = 0
    while True:
        lo, hi, s = 2 * i + 1, 2 * i + 2, i
        if lo >= n:
            break
        if val[lo] < val[i] or (val[lo] == val[i] and age[lo] < age[i]):
            s = lo
        if hi < n and (val[hi] < val[s] or (val[hi] == val[s] and age[hi] < age[s])):
            s = hi
        if s == i:
            break
        val[i], val[s] = val[s], val[i]
        age[i], age[s] = age[s], age[i]
        idx[i], idx[s] = idx[s], idx[i]
        i = s
    return n


@njit(cache=True)
def watershed(image, output, mask, offsets):
    """Marker flooding on raveled, zero-padded arrays, in scikit-image's exact order (value, age);
    a pushed pixel costs at least its parent's cost.

    ``output`` holds the markers and is filled in place; ``mask`` must be False on the padding.
    """
    size = image.size
    val, age, idx = np.empty(size), np.empty(size, np.int64), np.empty(size, np.int64)
    n, t = 0, 1
    for i in range(size):
        if output[i]:
            n = _push(val, age, idx, n, image[i], 0, i)
    while n > 0:
        cur, level = idx[0], val[0]
        n = _pop(val, age, idx, n)
        for off in offsets:
            j = cur + off
            if mask[j] and not output[j]:
                t += 1
                output[j] = output[cur]
                n = _push(val, age, idx, n, max(image[j], level), t, j)
    return output


@njit(cache=True)
def vote_soft(inst, n, probs):
    """Per-instance sums of (K, H, W) probabilities in raster order, float64 (n + 1, K)."""
    k = probs.shape[0]
    sums = np.zeros((n + 1, k))
    h, w = inst.shape
    for c in range(k):
        for r in range(h):
            for q in range(w):
                sums[inst[r, q], c] += probs[c, r, q]
    return sums


@njit(cache=True)
def correlate(padded, weights):
    """``scipy.ndimage.correlate(x, weights, mode="mirror")`` given ``x`` reflect-101-padded by the
    kernel's half sides; float64, same summation order (nonzero taps, raveled order)."""
    kh, kw = weights.shape
    h, w = padded.shape[0] - kh + 1, padded.shape[1] - kw + 1
    nz = [(a, b) for a in range(kh) for b in range(kw) if weights[a, b] != 0]
    ta = np.array([t[0] for t in nz], np.int64)
    tb = np.array([t[1] for t in nz], np.int64)
    tw = np.array([weights[t[0], t[1]] for t in nz])
    out = np.zeros((h, w))
    for r in range(h):
        acc = out[r]
        for k in range(tw.size):  # taps outer, columns inner: same per-pixel order, vectorised
            row, b, wt = padded[r + ta[k]], tb[k], tw[k]
            for c in range(w):
                acc[c] += row[c + b] * wt
    return out


@njit(cache=True)
def morph(padded, footprint, dilate):
    """Binary dilation (``dilate``) or erosion of a mask padded by the footprint's half sides with the
    border value (symmetric footprint)."""
    kh, kw = footprint.shape
    h, w = padded.shape[0] - kh + 1, padded.shape[1] - kw + 1
    na = np.array([a for a in range(kh) for b in range(kw) if footprint[a, b]], np.int64)
    nb = np.array([b for a in range(kh) for b in range(kw) if footprint[a, b]], np.int64)
    out = np.empty((h, w), np.bool_)
    for r in range(h):
        for c in range(w):
            hit = not dilate
            for k in range(na.size):
                if padded[r + na[k], c + nb[k]] == dilate:
                    hit = dilate
                    break
            out[r, c] = hit
    return out
