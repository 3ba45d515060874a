"""CISCA training targets (CISCA.md §1): pixel classes, directional maps, types, loss weights."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk

from cellembed.postprocess import _kernels as _pk

from ._common import check_inst_map, check_type_map
from . import _directions
from ._graymask import BACKGROUND, GAP, PARAMS, graymask4

MAGNIFICATIONS = ("20x", "40x")
DIRECTION_MODES = ("fullrange", "tips")
WEIGHT_RADIUS = 6
WEIGHT_FAR = 0.05


class CiscaTargets(NamedTuple):
    """CISCA targets of one tile (all (H, W) axes are (row, col)).

    Attributes:
        classes: (H, W) uint8 3-class target: 0 = boundary, 1 = body, 2 = background or gap.
        graymask4: (H, W) uint8 CISCA's stored 4-level map: 0 boundary, 1 body, 2 background, 3 gap.
        directions: (4, H, W) float32 maps h, v, tl, bl in [-1, 1], 0 on background.
        types: (H, W) uint8 type target, 0 = background, 1..C (one-hot with C + 1 channels in the
            loss); ``inst_map > 0`` when no type map is given.
        weights: (H, W) float32 loss weights: 1 within a radius-6 disk of any instance, 0.05 elsewhere.
    """

    classes: np.ndarray
    graymask4: np.ndarray
    directions: np.ndarray
    types: np.ndarray
    weights: np.ndarray


def weight_map(inst: np.ndarray, reference: bool = False) -> np.ndarray:
    """CISCA.md §1.5: 1 on the radius-6 disk dilation of the foreground, 0.05 elsewhere.

    Args:
        inst: (H, W) integer instance map, 0 = background.
        reference: Euclidean distance transform <= 6 (scipy) instead of the numba dilation by the disk
            {dy² + dx² <= 36}; the two are the same set.

    Returns:
        (H, W) float32.
    """
    fg = np.ascontiguousarray(inst > 0)
    if not fg.any():
        return np.full(inst.shape, WEIGHT_FAR, np.float32)
    if reference:
        near = ndi.distance_transform_edt(~fg) <= WEIGHT_RADIUS
    else:
        near = _pk.morph(fg, _WEIGHT_DISK, True, False)
    return np.where(near, np.float32(1.0), np.float32(WEIGHT_FAR))


_WEIGHT_DISK = disk(WEIGHT_RADIUS).astype(bool)   # {dy² + dx² <= 36}


def _check_options(magnification: str, directions_mode: str) -> None:
    if magnification not in MAGNIFICATIONS:
        raise ValueError(f"unknown magnification {magnification!r}; valid: {', '.join(MAGNIFICATIONS)}")
    if directions_mode not in DIRECTION_MODES:
        raise ValueError(f"unknown directions {directions_mode!r}; valid: {', '.join(DIRECTION_MODES)}")


def cisca_targets(inst_map: np.ndarray, type_map: np.ndarray | None = None, magnification: str = "40x",
                  directions: str = "fullrange", *, reference: bool = False) -> CiscaTargets:
    """All CISCA targets of one tile, computed from its (augmented, cropped) instance map.

    The 4-level map follows CISCA's ``generate_graymask4`` notebook step by step (CISCA.md §1.1) with
    the 20x or 40x footprints. CISCA computed it once on the full image and cropped; here it is
    computed on whatever map is passed, so pixels within ~6 px of a crop edge can differ from CISCA's
    stored masks (a neighbour beyond the edge is unseen). Known deviation from CISCA.md's table: two
    cells 1 px apart at 40x get 4 boundary pixels per facing side, not 3 (see ``tests/test_targets.py``).

    Args:
        inst_map: (H, W) integer, 0 = background, ids >= 1 in any order (gaps allowed); an id covering
            disconnected pieces counts as one instance (no relabelling is done here).
        type_map: optional (H, W) integer per-pixel types, 0 = background, 1..C (at most 255).
        magnification: "20x" or "40x": footprints of the class map and tip length of "tips".
        directions: "fullrange" (per-instance min-max ramps) or "tips" (ramps only within
            b = 13 / 21 px of each extreme, as CISCA's augmented training path).
        reference: use the numpy/scikit-image twins instead of the numba kernels (slow; for tests).

    Returns:
        CiscaTargets(classes, graymask4, directions, types, weights).

    Example:
        >>> import numpy as np
        >>> inst = np.zeros((32, 48), np.int32); inst[8:24, 4:20] = 1; inst[8:24, 20:36] = 7
        >>> t = cisca_targets(inst, magnification="20x")
        >>> t.classes[16, 17:23].tolist(), [round(float(x), 3) for x in t.directions[:, 16, 4]]
        ([1, 1, 0, 0, 1, 1], [-1.0, 0.067, -0.467, -0.533])
    """
    _check_options(magnification, directions)
    inst = check_inst_map(inst_map)
    types = check_type_map(type_map, inst)
    gm4 = graymask4(inst, PARAMS[magnification], reference=reference)
    classes = np.where(gm4 == GAP, BACKGROUND, gm4).astype(np.uint8)
    build = _directions.directions_reference if reference else _directions.directions
    maps = build(inst, _directions.TIP_LENGTH[magnification], directions == "tips")
    return CiscaTargets(classes, gm4, maps, types, weight_map(inst, reference))

