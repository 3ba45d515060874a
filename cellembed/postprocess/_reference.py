"""Numpy / scipy / scikit-image twins: the executable specification of the numba path.

``cisca_instances_reference`` follows CISCA.md §3 step by step; ``hover_instances_reference`` follows
HoVer-Net's ``__proc_np_hv`` (METRICS.md §3.1). The fast path in ``_cisca`` / ``_hover`` must return
identical arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk, skeletonize
from skimage.segmentation import relabel_sequential, watershed

from . import _filters
from ._params import CiscaParams, HoverParams

EIGHT = np.ones((3, 3), bool)
CROSS = ndi.generate_binary_structure(2, 1)
ELLIPSE5 = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool)
"""``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))``."""


def remove_small_reference(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Zero labels with fewer than ``min_area`` pixels, then relabel 1..n keeping the order of ids."""
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    out = np.where(small[labels], 0, labels)
    return relabel_sequential(out)[0].astype(np.int32)


def opening_reference(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary opening; outside the tile counts as foreground for the erosion (OpenCV / skimage)."""
    eroded = ndi.binary_erosion(mask, footprint, border_value=1)
    return ndi.binary_dilation(eroded, footprint, border_value=0)


def cisca_seeds_reference(classes_prob: np.ndarray, cth: np.ndarray, p: CiscaParams) -> np.ndarray:
    """CISCA.md §3 step 4: seeds (markers), (H, W) int32 numbered 1..n in raster order."""
    body = classes_prob[1]
    seeds = (body > classes_prob[0]) & (body > classes_prob[2])
    cut = ndi.binary_dilation(skeletonize(cth), np.ones((p.skeleton_square,) * 2, bool))
    seeds &= ~(cth & cut)
    labels = remove_small_reference(ndi.label(seeds, EIGHT)[0], p.seed_min_area)
    seeds = labels > 0
    eroded = ndi.binary_erosion(seeds, disk(p.erosion_radius).astype(bool), border_value=1)
    vanished = seeds & ~ndi.binary_propagation(eroded, EIGHT, mask=seeds)
    kept = eroded | vanished
    grouped = ndi.label(ndi.binary_dilation(kept, CROSS), EIGHT)[0]
    return remove_small_reference(np.where(kept, grouped, 0), p.min_seed_size)


def vote_types_reference(inst: np.ndarray, types_prob: np.ndarray | None) -> np.ndarray:
    """CISCA.md §3 step 8: soft voting per instance; background wins fall back to the best real type.

    Returns:
        (H, W) uint8 type map (1 on every instance when ``types_prob`` is None).
    """
    if types_prob is None:
        return (inst > 0).astype(np.uint8)
    n = int(inst.max())
    sums = np.stack([np.bincount(inst.ravel(), weights=np.asarray(t, np.float64).ravel(), minlength=n + 1)
                     for t in types_prob], axis=1)
    best = np.argmax(sums, axis=1)
    if sums.shape[1] > 1:
        best = np.where(best == 0, 1 + np.argmax(sums[:, 1:], axis=1), best)
    best[0] = 0
    return best.astype(np.uint8)[inst]


def cisca_landscape(classes_prob: np.ndarray, directions: np.ndarray, p: CiscaParams, corr=None):
    """CISCA.md §3 steps 1-3 and 5: foreground, thresholded contours, landscape E, watershed mask.

    ``corr``: correlation function for the contour filters (default scipy's).

    Returns:
        (cth (H, W) bool, landscape (H, W) float64, mask (H, W) bool before the opening).
    """
    cell = classes_prob[0].astype(np.float64) + classes_prob[1]
    fg = cell >= p.fg_threshold
    cth = _filters.contour_map(directions, fg, corr) >= p.contour_threshold
    interior = _filters.blur3((fg & ~cth).astype(np.float64))
    w = p.mix_weight
    land = w * 255.0 * (1.0 - classes_prob[1]) + (1.0 - w) * 255.0 * (1.0 - interior)
    return cth, land, cell > classes_prob[2]


def cisca_instances_reference(classes_prob, directions, types_prob, params: CiscaParams):
    """Twin of ``cisca_instances`` (same contract), built from scipy / scikit-image calls."""
    p = params
    cth, land, mask = cisca_landscape(classes_prob, directions, p)
    markers = cisca_seeds_reference(classes_prob, cth, p)
    mask = opening_reference(mask, EIGHT if p.opening == "square" else CROSS)
    inst = watershed(land, markers, mask=mask, connectivity=2)
    inst = remove_small_reference(inst, p.min_area)
    return inst, vote_types_reference(inst, types_prob)


def hover_energy(np_prob: np.ndarray, hv: np.ndarray, p: HoverParams):
    """HoVer-Net steps 1-6: cleaned foreground, boundary energy and the landscape ``dist``.

    Returns:
        (blb (H, W) bool, overall (H, W) float64, dist (H, W) float64).
    """
    blb = np.asarray(np_prob) >= p.np_threshold
    blb = remove_small_reference(ndi.label(blb)[0], p.min_fg) > 0
    sh = 1.0 - _filters.minmax(_filters.sobel(_filters.minmax(hv[0]), 1, p.ksize))
    sv = 1.0 - _filters.minmax(_filters.sobel(_filters.minmax(hv[1]), 0, p.ksize))
    overall = np.clip(np.maximum(sh, sv) - (1.0 - blb), 0.0, None)
    dist = -_filters.blur3((1.0 - overall) * blb)
    return blb, overall, dist


def hover_raw_reference(np_prob: np.ndarray, hv: np.ndarray, p: HoverParams) -> np.ndarray:
    """HoVer-Net ``__proc_np_hv`` twin: (H, W) int32 instances (ids ascending, raster order of markers)."""
    blb, overall, dist = hover_energy(np_prob, hv, p)
    marker = ndi.binary_fill_holes(blb & (overall < p.energy_threshold))
    marker = opening_reference(marker, ELLIPSE5)
    marker = remove_small_reference(ndi.label(marker)[0], p.min_marker)
    return watershed(dist, marker, mask=blb, connectivity=1).astype(np.int32)


def majority_types_reference(inst: np.ndarray, nc_prob: np.ndarray | None) -> np.ndarray:
    """HoVer-Net ``process`` typing: the most frequent argmax type; if it is 0, the runner-up if present."""
    if nc_prob is None:
        return (inst > 0).astype(np.uint8)
    px = np.argmax(nc_prob, axis=0)
    n, c = int(inst.max()), nc_prob.shape[0]
    counts = np.bincount(inst.ravel() * c + px.ravel(), minlength=(n + 1) * c).reshape(n + 1, c)
    best = np.argmax(counts, axis=1)
    if c > 1:
        alt = 1 + np.argmax(counts[:, 1:], axis=1)
        has_alt = counts[:, 1:].max(axis=1) > 0
        best = np.where((best == 0) & has_alt, alt, best)
    best[0] = 0
    return best.astype(np.uint8)[inst]
