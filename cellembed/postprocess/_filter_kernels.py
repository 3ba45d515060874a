"""Numba float kernels of the post-processing: filters and landscapes (twins in ``_filters`` /
``_reference``; validating wrappers in ``_ops``).

Each kernel repeats its twin's float64 arithmetic in the same order (scipy's ``correlate`` sums the taps
in raveled order; ``correlate1d`` adds the centre tap, then symmetric pairs from the outside in), so the
results are bit-identical and thresholds and watershed ties fall the same way. Inner loops run over
columns so that LLVM vectorises them; images are streamed through small rings of rows instead of
full-size intermediates. Borders follow scipy's "mirror" mode (reflect-101, OpenCV's default).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def mirror_index(n, pad):
    """Source index of each position -pad..n+pad-1 under reflect-101 (scipy "mirror"), any n >= 1."""
    out = np.zeros(n + 2 * pad, np.int64)
    if n > 1:
        period = 2 * (n - 1)
        for k in range(n + 2 * pad):
            j = (k - pad) % period
            out[k] = period - j if j >= n else j
    return out


@njit(cache=True, nogil=True)
def correlate_padded(padded, weights, out):
    """``scipy.ndimage.correlate`` of the unpadded image into ``out`` (H, W) float64, same sums."""
    kh, kw = weights.shape
    h, w = out.shape
    acc = np.zeros(w)
    for r in range(h):
        acc[:] = 0.0
        for a in range(kh):
            for b in range(kw):
                wt = weights[a, b]
                if wt == 0:
                    continue
                row = padded[r + a, b:b + w]
                for c in range(w):
                    acc[c] = acc[c] + row[c] * wt
        out[r] = acc
    return out


@njit(cache=True, nogil=True)
def correlate5_minmax(x, lo, hi, k, out):
    """``scipy.ndimage.correlate(minmax(x), k, mode="mirror")`` for a 5x5 ``k``, given ``lo, hi`` =
    ``x.min(), x.max()``. Normalised, mirror-padded rows live in a ring of 5, and each output pixel is
    one 25-term sum in scipy's order (raveled taps). scipy skips zero taps; adding their products
    (+0.0 for the non-negative normalised values, never onto -0.0) leaves every finite sum unchanged."""
    h, w = x.shape
    lo, hi = np.float64(lo), np.float64(hi)
    ri, ci = mirror_index(h, 2), mirror_index(w, 2)
    ring = np.zeros((5, w + 4))
    for r in range(h + 4):
        dst, src = ring[r % 5], x[ri[r]]
        if hi > lo or np.isnan(hi):
            for c in range(w):
                dst[c + 2] = (np.float64(src[c]) - lo) / (hi - lo)
        dst[0], dst[1], dst[w + 2], dst[w + 3] = dst[ci[0] + 2], dst[ci[1] + 2], dst[ci[w + 2] + 2], dst[ci[w + 3] + 2]
        if r >= 4:
            _correlate5_row(ring[(r - 4) % 5], ring[(r - 3) % 5], ring[(r - 2) % 5], ring[(r - 1) % 5], ring[r % 5],
                            k, out[r - 4])
    return out


@njit(cache=True, nogil=True, inline="always")
def _correlate5_row(a0, a1, a2, a3, a4, k, o):
    k00, k01, k02, k03, k04, k10, k11, k12, k13, k14 = k[0, 0], k[0, 1], k[0, 2], k[0, 3], k[0, 4], \
        k[1, 0], k[1, 1], k[1, 2], k[1, 3], k[1, 4]
    k20, k21, k22, k23, k24, k30, k31, k32, k33, k34 = k[2, 0], k[2, 1], k[2, 2], k[2, 3], k[2, 4], \
        k[3, 0], k[3, 1], k[3, 2], k[3, 3], k[3, 4]
    k40, k41, k42, k43, k44 = k[4, 0], k[4, 1], k[4, 2], k[4, 3], k[4, 4]
    for c in range(o.size):
        s = 0.0 + a0[c] * k00
        s = s + a0[c + 1] * k01 + a0[c + 2] * k02 + a0[c + 3] * k03 + a0[c + 4] * k04
        s = s + a1[c] * k10 + a1[c + 1] * k11 + a1[c + 2] * k12 + a1[c + 3] * k13 + a1[c + 4] * k14
        s = s + a2[c] * k20 + a2[c + 1] * k21 + a2[c + 2] * k22 + a2[c + 3] * k23 + a2[c + 4] * k24
        s = s + a3[c] * k30 + a3[c + 1] * k31 + a3[c + 2] * k32 + a3[c + 3] * k33 + a3[c + 4] * k34
        o[c] = s + a4[c] * k40 + a4[c + 1] * k41 + a4[c + 2] * k42 + a4[c + 3] * k43 + a4[c + 4] * k44


@njit(cache=True, nogil=True)
def correlate1d_sym(x, weights, axis, anti):
    """``scipy.ndimage.correlate1d(x, weights, axis, mode="mirror")`` for an odd symmetric (``anti``:
    antisymmetric) kernel, float64: centre tap first, then outer-to-inner pairs (scipy's order)."""
    h, w = x.shape
    half = weights.size // 2
    out = np.empty((h, w))
    if axis == 0:  # the "ring" is the whole mirror-padded image
        padded = np.empty((h + 2 * half, w))
        for k, src in enumerate(mirror_index(h, half)):
            padded[k] = x[src]
        for r in range(h):
            _correlate_ring(padded, r, weights, anti, out[r])
        return out
    idx, line = mirror_index(w, half), np.empty(w + 2 * half)
    for r in range(h):
        _correlate_line(x[r], weights, anti, idx, line, out[r])
    return out


@njit(cache=True, nogil=True, inline="always")
def _correlate_line(src, weights, anti, idx, line, out):
    """One row of ``correlate1d_sym`` along axis 1 (``line``: scratch of size w + 2 * half)."""
    half, w = weights.size // 2, src.size
    for c in range(w):
        line[half + c] = src[c]
    for c in range(half):
        line[c], line[w + half + c] = src[idx[c]], src[idx[w + half + c]]
    for c in range(w):
        out[c] = line[half + c] * weights[half]
    for j in range(half, 0, -1):
        lo, hi, wt = line[half - j:half - j + w], line[half + j:half + j + w], weights[half - j]
        for c in range(w):
            out[c] = out[c] + ((lo[c] - hi[c]) if anti else (lo[c] + hi[c])) * wt


@njit(cache=True, nogil=True, inline="always")
def _correlate_ring(ring, r, weights, anti, out):
    """Output row ``r`` of ``correlate1d_sym`` along axis 0 from a ring holding padded row k at k % size."""
    half, n = weights.size // 2, ring.shape[0]
    mid = ring[(r + half) % n]
    for c in range(out.size):
        out[c] = mid[c] * weights[half]
    for j in range(half, 0, -1):
        lo, hi, wt = ring[(r + half - j) % n], ring[(r + half + j) % n], weights[half - j]
        for c in range(out.size):
            out[c] = out[c] + ((lo[c] - hi[c]) if anti else (lo[c] + hi[c])) * wt


@njit(cache=True, nogil=True)
def sobel(x, axis, lo, hi, smooth, deriv):
    """``_filters.sobel(minmax(x), axis)`` given ``lo, hi = x.min(), x.max()``: the derivative along
    ``axis``, then smoothing across it, streamed over a ring of rows (no full-size intermediates)."""
    h, w = x.shape
    half = smooth.size // 2
    lo, hi = np.float64(lo), np.float64(hi)
    ri, ci = mirror_index(h, half), mirror_index(w, half)
    ring, norm, tmp = np.empty((2 * half + 1, w)), np.zeros(w), np.empty(w)
    line, out = np.empty(w + 2 * half), np.empty((h, w))
    for k in range(h + 2 * half):  # padded row k -> ring; output row k - 2 * half
        src = x[ri[k]]
        if hi > lo or np.isnan(hi):
            for c in range(w):
                norm[c] = (np.float64(src[c]) - lo) / (hi - lo)
        if axis == 1:  # derivative along the row first, smoothing down the columns after
            _correlate_line(norm, deriv, True, ci, line, ring[k % ring.shape[0]])
        else:
            ring[k % ring.shape[0]] = norm
        if k >= 2 * half:
            if axis == 1:
                _correlate_ring(ring, k - 2 * half, smooth, False, out[k - 2 * half])
            else:
                _correlate_ring(ring, k - 2 * half, deriv, True, tmp)
                _correlate_line(tmp, smooth, False, ci, line, out[k - 2 * half])
    return out


@njit(cache=True, nogil=True)
def unit_response(resp, lo, hi, best):
    """``best = np.maximum(best, 1 - minmax(resp))`` in place, given ``lo, hi = resp.min(), resp.max()``."""
    rf, bf = resp.ravel(), best.ravel()
    lo, hi = np.float64(lo), np.float64(hi)
    scale = hi > lo or np.isnan(hi)
    for i in range(rf.size):
        v = 1.0 - ((rf[i] - lo) / (hi - lo) if scale else 0.0)
        if v > bf[i] or np.isnan(v):
            bf[i] = v
    return best


@njit(cache=True, nogil=True)
def or_below(resp, cut, hit):
    """``hit |= resp <= cut`` in place."""
    rf, hf = resp.ravel(), hit.ravel()
    for i in range(rf.size):
        hf[i] |= rf[i] <= cut
    return hit


@njit(cache=True, nogil=True)
def upsample2(x):
    """``_filters.upsample2`` of a (K, H, W) float array: bilinear x2, half-pixel centres, float64.
    Rows first, then columns; inside the image the column weights are (0.25, 0.75) / (0.75, 0.25),
    written as the twin's ``x[lo] * (1 - w) + x[hi] * w`` with those exact values."""
    kk, h, w = x.shape
    lo_r, hi_r, w_r = _bilinear_taps(h)
    lo_c, hi_c, w_c = _bilinear_taps(w)
    out = np.empty((kk, 2 * h, 2 * w))
    tmp = np.empty(w)
    for k in range(kk):
        for r in range(2 * h):
            a, b, t, dst = x[k, lo_r[r]], x[k, hi_r[r]], w_r[r], out[k, r]
            for c in range(w):
                tmp[c] = np.float64(a[c]) * (1 - t) + np.float64(b[c]) * t
            for j in range(1, w - 1):  # output columns 2j (taps j-1, j) and 2j+1 (taps j, j+1)
                dst[2 * j] = tmp[j - 1] * 0.25 + tmp[j] * 0.75
                dst[2 * j + 1] = tmp[j] * 0.75 + tmp[j + 1] * 0.25
            for c in (0, 1, 2 * w - 2, 2 * w - 1):
                dst[c] = tmp[lo_c[c]] * (1 - w_c[c]) + tmp[hi_c[c]] * w_c[c]
    return out


@njit(cache=True, nogil=True)
def _bilinear_taps(n):
    lo, hi, wt = np.empty(2 * n, np.int64), np.empty(2 * n, np.int64), np.empty(2 * n)
    for i in range(2 * n):
        src = (i + 0.5) / 2.0 - 0.5
        f = np.floor(src)
        lo[i] = min(max(int(f), 0), n - 1)
        hi[i] = min(max(lo[i] + 1, 0), n - 1)
        wt[i] = 0.0 if src < 0 else min(max(src - f, 0.0), 1.0)
    return lo, hi, wt


@njit(cache=True, nogil=True)
def _ordered(x):
    """float64 -> int64 with the same order (for bisection over floats); its own inverse."""
    b = np.array([x]).view(np.int64)[0]
    return b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True)
