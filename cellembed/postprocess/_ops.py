"""Validating wrappers around the numba kernels (contract of each = its twin in ``_reference`` or scipy).

The pipelines in ``_cisca`` / ``_hover`` validate their inputs once and then call ``_kernels`` directly;
these wrappers are the public, checked entry points (and what the tests compare with scipy).
"""

from __future__ import annotations

import numpy as np

from . import _filter_kernels as _fk
from . import _kernels


def _check2d(x: np.ndarray, name: str, dtype=None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=dtype) if dtype is not None else np.ascontiguousarray(x)


def label(mask: np.ndarray, connectivity: int = 2) -> tuple[np.ndarray, int]:
    """Connected components (``scipy.ndimage.label`` numbering: raster order of first pixels).

    Args:
        mask: (H, W) bool.
        connectivity: 1 (4-neighbours) or 2 (8-neighbours).

    Returns:
        ((H, W) int32 labels 1..n, n).
    """
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    return _kernels.label(_check2d(mask, "mask", np.bool_), connectivity == 2)


def _labels(labels: np.ndarray) -> np.ndarray:
    labels = _check2d(labels, "labels", np.int32)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    return labels


def remove_small(labels: np.ndarray, min_area: int, n: int | None = None) -> np.ndarray:
    """Zero instances under ``min_area`` px and renumber 1..m in id order (int32 (H, W))."""
    labels = _labels(labels)
    n = int(labels.max(initial=0)) if n is None else n
    return _kernels.remove_small(labels, n, int(min_area))[0]


def union_filter(labels: np.ndarray, min_area: int) -> np.ndarray:
    """CISCA's final size filter (twin: ``_reference.cisca_size_filter_reference``), int32 (H, W) 1..m."""
    labels = _labels(labels)
    return _kernels.union_filter(labels, int(labels.max(initial=0)), int(min_area))[0]


