"""HoVer-Net training targets (NP, HV, NC), as ``hover_net/models/hovernet/targets.py`` (METRICS.md §3.1)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _kernels
from ._common import check_inst_map, check_type_map, dense_labels, iter_objects

MIN_HV_AREA = 30
"""Instances with fewer pixels get no HV target (HoVer-Net's ``remove_small_objects(min_size=30)``)."""


class HoverTargets(NamedTuple):
    """HoVer-Net targets of one tile.

    Attributes:
        np: (H, W) uint8 nucleus pixel map, 1 on instances, 0 on background.
        hv: (2, H, W) float32, channel 0 = x (horizontal), 1 = y (vertical): each pixel's offset from
            its instance's rounded centre of mass, negative and positive sides scaled separately to
            [-1, 0] and [0, 1]; 0 on background and on instances under 30 px.
        nc: (H, W) uint8 type map, 0 = background, 1..C types (``inst_map > 0`` when no type map).
    """

    np: np.ndarray
    hv: np.ndarray
    nc: np.ndarray


def hover_hv_reference(inst: np.ndarray, min_area: int = MIN_HV_AREA) -> np.ndarray:
    """Numpy twin of the numba HV path: HoVer-Net's ``gen_instance_hv_map`` loop.

    Faithful details: the centre of mass is rounded half up, and coordinates are counted from 1, so
    the zero line sits one pixel right of / below the rounded centre (HoVer-Net's ``np.arange(1, w + 1)``).
    Deviation: HoVer-Net pads the box by 2 px without clipping at the tile border, which drops
    instances within 2 px of the top or left edge; here the box is clipped, so they keep their targets.

    Args:
        inst: (H, W) int64 instance map, 0 = background.
        min_area: instances with fewer pixels stay 0.

    Returns:
        (2, H, W) float32: x then y.
    """
    out = np.zeros((2,) + inst.shape, np.float32)
    for lab, sl in iter_objects(inst):
        mask = inst[sl] == lab
        if mask.sum() < min_area:
            continue
        rows, cols = np.nonzero(mask)
        com = np.floor(np.array([rows.mean(), cols.mean()]) + 0.5)
        for ch, offs in enumerate((cols - com[1] + 1.0, rows - com[0] + 1.0)):
            vals = np.zeros_like(offs)
            if offs.min() < 0:
                vals[offs < 0] = offs[offs < 0] / -offs.min()
            if offs.max() > 0:
                vals[offs > 0] = offs[offs > 0] / offs.max()
            out[ch, rows + sl[0].start, cols + sl[1].start] = vals
    return out


def hover_hv(inst: np.ndarray, min_area: int = MIN_HV_AREA) -> np.ndarray:
    """Numba path, same contract as ``hover_hv_reference``."""
    labels, n = dense_labels(inst)
    return _kernels.fill_hover(labels, _kernels.label_moments(labels, n), float(min_area))


def hover_targets(inst_map: np.ndarray, type_map: np.ndarray | None = None) -> HoverTargets:
    """HoVer-Net's NP, HV and NC targets from an instance map (compute after augmentation).

    Args:
        inst_map: (H, W) integer, 0 = background, ids >= 1 in any order (gaps allowed); an id covering
            several disconnected pieces is one instance.
        type_map: optional (H, W) integer type map, 0 = background, 1..C (at most 255).

    Returns:
        HoverTargets(np, hv, nc).

    Example:
        >>> import numpy as np
        >>> inst = np.zeros((16, 16), np.int32); inst[2:9, 3:10] = 5
        >>> t = hover_targets(inst)
        >>> t.hv.shape, t.hv.dtype.name, float(t.hv[0, 5, 3]), float(t.hv[0, 5, 9])
        ((2, 16, 16), 'float32', -1.0, 1.0)
    """
    inst = check_inst_map(inst_map)
    nc = check_type_map(type_map, inst)
    return HoverTargets((inst > 0).astype(np.uint8), hover_hv(inst), nc)
