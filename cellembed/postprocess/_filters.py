"""Float stages of the twins (scipy): min-max scaling, the directional-derivative and Sobel filters, the
3x3 Gaussian, bilinear x2 resizing (OpenCV conventions, reflect-101 borders). The numba path repeats
them bit for bit in ``_filter_kernels``; the kernel builders here serve both."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over the whole array (OpenCV ``NORM_MINMAX``); a constant array gives 0.

    Args:
        x: any-shape float array.

    Returns:
        float64 array of the same shape.
    """
    x = np.asarray(x, np.float64)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def directional_kernels() -> np.ndarray:
    """CISCA's 5x5 directional-derivative kernels for h, v, tl, bl (CISCA.md §3 step 2).

    Returns:
        (4, 5, 5) float64: d_x, d_y, d_x + d_y and d_x - d_y, each over d_x^2 + d_y^2 (0 at the
        centre), with d_y the row offset (down) and d_x the column offset (right).
    """
    dy, dx = np.mgrid[-2:3, -2:3].astype(np.float64)
    r2 = dx * dx + dy * dy
    r2[2, 2] = 1.0
    return np.stack([dx, dy, dx + dy, dx - dy]) / r2


def correlate(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation with reflect-101 borders (OpenCV ``filter2D`` default), float64."""
    return ndi.correlate(np.asarray(x, np.float64), kernel, mode="mirror")


def contour_map(directions: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """CISCA's gradient contour map (CISCA.md §3 step 2), before thresholding.

    Args:
        directions: (K, H, W) float maps h, v[, tl, bl] (K = 2 or 4).
        fg: (H, W) bool foreground.

    Returns:
        (H, W) float64 in [0, 1], 0 outside ``fg``; high on contours between and around cells.
    """
    kernels = directional_kernels()
    out = np.zeros(fg.shape, np.float64)
    for k in range(directions.shape[0]):
        resp = 1.0 - minmax(correlate(minmax(directions[k]), kernels[k]))
        np.maximum(out, resp, out=out)
    return np.clip(out - (1.0 - fg), 0.0, None)


def blur3(x: np.ndarray) -> np.ndarray:
    """OpenCV ``GaussianBlur(x, (3, 3), 0)``: the fixed [1, 2, 1] / 4 kernel on both axes, reflect-101."""
    k = np.array([0.25, 0.5, 0.25])
    return ndi.correlate1d(ndi.correlate1d(np.asarray(x, np.float64), k, axis=1, mode="mirror"), k, axis=0,
                           mode="mirror")


def sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's Sobel kernel pair of size ``ksize`` (odd, >= 3): smoothing and first derivative.

    Returns:
        (smooth, deriv): (ksize,) float64; binomial smoothing and binomial(ksize - 2) * [-1, 0, 1].
    """
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    deriv = np.array([1.0])
    for _ in range(ksize - 3):
        deriv = np.convolve(deriv, [1.0, 1.0])
    return smooth, np.convolve(deriv, [1.0, 0.0, -1.0])[::-1].copy()


def sobel(x: np.ndarray, axis: int, ksize: int) -> np.ndarray:
    """``cv2.Sobel`` first derivative along ``axis`` (1 = x / columns, 0 = y / rows), float64, reflect-101."""
    smooth, deriv = sobel_kernels(ksize)
    x = np.asarray(x, np.float64)
    out = ndi.correlate1d(x, deriv, axis=axis, mode="mirror")
    return ndi.correlate1d(out, smooth, axis=1 - axis, mode="mirror")


def upsample2(x: np.ndarray) -> np.ndarray:
    """Bilinear x2 on the last two axes (OpenCV ``INTER_LINEAR``: half-pixel centres, edges clamped)."""
    x = np.asarray(x, np.float64)
    for axis in (-2, -1):
        n = x.shape[axis]
        src = (np.arange(2 * n) + 0.5) / 2.0 - 0.5
        lo = np.clip(np.floor(src).astype(np.int64), 0, n - 1)
        hi = np.clip(lo + 1, 0, n - 1)
        w = np.clip(src - np.floor(src), 0.0, 1.0)
        w = np.where(src < 0, 0.0, w)
        shape = [1] * x.ndim
        shape[axis] = 2 * n
        w = w.reshape(shape)
        x = np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w
    return x
