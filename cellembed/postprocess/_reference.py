"""Numpy / scipy / scikit-image twins: the executable specification of the numba path.

``cisca_instances_reference`` follows CISCA's released ``postprocess`` (CISCA.md §3) step by step;
``hover_raw_reference`` follows HoVer-Net's ``__proc_np_hv`` (METRICS.md §3.1). Each pipeline is a chain
of stage functions (the benchmark times them one by one); the fast path in ``_cisca`` / ``_hover`` has the
same stages and must return identical arrays.
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
    """OpenCV's ``MORPH_OPEN``: outside the tile counts as foreground for the erosion (HoVer-Net)."""
    eroded = ndi.binary_erosion(mask, footprint, border_value=1)
    return ndi.binary_dilation(eroded, footprint, border_value=0)


# ---------------------------------------------------------------- CISCA (CISCA.md §3)


def cisca_contours_reference(classes_prob: np.ndarray, directions: np.ndarray, p: CiscaParams):
    """Steps 1-2: foreground FG = P_boundary + P_body >= 0.5 and thresholded contours Cth (both (H, W) bool)."""
    fg = classes_prob[0].astype(np.float64) + classes_prob[1] >= p.fg_threshold
    return fg, _filters.contour_map(directions, fg) >= p.contour_threshold


def cisca_landscape_reference(classes_prob: np.ndarray, fg: np.ndarray, cth: np.ndarray, p: CiscaParams):
    """Step 3: E = (1 - w)·255·(1 - P_body) + w·255·(1 - blur(FG ∧ ¬Cth)), w = distmapweight; (H, W) float64."""
    interior = _filters.blur3((fg & ~cth).astype(np.float64))
    body = classes_prob[1].astype(np.float64)
    w = p.mix_weight
    return (1.0 - w) * 255.0 * (1.0 - body) + w * 255.0 * (1.0 - interior)


def cisca_seeds_reference(classes_prob: np.ndarray, cth: np.ndarray, p: CiscaParams) -> np.ndarray:
    """Step 4: markers, (H, W) int32 numbered 1..n in raster order.

    Body argmax, cut where Cth meets its dilated skeleton, components (8-conn) under A_min/4 dropped,
    eroded once by the marker disk with wholly vanished components kept, pieces within ~2 px grouped
    and groups under ``min_seed_size`` kept pixels dropped; the survivors are then relabelled as
    8-connected components, as CISCA's final ``label(img_rc, connectivity=2)`` does (so grouped pieces
    that do not touch become separate markers again).
    """
    body = classes_prob[1]
    seeds = (body > classes_prob[0]) & (body > classes_prob[2])
    cut = ndi.binary_dilation(skeletonize(cth), np.ones((p.skeleton_square,) * 2, bool))
    seeds &= ~(cth & cut)
    seeds = remove_small_reference(ndi.label(seeds, EIGHT)[0], p.seed_min_area) > 0
    eroded = ndi.binary_erosion(seeds, disk(p.erosion_radius).astype(bool), border_value=1)
    vanished = seeds & ~ndi.binary_propagation(eroded, EIGHT, mask=seeds)
    kept = eroded | vanished
    groups = ndi.label(ndi.binary_dilation(kept, CROSS) if p.erosion_radius > 0 else kept, EIGHT)[0]
    kept = remove_small_reference(np.where(kept, groups, 0), p.min_seed_size) > 0
    return ndi.label(kept, EIGHT)[0].astype(np.int32)


def cisca_mask_reference(classes_prob: np.ndarray, p: CiscaParams) -> np.ndarray:
    """Step 5: M = P_boundary + P_body > P_background, then ``ndimage.binary_opening`` (border 0).

    CISCA's "fill holes under 5 px" is ``remove_small_objects`` on the 0/1 integer complement, which sees
    the whole background as one object: it fills only a background of 1-4 pixels in total.
    """
    mask = classes_prob[0].astype(np.float64) + classes_prob[1] > classes_prob[2]
    if 0 < mask.size - np.count_nonzero(mask) < 5:
        mask = np.ones_like(mask)
    return ndi.binary_opening(mask, EIGHT if p.opening == "square" else CROSS)