def _unordered(k):
    return np.array([k ^ ((k >> 63) & 0x7FFFFFFFFFFFFFFF)]).view(np.float64)[0]


@njit(cache=True, nogil=True)
def response_cut(lo, hi, threshold):
    """The largest r in [lo, hi] with ``1 - (r - lo) / (hi - lo) >= threshold`` in float64 (-inf if none).

    Every rounding step is monotone, so over the response map that test is exactly ``resp <= cut``:
    this replaces a division per pixel by one comparison (finite lo <= hi, 0 < threshold)."""
    if not hi > lo:
        return np.inf if 1.0 >= threshold else -np.inf
    a, b = _ordered(lo), _ordered(hi)
    if not 1.0 - (lo - lo) / (hi - lo) >= threshold:
        return -np.inf
    while a < b:  # invariant: test(a) holds; answer in [a, b]
        m = a // 2 + b // 2 + (a % 2 + b % 2 + 1) // 2  # upper midpoint without overflow
        r = _unordered(m)
        if 1.0 - (r - lo) / (hi - lo) >= threshold:
            a = m
        else:
            b = m - 1
    return _unordered(a)


@njit(cache=True, nogil=True)
def foreground(classes, fg_threshold):
    """FG = P_boundary + P_body >= threshold (in float64), (H, W) bool."""
    _, h, w = classes.shape
    fg = np.empty((h, w), np.bool_)
    for r in range(h):
        for c in range(w):
            fg[r, c] = np.float64(classes[0, r, c]) + classes[1, r, c] >= fg_threshold
    return fg


