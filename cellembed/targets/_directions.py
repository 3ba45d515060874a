"""CISCA's four directional maps (h, v, tl, bl), CISCA.md §1.2."""

from __future__ import annotations

import math

import numpy as np

from . import _kernels
from ._common import dense_labels, iter_objects

TIP_LENGTH = {"20x": 13, "40x": 21}
"""b of the "tips" variant per magnification; the diagonals use 1.4·b."""
DIAG_FACTOR = 1.4


def _ramp_hv_reference(k: np.ndarray, extent: int, b: int, tips: bool) -> np.ndarray:
    """h/v values for positions ``k`` (0-based within a bounding box of ``extent`` > 1 pixels)."""
    if tips and extent > 2 * b:
        d = np.where(k < b, k / (2 * b), np.where(k >= extent - b, (k - extent + 1 + 2 * b) / (2 * b), 0.5))
    else:
        d = k / (extent - 1)
    return 2.0 * d - 1.0


def _ramp_diag_reference(s: np.ndarray, bd: float, tips: bool) -> np.ndarray:
    """tl/bl values for projections ``s`` of one instance's pixels.

    Tips: as CISCA's ``dir_distance_map``, the ramp values are truncated to integers (the code writes
    floats into an integer array), so the plateau is floor(1.4·b) and the top floor(2·1.4·b).
    """
    lo, hi = s.min(), s.max()
    if tips and hi - lo > 2 * bd:
        d = np.where(s <= lo + bd, s - lo, np.where(s >= hi - bd, np.floor(s - hi + 2 * bd), math.floor(bd)))
        return 2.0 * d / math.floor(2 * bd) - 1.0
    if hi == lo:
        return np.full(s.shape, -1.0)
    return 2.0 * (s - lo) / (hi - lo) - 1.0


def directions_reference(inst: np.ndarray, b: int, tips: bool) -> np.ndarray:
    """Numpy twin of the numba path: one instance at a time, as CISCA's code.

    Args:
        inst: (H, W) int64 instance map, 0 = background.
        b: tip length (only used when ``tips``).
        tips: "tips" variant instead of "fullrange".

    Returns:
        (4, H, W) float32: h, v, tl, bl.
    """
    out = np.zeros((4,) + inst.shape, np.float32)
    for lab, sl in iter_objects(inst):
        if sl[0].stop - sl[0].start == 1 or sl[1].stop - sl[1].start == 1:
            continue
        rows, cols = np.nonzero(inst[sl] == lab)
        r, c = rows + sl[0].start, cols + sl[1].start
        out[0, r, c] = _ramp_hv_reference(cols, sl[1].stop - sl[1].start, b, tips)
        out[1, r, c] = _ramp_hv_reference(rows, sl[0].stop - sl[0].start, b, tips)
        out[2, r, c] = _ramp_diag_reference(r + c, DIAG_FACTOR * b, tips)
        out[3, r, c] = _ramp_diag_reference(c - r, DIAG_FACTOR * b, tips)
    return out


def directions(inst: np.ndarray, b: int, tips: bool) -> np.ndarray:
    """Numba path, same contract as ``directions_reference``."""
    labels, n = dense_labels(inst)
    ext = _kernels.label_extents(labels, n)
    return _kernels.fill_directions(labels, ext, int(b), DIAG_FACTOR * b, bool(tips))


def dihedral_safe(inst: np.ndarray) -> bool:
    """Whether the fullrange maps of every dihedral variant of ``inst`` are the variant's signed channel
    permutation of these maps (``cellembed.cache._augment.DIRECTION_MAP``).

    The ramps are linear in r, c, r + c and c - r, so a flip or quarter turn only swaps h/v, swaps tl/bl and
    changes signs. The one exception: an instance spanning >= 2 rows and columns whose r + c or c - r is
    constant (a diagonal line of pixels) gets -1 on that map, which a sign change would make +1.
    """
    labels, n = dense_labels(inst)
    ext = _kernels.label_extents(labels, n)[1:]
    present = ext[:, 0] <= ext[:, 1]
    wide = (ext[:, 0] != ext[:, 1]) & (ext[:, 2] != ext[:, 3])
    flat = (ext[:, 4] == ext[:, 5]) | (ext[:, 6] == ext[:, 7])
    return not bool(np.any(present & wide & flat))
