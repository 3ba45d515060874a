"""CISCA's 4-level pixel-class map ("graymask4"), CISCA.md §1.1.

Values: 0 = boundary between neighbouring cells, 1 = cell body, 2 = background, 3 = gap.
The 3-class training target merges 2 and 3.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import black_tophat, erosion, reconstruction

from cellembed.postprocess import _kernels as _pk

from . import _kernels
from ._common import iter_objects

BOUNDARY, BODY, BACKGROUND, GAP = 0, 1, 2, 3

_SQ3 = np.ones((3, 3), bool)
_SQ5 = np.ones((5, 5), bool)
_CROSS3 = ndi.generate_binary_structure(2, 1)
_DIAMOND5 = np.add.outer(np.abs(np.arange(-2, 3)), np.abs(np.arange(-2, 3))) <= 2


def _octagon(side: int, cuts: tuple[int, ...]) -> np.ndarray:
    """A square footprint with ``cuts[i]`` pixels removed at both ends of row i from top and bottom."""
    fp = np.ones((side, side), bool)
    for i, cut in enumerate(cuts):
        for row in (i, side - 1 - i):
            fp[row, :cut] = fp[row, side - cut:] = False
    return fp


MATLAB_DISK5 = _octagon(9, (2, 1))
"""9×9 MATLAB ``strel('disk', 5)`` (corners cut 2, 1), CISCA's 40x gap footprint."""
MATLAB_DISK6 = _octagon(11, (2, 1))
"""11×11 footprint CISCA's notebook uses as ``strel('disk', 6)`` (corners cut 2, 1), 40x F_near."""


class GraymaskParams(NamedTuple):
    """Footprints and sizes of CISCA.md §1.1 for one magnification (all footprints symmetric, odd)."""

    gap: np.ndarray      # black top-hat footprint
    touch: np.ndarray    # small per-cell dilation (K)
    near: np.ndarray     # large per-cell dilation (Kn)
    erode: np.ndarray    # opening-by-reconstruction probe for Kn
    grow1: np.ndarray    # thickening of fragments < minsize1
    grow2: np.ndarray    # thickening of fragments < minsize2
    minsize1: int
    minsize2: int
    max_hole: int        # holes (4-conn) strictly smaller than this are filled


PARAMS = {
    "20x": GraymaskParams(_SQ5, _SQ3, _SQ5, _SQ3, _SQ3, _CROSS3, 2, 4, 3),
    "40x": GraymaskParams(MATLAB_DISK5, _DIAMOND5, MATLAB_DISK6, _SQ5, _DIAMOND5, _SQ3, 6, 11, 8),
}


def _small(mask: np.ndarray, min_size: int, structure: np.ndarray, fast: bool = False) -> np.ndarray:
    """Pixels of ``mask`` in connected components of fewer than ``min_size`` pixels (``structure`` is
    the 3x3 square or the cross; ``fast``: numba labelling instead of ``ndi.label``)."""
    if fast:
        lab, n = _pk.label(np.ascontiguousarray(mask, np.bool_), bool(structure.all()))
        small = (_pk.areas(lab, n) < min_size).astype(np.uint8)
        small[0] = 0
        return _pk.lookup(lab, small).view(np.bool_)
    lab, n = ndi.label(mask, structure=structure)
    if n == 0:
        return np.zeros_like(mask)
    return (np.bincount(lab.ravel(), minlength=n + 1) < min_size)[lab] & mask


def _fill_holes(mask: np.ndarray, max_hole: int, fast: bool = False) -> np.ndarray:
    """``mask`` with every 4-connected component of its complement smaller than ``max_hole`` set."""
    return mask | _small(~mask, max_hole, _CROSS3, fast)


def _dilate(mask: np.ndarray, footprint: np.ndarray, fast: bool) -> np.ndarray:
    """``ndi.binary_dilation`` (outside = background); numba when ``fast``."""
    if fast:
        return _pk.morph(np.ascontiguousarray(mask, np.bool_), footprint, True, False)
    return ndi.binary_dilation(mask, structure=footprint)