@njit(cache=True, nogil=True)
def watershed_region(classes):
    """M = P_boundary + P_body > P_background (in float64), (H, W) bool."""
    _, h, w = classes.shape
    m = np.empty((h, w), np.bool_)
    for r in range(h):
        for c in range(w):
            m[r, c] = np.float64(classes[0, r, c]) + classes[1, r, c] > classes[2, r, c]
    return m


@njit(cache=True, nogil=True)
def contour_threshold(fg, best, threshold):
    """``clip(best - (1 - fg), 0) >= threshold`` (CISCA.md §3 step 2, the literal form), (H, W) bool."""
    h, w = fg.shape
    cth = np.empty((h, w), np.bool_)
    for r in range(h):
        for c in range(w):
            v = best[r, c] if fg[r, c] else best[r, c] - 1.0
            cth[r, c] = (v if v > 0.0 or np.isnan(v) else 0.0) >= threshold
    return cth


@njit(cache=True, nogil=True)
def cisca_landscape(body, interior, a, b):
    """CISCA.md §3 step 3 into a zero-padded (H + 2, W + 2) float64 array for ``watershed``:
    ``a * (1 - P_body) + b * (1 - blur3(interior))`` (twin ``cisca_landscape_reference``). The blur of a
    0/1 mask is exact in any order ((1, 2, 1) ⊗ (1, 2, 1) / 16), so it is summed in integers."""
    h, w = body.shape
    ri, ci = mirror_index(h, 1), mirror_index(w, 1)
    rows = np.zeros((h, w + 2), np.int32)  # horizontal (1, 2, 1) sums, then vertical on the fly
    for r in range(h):
        src, dst = interior[r], rows[r]
        for c in range(w):
            dst[c] = np.int32(src[ci[c]]) + 2 * np.int32(src[c]) + np.int32(src[ci[c + 2]])
    out = np.zeros((h + 2, w + 2))
    for r in range(h):
        up, mid, down, src, dst = rows[ri[r]], rows[r], rows[ri[r + 2]], body[r], out[r + 1, 1:w + 1]
        for c in range(w):
            blurred = (up[c] + 2 * mid[c] + down[c]) / 16.0
            dst[c] = a * (1.0 - np.float64(src[c])) + b * (1.0 - blurred)
    return out


