"""Input validation shared by the target builders."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

_DENSE_MAX_ID = 1 << 16
"""Label ids up to this value index per-label tables directly; larger ids are compacted first."""


def check_inst_map(inst_map: np.ndarray) -> np.ndarray:
    """Validate an instance map and return it as a C-contiguous (H, W) int64 view or copy.

    Args:
        inst_map: (H, W) integer array, 0 = background, ids >= 1 (any order, gaps allowed).

    Raises:
        ValueError: if it is not a 2-D integer array or holds negative ids.
    """
    inst = np.asarray(inst_map)
    if inst.ndim != 2 or inst.dtype.kind not in "iub":
        raise ValueError(f"inst_map must be a 2-D integer array, got shape {inst.shape} dtype {inst.dtype}")
    if inst.size and inst.dtype.kind == "i" and inst.min() < 0:
        raise ValueError("inst_map ids must be >= 0 (0 = background)")
    return np.ascontiguousarray(inst, dtype=np.int64)


def dense_labels(inst: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels as (H, W) int32 with ids small enough to index tables, and the table size.

    Ids are kept as they are when the largest is at most 65536; otherwise they are replaced by their
    rank (order preserved, 0 stays 0). Instance identity is unchanged either way.

    Args:
        inst: (H, W) non-negative int64 instance map (from ``check_inst_map``).

    Returns:
        (labels, n): labels (H, W) int32, and n = labels.max() + 1 (1 for an empty tile).
    """
    top = int(inst.max()) if inst.size else 0
    if top > _DENSE_MAX_ID:
        ids, inv = np.unique(inst, return_inverse=True)
        offset = 0 if ids[0] == 0 else 1
        return (inv.reshape(inst.shape) + offset).astype(np.int32), len(ids) + offset
    return inst.astype(np.int32), top + 1


def check_type_map(type_map: np.ndarray | None, inst: np.ndarray) -> np.ndarray:
    """The type target: ``type_map`` as (H, W) uint8, or ``inst > 0`` (one class) when None.

    Raises:
        ValueError: on a shape mismatch, a non-integer dtype or values outside 0..255.
    """
    if type_map is None:
        return (inst > 0).astype(np.uint8)
    types = np.asarray(type_map)
    if types.shape != inst.shape or types.dtype.kind not in "iub":
        raise ValueError(f"type_map must be an integer array of shape {inst.shape}, "
                         f"got shape {types.shape} dtype {types.dtype}")
    if types.size and (types.min() < 0 or types.max() > 255):
        raise ValueError("type_map values must lie in 0..255")
    return types.astype(np.uint8)


def iter_objects(inst: np.ndarray):
    """Yield ``(id, (row_slice, col_slice))`` for every instance id of ``inst`` in increasing order.

    Works for any non-negative ids (they are ranked first, so huge ids cost nothing).
    """
    ids = np.unique(inst)
    ids = ids[ids > 0]
    ranks = np.where(inst > 0, np.searchsorted(ids, inst) + 1, 0)
    for lab, sl in zip(ids, ndi.find_objects(ranks)):
        yield int(lab), sl
