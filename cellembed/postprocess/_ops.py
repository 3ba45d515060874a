"""Validating wrappers around the numba kernels (contract of each = its twin in ``_reference``)."""

from __future__ import annotations

import numpy as np

from . import _kernels

_OFFSETS = {}


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


def remove_small(labels: np.ndarray, min_area: int, n: int | None = None) -> np.ndarray:
    """Zero instances under ``min_area`` px and renumber 1..m in id order (int32 (H, W))."""
    labels = _check2d(labels, "labels", np.int32)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    n = int(labels.max(initial=0)) if n is None else n
    return _kernels.remove_small(labels, n, int(min_area))[0]


def rescue(eroded: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eroded pixels plus the components of ``labels`` that vanished entirely under the erosion.

    Args:
        eroded: (H, W) bool eroded mask (a subset of ``labels > 0``).
        labels: (H, W) int32 components of the mask before erosion, ids 1..n.

    Returns:
        (H, W) bool.
    """
    labels = _check2d(labels, "labels", np.int32)
    eroded = _check2d(eroded, "eroded", np.bool_)
    if eroded.shape != labels.shape:
        raise ValueError(f"shape mismatch {eroded.shape} vs {labels.shape}")
    return _kernels.rescue(eroded, labels, int(labels.max(initial=0)))


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
    h, w = image.shape
    w2 = w + 2
    offsets = np.array([-w2, -1, 1, w2] + ([-w2 - 1, -w2 + 1, w2 - 1, w2 + 1] if connectivity == 2 else []),
                       np.int64)
    out = np.pad(markers * mask, 1).ravel()
    _kernels.watershed(np.pad(image, 1).ravel(), out, np.pad(mask, 1).ravel(), offsets)
    return out.reshape(h + 2, w2)[1:-1, 1:-1].copy()


def vote_soft(inst: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-instance sums of probabilities: (n + 1, K) float64 for ``inst`` ids 0..n and (K, H, W) ``probs``."""
    inst = _check2d(inst, "inst", np.int32)
    probs = np.ascontiguousarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != inst.shape:
        raise ValueError(f"probs must be (K, H, W) with (H, W) = {inst.shape}, got {probs.shape}")
    return _kernels.vote_soft(inst, int(inst.max(initial=0)), probs)


def correlate(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.correlate(x, weights, mode="mirror")`` on a (H, W) array, float64, identical sums."""
    weights = np.ascontiguousarray(weights, np.float64)
    if weights.ndim != 2 or weights.shape[0] % 2 == 0 or weights.shape[1] % 2 == 0:
        raise ValueError(f"weights must be 2-D with odd sides, got {weights.shape}")
    x = _check2d(x, "x", np.float64)
    pad = ((weights.shape[0] // 2,) * 2, (weights.shape[1] // 2,) * 2)
    if pad[0][0] >= x.shape[0] or pad[1][0] >= x.shape[1]:
        from scipy import ndimage as ndi  # tiny inputs: numpy's reflect pad cannot fold several times
        return ndi.correlate(x, weights, mode="mirror")
    return _kernels.correlate(np.pad(x, pad, mode="reflect"), weights)


def erode(mask: np.ndarray, footprint: np.ndarray, border: bool = True) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, footprint, border_value=border)``, symmetric odd footprint."""
    fp = _footprint(footprint)
    padded = np.pad(_check2d(mask, "mask", np.bool_), ((fp.shape[0] // 2,) * 2, (fp.shape[1] // 2,) * 2),
                    constant_values=bool(border))
    return _kernels.morph(padded, fp, False)


def dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, footprint)``, symmetric odd footprint."""
    fp = _footprint(footprint)
    padded = np.pad(_check2d(mask, "mask", np.bool_), ((fp.shape[0] // 2,) * 2, (fp.shape[1] // 2,) * 2))
    return _kernels.morph(padded, fp, True)


def _footprint(fp: np.ndarray) -> np.ndarray:
    fp = np.ascontiguousarray(fp, np.bool_)
    if fp.ndim != 2 or fp.shape[0] % 2 == 0 or fp.shape[1] % 2 == 0 or not np.array_equal(fp, fp[::-1, ::-1]):
        raise ValueError(f"footprint must be 2-D, odd-sided and point-symmetric, got shape {fp.shape}")
    return fp
