"""CISCA instance extraction (CISCA.md §3), numba path; twin: ``_reference.cisca_instances_reference``.

Inputs are validated once in ``cisca_instances``; the stages below then call the kernels directly. Each
stage mirrors the ``_reference`` stage of the same name (the benchmark times them side by side).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit
from skimage.morphology import disk, skeletonize

from . import _filter_kernels as _fk
from . import _filters, _kernels, _ops
from ._params import CISCA_PRESETS, CiscaParams
from ._reference import CROSS, EIGHT

_KERNELS = _filters.directional_kernels()


@cache
def _disk(radius: int) -> np.ndarray:
    return disk(radius).astype(bool)


@cache
def _square(side: int) -> np.ndarray:
    return np.ones((side, side), bool)


def _check_inputs(classes_prob, directions, types_prob, params) -> tuple:
    classes_prob = np.ascontiguousarray(classes_prob, np.float32)
    directions = np.ascontiguousarray(directions, np.float32)
    if classes_prob.ndim != 3 or classes_prob.shape[0] != 3:
        raise ValueError(f"classes_prob must be (3, H, W), got {classes_prob.shape}")
    hw = classes_prob.shape[1:]
    if directions.ndim != 3 or directions.shape[0] not in (2, 4) or directions.shape[1:] != hw:
        raise ValueError(f"directions must be (4 or 2, H, W) with (H, W) = {hw}, got {directions.shape}")
    if types_prob is not None:
        types_prob = np.ascontiguousarray(types_prob, np.float32)
        if types_prob.ndim != 3 or types_prob.shape[1:] != hw or types_prob.shape[0] < 1:
            raise ValueError(f"types_prob must be (C + 1, H, W) with (H, W) = {hw}, got {types_prob.shape}")
    if not isinstance(params, CiscaParams):
        raise TypeError(f"params must be a CiscaParams (see CISCA_PRESETS), got {type(params).__name__}")
    return classes_prob, directions, types_prob


def contours(classes_prob: np.ndarray, directions: np.ndarray, p: CiscaParams):
    """Steps 1-2: (FG, Cth), (H, W) bool each.

    Cth = FG ∧ max_k(1 - minmax(resp_k)) >= th is evaluated as FG ∧ ∨_k (resp_k <= cut_k), with
    ``cut_k`` found once per map (``_filter_kernels.response_cut``, exact); non-finite responses or a threshold
    <= 0 take the literal route. One compiled call (``_contours_kernel``)."""
    lims = np.array([(d.min(), d.max()) for d in directions], np.float64)  # numpy's vectorised reductions
    fg, cth, exact = _contours_kernel(classes_prob, directions, lims, _KERNELS, p.fg_threshold, p.contour_threshold)
    return fg, cth if exact else _contours_literal(fg, directions, p)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _finite(x):
    """True iff every value is finite (a NaN or an infinity makes the sum of ``v * 0`` NaN, in any order)."""
    flat, acc = x.ravel(), 0.0
    for i in range(flat.size):
        acc += np.float64(flat[i]) * 0.0
    return acc == 0.0


@njit(cache=True, nogil=True, fastmath={"nnan", "ninf"})
def _minmax(x):
    """``x.min(), x.max()`` in float64 for finite ``x`` (check with ``_finite`` first). Min and max are exact in
    any order; four interleaved accumulators let LLVM vectorise the reduction (as fast as numpy's)."""
    flat = x.ravel()
    n = flat.size
    m = n - n % 4
    l0 = l1 = l2 = l3 = h0 = h1 = h2 = h3 = np.float64(flat[0])
    for i in range(0, m, 4):
        a, b, c, d = np.float64(flat[i]), np.float64(flat[i + 1]), np.float64(flat[i + 2]), np.float64(flat[i + 3])
        l0, l1, l2, l3 = (a if a < l0 else l0), (b if b < l1 else l1), (c if c < l2 else l2), (d if d < l3 else l3)
        h0, h1, h2, h3 = (a if a > h0 else h0), (b if b > h1 else h1), (c if c > h2 else h2), (d if d > h3 else h3)
    lo, hi = min(min(l0, l1), min(l2, l3)), max(max(h0, h1), max(h2, h3))
    for i in range(m, n):
        v = np.float64(flat[i])
        lo, hi = (v if v < lo else lo), (v if v > hi else hi)
    return lo, hi


@njit(cache=True, nogil=True)
def _contours_kernel(classes, directions, lims, kernels, fg_threshold, threshold):
    """(FG, FG ∧ ∨_k resp_k <= cut_k, True), or (FG, -, False) when the literal route is needed. ``lims``:
    (K, 2) min and max of each directional map (NaN when it holds a NaN, as numpy's)."""
    fg = _fk.foreground(classes, fg_threshold)
    hit = np.zeros(fg.shape, np.bool_)
    resp = np.empty(fg.shape)
    for k in range(directions.shape[0]):
        lo, hi = lims[k, 0], lims[k, 1]
        if not (threshold > 0 and np.isfinite(lo) and np.isfinite(hi)):
            return fg, hit, False
        _fk.correlate5_minmax(directions[k], lo, hi, kernels[k], resp)
        if not _finite(resp):
            return fg, hit, False
        rlo, rhi = _minmax(resp)
        _fk.or_below(resp, _fk.response_cut(rlo, rhi, threshold), hit)
    return fg, fg & hit, True


def _contours_literal(fg: np.ndarray, directions: np.ndarray, p: CiscaParams) -> np.ndarray:
    best, resp = np.zeros(fg.shape), np.empty(fg.shape)
    for d, kernel in zip(directions, _KERNELS):
        _fk.correlate5_minmax(d, float(d.min()), float(d.max()), kernel, resp)
        _fk.unit_response(resp, float(resp.min()), float(resp.max()), best)
    return _fk.contour_threshold(fg, best, p.contour_threshold)


def landscape(classes_prob: np.ndarray, fg: np.ndarray, cth: np.ndarray, p: CiscaParams) -> np.ndarray:
    """Step 3: the landscape E, zero-padded to (H + 2, W + 2) float64 for the watershed."""
    w = p.mix_weight
    return _fk.cisca_landscape(classes_prob[1], fg & ~cth, (1.0 - w) * 255.0, w * 255.0)


def seeds(classes_prob: np.ndarray, cth: np.ndarray, p: CiscaParams) -> np.ndarray:
    """Step 4: markers, (H, W) int32 1..n in raster order."""
    skeleton = skeletonize(cth) if cth.any() else cth
    return _seeds_kernel(classes_prob, cth, skeleton, _square(p.skeleton_square), p.seed_min_area,
                         _disk(p.erosion_radius), p.erosion_radius > 0, CROSS, p.min_seed_size)


@njit(cache=True, nogil=True)
def _seeds_kernel(classes, cth, skeleton, square, seed_min_area, erosion_disk, grow, cross, min_seed_size):
    """``seeds`` after the skeleton (scikit-image's, computed outside): one compiled call."""
    body = classes[1]
    mask = (body > classes[0]) & (body > classes[2])
    mask &= ~(cth & _kernels.morph(skeleton, square, True, False))
    labels, n = _kernels.label(mask, True)
    labels, n = _kernels.remove_small(labels, n, seed_min_area)
    kept = _kernels.rescue(_kernels.morph(labels > 0, erosion_disk, False, True), labels, n)
    grown = _kernels.morph(kept, cross, True, False) if grow else kept
    groups, n = _kernels.label(grown, True)
    return _kernels.label(_kernels.keep_groups(kept, groups, n, min_seed_size), True)[0]


def watershed_mask(classes_prob: np.ndarray, p: CiscaParams) -> np.ndarray:
    """Step 5: M = P_boundary + P_body > P_background (a 1-4 px background filled), opened (border 0)."""
    return _mask_kernel(classes_prob, EIGHT if p.opening == "square" else CROSS)


@njit(cache=True, nogil=True)
def _mask_kernel(classes, fp):
    mask = _fk.watershed_region(classes)
    if 0 < mask.size - np.count_nonzero(mask) < 5:
        mask[:] = True
    return _kernels.morph(_kernels.morph(mask, fp, False, False), fp, True, False)


def soft_types(inst: np.ndarray, n: int, types_prob: np.ndarray | None) -> np.ndarray:
    """CISCA.md §3 step 8: per-instance sum of type probabilities, argmax; background falls back.

    Args:
        inst: (H, W) int32 instances 1..n.
        n: number of instances.
        types_prob: (C + 1, H, W) float32 softmax, channel 0 = background, or None (every instance 1).

    Returns:
        (H, W) uint8 type map, 0 on background.
    """
    if types_prob is None:
        return (inst > 0).astype(np.uint8)
    return _types_kernel(inst, n, types_prob)


@njit(cache=True, nogil=True)
def _types_kernel(inst, n, types_prob):
    """``soft_types`` with probabilities: argmax of each instance's sums (first maximum, as np.argmax); an
    instance voting background takes its best foreground type."""
    sums = _kernels.vote_soft(inst, n, types_prob, False)
    k = sums.shape[1]
    best = np.zeros(n + 1, np.uint8)
    for i in range(1, n + 1):
        b = 0
        for c in range(1, k):
            if sums[i, c] > sums[i, b] or (np.isnan(sums[i, c]) and not np.isnan(sums[i, b])):
                b = c
        if b == 0 and k > 1:
            b = 1
            for c in range(2, k):
                if sums[i, c] > sums[i, b] or (np.isnan(sums[i, c]) and not np.isnan(sums[i, b])):
                    b = c
        best[i] = b
    return _kernels.lookup(inst, best)


@njit(cache=True, nogil=True)
def _finish_kernel(classes, fg, cth, markers, a, b, fp, offsets, min_area, types_prob, typed):
    """Steps 3, 5-8 in one compiled call: landscape, watershed mask, flooding, area filter, type vote."""
    land = _fk.cisca_landscape(classes[1], fg & ~cth, a, b)
    flooded = _kernels.flood(land, markers, _mask_kernel(classes, fp), offsets)
    inst, n = _kernels.union_filter(flooded, markers.max() if markers.size else 0, min_area)
    return inst, (_types_kernel(inst, n, types_prob) if typed else (inst > 0).astype(np.uint8))


def cisca_instances(classes_prob: np.ndarray, directions: np.ndarray, types_prob: np.ndarray | None = None,
                    params: CiscaParams = CISCA_PRESETS["40x"]) -> tuple[np.ndarray, np.ndarray]:
    """Instances and types from CISCA's three heads (CISCA.md §3, faithful to the released code).

    Steps: foreground; directional-derivative contour map thresholded at 0.57; seeds = body argmax cut
    along the dilated skeleton of the contours, size-filtered, eroded (vanished seeds rescued whole),
    grouped within ~2 px for the seed-size filter, then relabelled as 8-connected pieces; watershed
    (8-connected) of 0.5·255·(1 - P_body) + 0.5·255·(1 - blurred interior) inside the opened mask
    P_boundary + P_body > P_background; area filter (per instance and per 4-connected blob); soft type vote.

    Args:
        classes_prob: (3, H, W) float32 softmax: boundary, body, background.
        directions: (4, H, W) float32 maps h, v, tl, bl (or (2, H, W): h, v).
        types_prob: (C + 1, H, W) float32 softmax (channel 0 = background) or None.
        params: a ``CiscaParams``, e.g. ``CISCA_PRESETS["conic"]``.

    Returns:
        (inst_map (H, W) int32 ids 1..n, type_map (H, W) uint8, 0 on background).

    Example:
        >>> import numpy as np
        >>> from cellembed.targets import cisca_targets
        >>> inst = np.zeros((48, 48), np.int32); inst[8:30, 6:24] = 1; inst[8:30, 24:42] = 2
        >>> t = cisca_targets(inst, magnification="40x")
        >>> onehot = (np.arange(3)[:, None, None] == t.classes).astype(np.float32)
        >>> out, types = cisca_instances(onehot, t.directions, None, CISCA_PRESETS["40x"])
        >>> int(out.max()), int((out == inst).mean() > 0.98)
        (2, 1)
    """
    classes_prob, directions, types_prob = _check_inputs(classes_prob, directions, types_prob, params)
    p = params
    fg, cth = contours(classes_prob, directions, p)
    markers = seeds(classes_prob, cth, p)
    h, w = markers.shape
    _ops.check_flood_size(h, w)
    typed = types_prob is not None
    return _finish_kernel(classes_prob, fg, cth, markers, (1.0 - p.mix_weight) * 255.0, p.mix_weight * 255.0,
                          EIGHT if p.opening == "square" else CROSS, _ops.neighbour_offsets(w + 2, 2), p.min_area,
                          types_prob if typed else np.zeros((1, 1, 1), np.float32), typed)
