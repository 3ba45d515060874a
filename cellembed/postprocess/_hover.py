"""HoVer-Net instance extraction (``__proc_np_hv``, METRICS.md §3.1), numba path; twin in ``_reference``."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from . import _filters, _ops
from ._params import HOVER_PRESETS, HoverParams
from ._reference import ELLIPSE5, hover_energy


def _majority(inst: np.ndarray, nc_prob: np.ndarray | None) -> np.ndarray:
    if nc_prob is None:
        return (inst > 0).astype(np.uint8)
    c = nc_prob.shape[0]
    onehot = (np.argmax(nc_prob, axis=0)[None] == np.arange(c)[:, None, None]).astype(np.float32)
    counts = _ops.vote_soft(inst, onehot)
    best = np.argmax(counts, axis=1)
    if c > 1:
        has_alt = counts[:, 1:].max(axis=1) > 0
        best = np.where((best == 0) & has_alt, 1 + np.argmax(counts[:, 1:], axis=1), best)
    best[0] = 0
    return best.astype(np.uint8)[inst]


def hover_raw(np_prob: np.ndarray, hv: np.ndarray, p: HoverParams) -> np.ndarray:
    """``__proc_np_hv`` on one map set: (H, W) int32 instances (twin: ``hover_raw_reference``)."""
    blb = np.asarray(np_prob) >= p.np_threshold
    blb = _ops.remove_small(_ops.label(blb, 1)[0], p.min_fg) > 0
    _, overall, dist = hover_energy(blb.astype(np.float32), hv, p)
    marker = ndi.binary_fill_holes(blb & (overall < p.energy_threshold))
    marker = _ops.dilate(_ops.erode(marker, ELLIPSE5), ELLIPSE5)
    marker = _ops.remove_small(_ops.label(marker, 1)[0], p.min_marker)
    return _ops.watershed(dist, marker, blb, 1)


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
    from ._reference import hover_raw_reference, majority_types_reference, remove_small_reference

    np_prob, hv = np.asarray(np_prob, np.float32), np.asarray(hv, np.float32)
    if np_prob.ndim != 2 or hv.shape != (2,) + np_prob.shape:
        raise ValueError(f"need np_prob (H, W) and hv (2, H, W); got {np_prob.shape}, {hv.shape}")
    if nc_prob is not None and (np.ndim(nc_prob) != 3 or np.shape(nc_prob)[1:] != np_prob.shape):
        raise ValueError(f"nc_prob must be (C + 1, H, W) with (H, W) = {np_prob.shape}, got {np.shape(nc_prob)}")
    if magnification not in HOVER_PRESETS:
        raise ValueError(f"unknown magnification {magnification!r}; valid: {', '.join(HOVER_PRESETS)}")
    raw = hover_raw_reference if reference else hover_raw
    if magnification == "20x" and upsample_20x:
        up = _filters.upsample2(np.concatenate([np_prob[None], hv]))
        inst = raw(up[0], up[1:], HOVER_PRESETS["40x"])[::2, ::2]
    else:
        inst = raw(np_prob, hv, HOVER_PRESETS[magnification])
    if reference:
        inst = remove_small_reference(inst, 1)
        return inst, majority_types_reference(inst, None if nc_prob is None else np.asarray(nc_prob))
    inst = _ops.remove_small(inst, 1)
    return inst, _majority(inst, None if nc_prob is None else np.asarray(nc_prob))
