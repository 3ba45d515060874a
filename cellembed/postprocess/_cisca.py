"""CISCA instance extraction (CISCA.md §3), numba path; twin: ``_reference.cisca_instances_reference``.

Inputs are validated once in ``cisca_instances``; the stages below then call the kernels directly. Each
stage mirrors the ``_reference`` stage of the same name (the benchmark times them side by side).
"""

from __future__ import annotations

from functools import cache

import numpy as np
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
    <= 0 take the literal route. Ranges come from numpy's vectorised ``min`` / ``max``.
    """
    fg = _fk.foreground(classes_prob, p.fg_threshold)
    hit, resp = np.zeros(fg.shape, bool), np.empty(fg.shape)
    for d, kernel in zip(directions, _KERNELS):
        _fk.correlate5_minmax(d, float(d.min()), float(d.max()), kernel, resp)
        lo, hi = float(resp.min()), float(resp.max())
        if not (p.contour_threshold > 0 and np.isfinite(lo) and np.isfinite(hi)):
            return fg, _contours_literal(fg, directions, p)
        _fk.or_below(resp, _fk.response_cut(lo, hi, p.contour_threshold), hit)
    return fg, fg & hit


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
    body = classes_prob[1]
    mask = (body > classes_prob[0]) & (body > classes_prob[2])
    if cth.any():
        mask &= ~(cth & _kernels.morph(skeletonize(cth), _square(p.skeleton_square), True, False))
    labels, n = _kernels.label(mask, True)
    labels, n = _kernels.remove_small(labels, n, p.seed_min_area)
    kept = _kernels.rescue(_kernels.morph(labels > 0, _disk(p.erosion_radius), False, True), labels, n)
    grown = _kernels.morph(kept, CROSS, True, False) if p.erosion_radius > 0 else kept
    groups, n = _kernels.label(grown, True)
    return _kernels.label(_kernels.keep_groups(kept, groups, n, p.min_seed_size), True)[0]


def watershed_mask(classes_prob: np.ndarray, p: CiscaParams) -> np.ndarray:
    """Step 5: M = P_boundary + P_body > P_background (a 1-4 px background filled), opened (border 0)."""
    mask = _fk.watershed_region(classes_prob)
    if 0 < mask.size - np.count_nonzero(mask) < 5:
        mask[:] = True
    fp = EIGHT if p.opening == "square" else CROSS
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
    sums = _kernels.vote_soft(inst, n, types_prob, False)
    best = np.argmax(sums, axis=1)
    if sums.shape[1] > 1:
        best = np.where(best == 0, 1 + np.argmax(sums[:, 1:], axis=1), best)
    best[0] = 0
    return _kernels.lookup(inst, best.astype(np.uint8))


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
    inst = _ops.flood(landscape(classes_prob, fg, cth, p), markers, watershed_mask(classes_prob, p), 2)
    inst, n = _kernels.union_filter(inst, int(markers.max(initial=0)), p.min_area)
    return inst, soft_types(inst, n, types_prob)
