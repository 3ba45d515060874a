"""Numba kernels behind the target wrappers (plain arrays in, plain arrays out, no validation here).

Every kernel has a numpy/scikit-image twin that is its executable specification:

| kernel | twin |
|---|---|
| ``foreign_within`` | ``_graymask._touch_mask_reference`` (per-instance dilation sum, as CISCA's notebook) |
| ``label_extents`` + ``fill_directions`` | ``_directions.directions_reference`` (per-instance bbox loop) |
| ``label_moments`` + ``fill_hover`` | ``_hover.hover_hv_reference`` (HoVer-Net's per-instance loop) |

The graymask's binary morphology (dilation, erosion, the reflect-mode closing) and its small-component
filter use ``cellembed.postprocess._kernels`` (``morph``, ``label``, ``areas``, ``lookup``); their twins are
scipy's and scikit-image's operators.

Labels passed in are int32 and dense enough to index tables of size ``n = max id + 1``
(the wrappers compact them first when they are not).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def foreign_within(inst, offsets):
    """Cell pixels having a pixel of *another* instance at one of ``offsets`` (row, col)."""
    h, w = inst.shape
    out = np.zeros((h, w), np.bool_)
    for r in range(h):
        for c in range(w):
            own = inst[r, c]
            if own == 0:
                continue
            for k in range(offsets.shape[0]):
                rr = r + offsets[k, 0]
                cc = c + offsets[k, 1]
                if rr >= 0 and rr < h and cc >= 0 and cc < w:
                    v = inst[rr, cc]
                    if v != 0 and v != own:
                        out[r, c] = True
                        break
    return out


@njit(cache=True, nogil=True)
def label_extents(inst, n):
    """Per label: min and max of the projections r, c, r + c, c - r; shape (n, 8) int64."""
    big = 1 << 40
    ext = np.empty((n, 8), np.int64)
    for i in range(n):
        for j in range(4):
            ext[i, 2 * j] = big
            ext[i, 2 * j + 1] = -big
    h, w = inst.shape
    for r in range(h):
        for c in range(w):
            lab = inst[r, c]
            if lab == 0:
                continue
            s = (c, r, r + c, c - r)
            for j in range(4):
                ext[lab, 2 * j] = min(ext[lab, 2 * j], s[j])
                ext[lab, 2 * j + 1] = max(ext[lab, 2 * j + 1], s[j])
    return ext


@njit(cache=True, nogil=True)
def _ramp_hv(s, lo, hi, b, tips):
    """h or v value of projection ``s`` for an instance spanning [lo, hi] (hi > lo)."""
    n = hi - lo
    k = s - lo
    if tips and n + 1 > 2 * b:
        if k < b:
            d = k / (2.0 * b)
        elif k >= n + 1 - b:
            d = (k - n + 2 * b) / (2.0 * b)
        else:
            d = 0.5
    else:
        d = k / n
    return 2.0 * d - 1.0


@njit(cache=True, nogil=True)
def _ramp_diag(s, lo, hi, bd, tips):
    """tl or bl value; ``bd`` is the (float) diagonal tip length 1.4·b; CISCA's int truncation kept."""
    span = hi - lo
    if tips and span > 2.0 * bd:
        if s <= lo + bd:
            d = float(s - lo)
        elif s >= hi - bd:
            d = math.floor(s - hi + 2.0 * bd)
        else:
            d = math.floor(bd)
        return 2.0 * d / math.floor(2.0 * bd) - 1.0
    if span == 0:
        return -1.0
    return 2.0 * (s - lo) / span - 1.0


@njit(cache=True, nogil=True)
def fill_directions(inst, ext, b, bd, tips):
    """(4, H, W) float32 h, v, tl, bl maps from ``label_extents``; single-row/column instances stay 0."""
    h, w = inst.shape
    out = np.zeros((4, h, w), np.float32)
    for r in range(h):
        for c in range(w):
            lab = inst[r, c]
            if lab == 0 or ext[lab, 0] == ext[lab, 1] or ext[lab, 2] == ext[lab, 3]:
                continue
            out[0, r, c] = _ramp_hv(c, ext[lab, 0], ext[lab, 1], b, tips)
            out[1, r, c] = _ramp_hv(r, ext[lab, 2], ext[lab, 3], b, tips)
            out[2, r, c] = _ramp_diag(r + c, ext[lab, 4], ext[lab, 5], bd, tips)
            out[3, r, c] = _ramp_diag(c - r, ext[lab, 6], ext[lab, 7], bd, tips)
    return out


@njit(cache=True, nogil=True)
def label_moments(inst, n):
    """Per label: pixel count, sum of rows, sum of cols; shape (n, 3) float64."""
    mom = np.zeros((n, 3), np.float64)
    h, w = inst.shape
    for r in range(h):
        for c in range(w):
            lab = inst[r, c]
            if lab != 0:
                mom[lab, 0] += 1.0
                mom[lab, 1] += r
                mom[lab, 2] += c
    return mom


@njit(cache=True, nogil=True)
def fill_hover(inst, mom, min_area):
    """(2, H, W) float32 HoVer-Net x, y offsets from the rounded centre of mass (+1, as HoVer-Net),
    negative and positive sides each scaled to [-1, 0] / [0, 1]; labels under ``min_area`` px stay 0."""
    n = mom.shape[0]
    cen = np.zeros((n, 2), np.int64)
    scale = np.zeros((n, 4), np.float64)             # -min x, max x, -min y, max y
    for i in range(1, n):
        if mom[i, 0] >= min_area:
            cen[i, 0] = int(math.floor(mom[i, 1] / mom[i, 0] + 0.5))
            cen[i, 1] = int(math.floor(mom[i, 2] / mom[i, 0] + 0.5))
    h, w = inst.shape
    out = np.zeros((2, h, w), np.float32)
    for p in range(2):
        for r in range(h):
            for c in range(w):
                lab = inst[r, c]
                if lab == 0 or mom[lab, 0] < min_area:
                    continue
                x = c - cen[lab, 1] + 1.0
                y = r - cen[lab, 0] + 1.0
                if p == 0:
                    scale[lab, 0] = max(scale[lab, 0], -x)
                    scale[lab, 1] = max(scale[lab, 1], x)
                    scale[lab, 2] = max(scale[lab, 2], -y)
                    scale[lab, 3] = max(scale[lab, 3], y)
                else:
                    out[0, r, c] = x / scale[lab, 0] if x < 0 else (x / scale[lab, 1] if x > 0 else 0.0)
                    out[1, r, c] = y / scale[lab, 2] if y < 0 else (y / scale[lab, 3] if y > 0 else 0.0)
    return out