@njit(cache=True, nogil=True)
def hover_landscape(blb, best, threshold):
    """HoVer-Net steps 5-7a from ``best = max(sobel_h, sobel_v)``: the zero-padded landscape
    ``dist = -blur3((1 - overall) * blb)`` ((H + 2, W + 2) float64) and ``blb & (overall < threshold)``.
    Rows are blurred horizontally into a ring of 3, then vertically (same arithmetic as ``blur3``)."""
    h, w = blb.shape
    seeds = np.empty((h, w), np.bool_)
    ri, ci = mirror_index(h, 1), mirror_index(w, 1)
    ring, inner = np.empty((3, w)), np.empty(w + 2)
    dist = np.zeros((h + 2, w + 2))
    for q in range(h):
        for c in range(w):
            v = best[q, c] if blb[q, c] else best[q, c] - 1.0
            v = v if v > 0.0 or np.isnan(v) else 0.0  # overall = clip(max - (1 - blb), 0)
            seeds[q, c] = blb[q, c] and v < threshold
            inner[c + 1] = (1.0 - v) * blb[q, c]
        inner[0], inner[w + 1] = inner[ci[0] + 1], inner[ci[w + 1] + 1]
        row = ring[q % 3]
        for c in range(w):
            row[c] = inner[c + 1] * 0.5 + (inner[c] + inner[c + 2]) * 0.25
        if q >= 1:
            _blur_rows(ring, ri, q - 1, dist[q, 1:w + 1])
    _blur_rows(ring, ri, h - 1, dist[h, 1:w + 1])
    return dist, seeds


@njit(cache=True, nogil=True, inline="always")
def _blur_rows(ring, ri, y, out):
    """``out = -(row y * 0.5 + (row y-1 + row y+1) * 0.25)`` over mirrored rows held in ``ring``."""
    up, mid, down = ring[ri[y] % 3], ring[y % 3], ring[ri[y + 2] % 3]
    for c in range(out.size):
        out[c] = -(mid[c] * 0.5 + (up[c] + down[c]) * 0.25)