def rescue(eroded: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eroded pixels plus the components of ``labels`` that vanished entirely under the erosion.

    Args:
        eroded: (H, W) bool eroded mask (a subset of ``labels > 0``).
        labels: (H, W) int32 components of the mask before erosion, ids 1..n.

    Returns:
        (H, W) bool.
    """
    labels = _labels(labels)
    eroded = _check2d(eroded, "eroded", np.bool_)
    if eroded.shape != labels.shape:
        raise ValueError(f"shape mismatch {eroded.shape} vs {labels.shape}")
    return _kernels.rescue(eroded, labels, int(labels.max(initial=0)))


def neighbour_offsets(width: int, connectivity: int) -> np.ndarray:
    """Raveled offsets of the neighbours in an image padded to ``width`` columns, scikit-image's order."""
    w2 = width
    four = [-w2, -1, 1, w2]
    return np.array(four + ([-w2 - 1, -w2 + 1, w2 - 1, w2 + 1] if connectivity == 2 else []), np.int64)


def check_flood_size(h: int, w: int) -> None:
    """The watershed's heap keys hold 32-bit pixel indices of the padded image."""
    if (h + 2) * (w + 2) >= 2**32:
        raise ValueError(f"watershed: image of {h} x {w} px is too large (heap keys hold 32-bit indices)")


def flood(padded_image: np.ndarray, markers: np.ndarray, mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Watershed on a landscape already zero-padded by 1 px (no checks; for the pipelines).

    Args:
        padded_image: (H + 2, W + 2) float64.
        markers: (H, W) int32; mask: (H, W) bool.

    Returns:
        (H, W) int32 labels.
    """
    h, w = markers.shape
    check_flood_size(h, w)
    return _kernels.flood(padded_image, markers, mask, neighbour_offsets(w + 2, connectivity))


def watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray, connectivity: int) -> np.ndarray:
    """``skimage.segmentation.watershed(image, markers, mask=mask, connectivity=...)``, same output.

    Args:
        image: (H, W) float landscape (cast to float64).
        markers: (H, W) int32 markers, 0 = unlabelled; markers outside ``mask`` are ignored.
        mask: (H, W) bool region to flood.
        connectivity: 1 or 2.

    Returns:
        (H, W) int32 labels.
    """
    image = _check2d(image, "image", np.float64)
    markers, mask = _check2d(markers, "markers", np.int32), _check2d(mask, "mask", np.bool_)
    if not image.shape == markers.shape == mask.shape:
        raise ValueError(f"shape mismatch {image.shape}, {markers.shape}, {mask.shape}")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    return flood(np.pad(image, 1), markers, mask, connectivity)


def vote_soft(inst: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-instance sums of probabilities: (n + 1, K) float64 for ``inst`` ids 0..n and (K, H, W) ``probs``."""
    inst = _labels(inst)
    probs = np.ascontiguousarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != inst.shape:
        raise ValueError(f"probs must be (K, H, W) with (H, W) = {inst.shape}, got {probs.shape}")
    return _kernels.vote_soft(inst, int(inst.max(initial=0)), probs, True)


def vote_argmax(inst: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-instance counts of the pixels' argmax class: (n + 1, K) int64 for (K, H, W) ``probs``."""
    inst = _labels(inst)
    probs = np.ascontiguousarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != inst.shape or probs.shape[0] < 1:
        raise ValueError(f"probs must be (K, H, W) with (H, W) = {inst.shape}, got {probs.shape}")
    return _kernels.vote_argmax(inst, int(inst.max(initial=0)), probs, True)


def correlate(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.correlate(x, weights, mode="mirror")`` on a (H, W) array, float64, identical sums."""
    weights = np.ascontiguousarray(weights, np.float64)
    if weights.ndim != 2 or weights.shape[0] % 2 == 0 or weights.shape[1] % 2 == 0:
        raise ValueError(f"weights must be 2-D with odd sides, got {weights.shape}")
    x = _check2d(x, "x", np.float64)
    index_r = _fk.mirror_index(x.shape[0], weights.shape[0] // 2)
    index_c = _fk.mirror_index(x.shape[1], weights.shape[1] // 2)
    padded = np.ascontiguousarray(x[index_r][:, index_c])
    return _fk.correlate_padded(padded, weights, np.empty(x.shape))


def correlate1d(x: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """``scipy.ndimage.correlate1d(x, weights, axis, mode="mirror")`` for an odd (anti)symmetric kernel."""
    weights = np.ascontiguousarray(weights, np.float64)
    if weights.ndim != 1 or weights.size % 2 == 0:
        raise ValueError(f"weights must be 1-D with an odd length, got {weights.shape}")
    if np.array_equal(weights, weights[::-1]):
        anti = False
    elif np.array_equal(weights, -weights[::-1]):
        anti = True
    else:
        raise ValueError("weights must be symmetric or antisymmetric")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    return _fk.correlate1d_sym(_check2d(x, "x", np.float64), weights, axis, anti)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (holes = background not 4-connected to the border)."""
    return _kernels.fill_holes(_check2d(mask, "mask", np.bool_))


def erode(mask: np.ndarray, footprint: np.ndarray, border: bool = True) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, footprint, border_value=border)``, symmetric odd footprint."""
    return _kernels.morph(_check2d(mask, "mask", np.bool_), _footprint(footprint), False, bool(border))


def dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, footprint)``, symmetric odd footprint."""
    return _kernels.morph(_check2d(mask, "mask", np.bool_), _footprint(footprint), True, False)


def _footprint(fp: np.ndarray) -> np.ndarray:
    fp = np.ascontiguousarray(fp, np.bool_)
    if fp.ndim != 2 or fp.shape[0] % 2 == 0 or fp.shape[1] % 2 == 0 or not np.array_equal(fp, fp[::-1, ::-1]):
        raise ValueError(f"footprint must be 2-D, odd-sided and point-symmetric, got shape {fp.shape}")
    return fp