def cisca_size_filter_reference(inst: np.ndarray, min_area: int) -> np.ndarray:
    """Step 7: ids under A_min px, and 4-connected components of the union under A_min px, are deleted
    (CISCA multiplies the two ``remove_small_objects`` results); relabel 1..n in id order."""
    kept = np.where(np.bincount(inst.ravel())[inst] >= min_area, inst, 0)
    comps = ndi.label(inst > 0)[0]
    kept = np.where(np.bincount(comps.ravel())[comps] >= min_area, kept, 0)
    return relabel_sequential(kept)[0].astype(np.int32)


def vote_types_reference(inst: np.ndarray, types_prob: np.ndarray | None) -> np.ndarray:
    """Step 8: soft voting per instance; background wins fall back to the best real type.

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


def cisca_instances_reference(classes_prob, directions, types_prob, params: CiscaParams):
    """Twin of ``cisca_instances`` (same contract), built from scipy / scikit-image calls."""
    p = params
    classes_prob, directions = np.asarray(classes_prob, np.float32), np.asarray(directions, np.float32)
    types_prob = None if types_prob is None else np.asarray(types_prob, np.float32)
    fg, cth = cisca_contours_reference(classes_prob, directions, p)
    land = cisca_landscape_reference(classes_prob, fg, cth, p)
    markers = cisca_seeds_reference(classes_prob, cth, p)
    mask = cisca_mask_reference(classes_prob, p)
    inst = watershed(land, markers, mask=mask, connectivity=2)
    inst = cisca_size_filter_reference(inst, p.min_area)
    return inst, vote_types_reference(inst, types_prob)


# ---------------------------------------------------------------- HoVer-Net (METRICS.md §3.1)


def hover_foreground_reference(np_prob: np.ndarray, p: HoverParams) -> np.ndarray:
    """Step 1: NP >= 0.5 without 4-connected components under ``min_fg`` px, (H, W) bool."""
    blb = np.asarray(np_prob) >= p.np_threshold
    return remove_small_reference(ndi.label(blb)[0], p.min_fg) > 0


def hover_energy_reference(blb: np.ndarray, hv: np.ndarray, p: HoverParams):
    """Steps 2-6: boundary energy ``overall`` and the landscape ``dist``, both (H, W) float64."""
    sh = 1.0 - _filters.minmax(_filters.sobel(_filters.minmax(hv[0]), 1, p.ksize))
    sv = 1.0 - _filters.minmax(_filters.sobel(_filters.minmax(hv[1]), 0, p.ksize))
    overall = np.clip(np.maximum(sh, sv) - (1.0 - blb), 0.0, None)
    dist = -_filters.blur3((1.0 - overall) * blb)
    return overall, dist


def hover_markers_reference(blb: np.ndarray, overall: np.ndarray, p: HoverParams) -> np.ndarray:
    """Step 7: FG ∧ energy < 0.4, holes filled, opened (5x5 ellipse), 4-connected, >= ``min_marker`` px."""
    marker = ndi.binary_fill_holes(blb & (overall < p.energy_threshold))
    marker = opening_reference(marker, ELLIPSE5)
    return remove_small_reference(ndi.label(marker)[0], p.min_marker)


def hover_raw_reference(np_prob: np.ndarray, hv: np.ndarray, p: HoverParams) -> np.ndarray:
    """HoVer-Net ``__proc_np_hv`` twin: (H, W) int32 instances (ids ascending, raster order of markers)."""
    blb = hover_foreground_reference(np_prob, p)
    overall, dist = hover_energy_reference(blb, hv, p)
    marker = hover_markers_reference(blb, overall, p)
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
