"""HoVer-Net instance extraction (``__proc_np_hv``, METRICS.md §3.1), numba path; twin in ``_reference``.

Inputs are validated once in ``hover_instances``; the stages below call the kernels directly and mirror
the ``_reference`` stages of the same name.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from . import _filter_kernels as _fk
from . import _filters, _kernels, _ops
from ._params import HOVER_PRESETS, HoverParams
from ._reference import ELLIPSE5


@cache
def _sobel(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    return _filters.sobel_kernels(ksize)


def foreground(np_prob: np.ndarray, p: HoverParams) -> np.ndarray:
    """Step 1: NP >= 0.5 without 4-connected components under ``min_fg`` px, (H, W) bool."""
    labels, n = _kernels.label(np_prob >= p.np_threshold, False)
    return _kernels.remove_small(labels, n, p.min_fg)[0] > 0


def energy(blb: np.ndarray, hv: np.ndarray, p: HoverParams) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-7a: (landscape ``dist`` zero-padded to (H + 2, W + 2), marker seeds FG ∧ energy < 0.4)."""
    smooth, deriv = _sobel(p.ksize)
    best = np.zeros(blb.shape)
    for axis, x in ((1, hv[0]), (0, hv[1])):
        resp = _fk.sobel(x, axis, float(x.min()), float(x.max()), smooth, deriv)
        _fk.unit_response(resp, float(resp.min()), float(resp.max()), best)
    return _fk.hover_landscape(blb, best, p.energy_threshold)


def markers(seeds: np.ndarray, p: HoverParams) -> np.ndarray:
    """Step 7: holes filled, opened by the 5x5 ellipse (OpenCV borders), 4-connected, >= ``min_marker`` px."""
    opened = _kernels.morph(_kernels.morph(_kernels.fill_holes(seeds), ELLIPSE5, False, True), ELLIPSE5, True, False)
    labels, n = _kernels.label(opened, False)
    return _kernels.remove_small(labels, n, p.min_marker)[0]


def _majority(inst: np.ndarray, n: int, nc_prob: np.ndarray | None) -> np.ndarray:
    if nc_prob is None:
        return (inst > 0).astype(np.uint8)
    counts = _kernels.vote_argmax(inst, n, nc_prob, False)
    best = np.argmax(counts, axis=1)
    if counts.shape[1] > 1:
        has_alt = counts[:, 1:].max(axis=1) > 0
        best = np.where((best == 0) & has_alt, 1 + np.argmax(counts[:, 1:], axis=1), best)
    best[0] = 0
    return _kernels.lookup(inst, best.astype(np.uint8))


def hover_raw(np_prob: np.ndarray, hv: np.ndarray, p: HoverParams) -> np.ndarray:
    """``__proc_np_hv`` on one validated map set: (H, W) int32 instances (twin: ``hover_raw_reference``)."""
    blb = foreground(np_prob, p)
    dist, seeds = energy(blb, hv, p)
    return _ops.flood(dist, markers(seeds, p), blb, 1)


def hover_instances(np_prob: np.ndarray, hv: np.ndarray, nc_prob: np.ndarray | None = None,
                    magnification: str = "40x", upsample_20x: bool = True, *,
                    reference: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """HoVer-Net post-processing: NP >= 0.5, min-max HV, Sobel energy, markers, watershed, majority type.

    At 40x the published constants (Sobel 21, markers >= 10 px). At 20x, by default the CoNIC remedy:
    maps resized x2 (bilinear), processed at 40x, labels resized back (nearest); with
    ``upsample_20x=False``, CellViT's 20x constants (Sobel 11, markers >= 3 px) on the maps as they are.

    Args:
        np_prob: (H, W) float nucleus probability.
        hv: (2, H, W) float horizontal then vertical offset maps.
        nc_prob: (C + 1, H, W) float type softmax (channel 0 = background) or None (every instance 1).
        magnification: "20x" or "40x".
        upsample_20x: at 20x, process at x2 and downsample (recommended; METRICS.md §3.3).
        reference: use the scipy / scikit-image twin (slow; tests and benchmarks).

    Returns:
        (inst_map (H, W) int32 ids 1..n, type_map (H, W) uint8): type = most frequent argmax type,
        the runner-up when that is background and another type is present.
    """
    np_prob, hv = np.ascontiguousarray(np_prob, np.float32), np.ascontiguousarray(hv, np.float32)
    if np_prob.ndim != 2 or hv.shape != (2,) + np_prob.shape:
        raise ValueError(f"need np_prob (H, W) and hv (2, H, W); got {np_prob.shape}, {hv.shape}")
    if nc_prob is not None and (np.ndim(nc_prob) != 3 or np.shape(nc_prob)[1:] != np_prob.shape):
        raise ValueError(f"nc_prob must be (C + 1, H, W) with (H, W) = {np_prob.shape}, got {np.shape(nc_prob)}")
    if magnification not in HOVER_PRESETS:
        raise ValueError(f"unknown magnification {magnification!r}; valid: {', '.join(HOVER_PRESETS)}")
    if reference:
        return _hover_reference(np_prob, hv, nc_prob, magnification, upsample_20x)
    if nc_prob is not None:
        nc_prob = np.ascontiguousarray(nc_prob)
        nc_prob = nc_prob if nc_prob.dtype in (np.float32, np.float64) else nc_prob.astype(np.float64)
    if magnification == "20x" and upsample_20x:
        up = _fk.upsample2(np.concatenate([np_prob[None], hv]))
        inst = hover_raw(up[0], np.ascontiguousarray(up[1:]), HOVER_PRESETS["40x"])[::2, ::2]
    else:
        inst = hover_raw(np_prob, hv, HOVER_PRESETS[magnification])
    inst, n = _kernels.remove_small(np.ascontiguousarray(inst), int(inst.max(initial=0)), 1)
    return inst, _majority(inst, n, nc_prob)


def _hover_reference(np_prob, hv, nc_prob, magnification: str, upsample_20x: bool):
    from ._reference import hover_raw_reference, majority_types_reference, remove_small_reference

    if magnification == "20x" and upsample_20x:
        up = _filters.upsample2(np.concatenate([np_prob[None], hv]))
        inst = hover_raw_reference(up[0], up[1:], HOVER_PRESETS["40x"])[::2, ::2]
    else:
        inst = hover_raw_reference(np_prob, hv, HOVER_PRESETS[magnification])
    inst = remove_small_reference(inst, 1)
    return inst, majority_types_reference(inst, None if nc_prob is None else np.asarray(nc_prob))