def _closing_reflect(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``ndi.grey_closing(mask, footprint, mode="reflect")`` of a binary mask, as numba binary morphology.

    Reflect mode mirrors the image about each edge (np.pad "symmetric"); with a symmetric footprint the
    dilation of the mirrored image is the mirror of the dilation, so padding by twice the footprint
    radius, dilating, eroding and cropping gives the reflect-mode closing exactly.
    """
    pad = 2 * (max(footprint.shape) // 2)
    if min(mask.shape) < pad:                      # mirrored more than once: leave it to scipy
        return ndi.grey_closing(mask.astype(np.uint8), footprint=footprint, mode="reflect") > 0
    padded = np.pad(mask, pad, mode="symmetric")
    closed = _pk.morph(_pk.morph(padded, footprint, True, False), footprint, False, True)
    return closed[pad:-pad, pad:-pad] if pad else closed


def _touch_mask_reference(inst: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Twin of ``foreign_within``: cell pixels covered by >= 2 per-instance dilations (CISCA's loop)."""
    count = np.zeros(inst.shape, np.int32)
    for lab, _ in iter_objects(inst):
        count += ndi.binary_dilation(inst == lab, structure=footprint)
    return (count >= 2) & (inst > 0)


def _touch_mask(inst: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Cell pixels with a pixel of another instance inside ``footprint`` (numba)."""
    offsets = np.argwhere(footprint).astype(np.int64) - np.array(footprint.shape) // 2
    return _kernels.foreign_within(inst, offsets)


def _vanishing(kn: np.ndarray, footprint: np.ndarray, reference: bool) -> np.ndarray:
    """Components (8-conn) of ``kn`` wiped out by erosion with ``footprint`` (border pixels ignored)."""
    if reference:                     # scikit-image as in CISCA's notebook (reflect mode at the border)
        eroded = erosion(kn.astype(np.uint8), footprint)
        return kn & (reconstruction(eroded, kn.astype(np.uint8)) == 0)
    eroded = _pk.morph(np.ascontiguousarray(kn, np.bool_), footprint, False, True)
    lab, n = _pk.label(np.ascontiguousarray(kn, np.bool_), True)
    keep = np.zeros(n + 1, bool)
    keep[lab[eroded]] = True
    return kn & ~keep[lab]


def _thicken(k: np.ndarray, cell: np.ndarray, min_size: int, grow: np.ndarray, max_hole: int,
             fast: bool = False) -> np.ndarray:
    """Step 4: grow K's pieces smaller than ``min_size`` (and K outside cells) by ``grow``, then fill holes."""
    small = k & ~(k & cell & ~_small(k & cell, min_size, _CROSS3, fast))
    return _fill_holes(k | (_dilate(small, grow, fast) & cell), max_hole, fast)


def graymask4(inst: np.ndarray, params: GraymaskParams, reference: bool = False) -> np.ndarray:
    """The 4-level map of CISCA.md §1.1 (steps 1–6), on a validated int64 instance map.

    Args:
        inst: (H, W) int64, 0 = background; ids need not be contiguous.
        params: footprints for the magnification (``PARAMS["20x"]`` or ``PARAMS["40x"]``).
        reference: use the scikit-image/scipy twins (per-instance dilations, morphological
            reconstruction) instead of the numba kernel and the label-based reconstruction.

    Returns:
        (H, W) uint8: 0 boundary, 1 body, 2 background, 3 gap.
    """
    cell = inst > 0
    fast = not reference
    if reference:
        tophat = black_tophat(inst, params.gap) > 0
    else:                                          # on background the top-hat equals the closing of the cells
        tophat = _closing_reflect(cell, params.gap)
    out = np.full(inst.shape, BODY, np.uint8)
    out[~cell] = np.where(tophat[~cell], GAP, BACKGROUND)                       # step 1
    if reference:
        k, kn = _touch_mask_reference(inst, params.touch), _touch_mask_reference(inst, params.near)
    else:
        lab32 = inst.astype(np.int32)
        k, kn = _touch_mask(lab32, params.touch), _touch_mask(lab32, params.near)   # step 2
    k, kn = _fill_holes(k, params.max_hole, fast), _fill_holes(kn, params.max_hole, fast)   # steps 3, 5 (holes)
    k = _thicken(k, cell, params.minsize1, params.grow1, params.max_hole, fast)       # step 4
    k = _thicken(k, cell, params.minsize2, params.grow2, params.max_hole, fast)
    out[k] = BOUNDARY
    out[_vanishing(kn, params.erode, reference)] = BOUNDARY                     # step 5
    near_boundary = _dilate(out == BOUNDARY, params.touch, fast)
    out[(out == GAP) & _small(out == GAP, 3, _CROSS3, fast) & near_boundary] = BOUNDARY   # step 6a
    near_boundary = _dilate(out == BOUNDARY, params.touch, fast)
    out[(out == BODY) & _small(out == BODY, 2, _CROSS3, fast) & near_boundary] = BOUNDARY  # step 6b
    out[_small(out == BOUNDARY, 2, _SQ3, fast)] = BODY                                 # step 6c
    return out
