"""Image-space augmentation of training tiles, after CISCA.md §4.4, applied jointly to image and GT maps (no torch).

    >>> import numpy as np
    >>> from cellembed.data import make_synthetic_tile
    >>> from cellembed.data._augment import augment_tile, tile_rng
    >>> t = make_synthetic_tile(0, 0, size=64)
    >>> image, inst_map, type_map = augment_tile(t.image, t.inst_map, t.type_map, tile_rng(0, 0, 0))
    >>> image.shape, image.dtype.name, inst_map.dtype.name, type_map.dtype.name
    ((64, 64, 3), 'uint8', 'int32', 'uint8')

The steps, in CISCA's order (the whole pipeline fires with probability ``AugmentConfig.p``; each step has its
own probability; a "one of" step picks one member with probability proportional to its weight):

1. stain: each L*a*b* channel's mean and std re-drawn around the tile's own and matched (Reinhard), a
   RandStainNA stand-in: CISCA's normalisers fitted to reference images and its dataset-fitted RandStainNA
   templates are not available here.
2. rot90 by k ∈ {0, 1, 2, 3, 4} quarter turns (CISCA's draw: the identity has probability 2/5).
3. flip: both axes, rows or columns (OpenCV codes -1, 0, 1).
4. elastic: a 5×5 grid of displacements uniform in ±10 px per axis, border vectors pointed inwards, upsampled
   bilinearly; image resampled bilinearly (``elastic_image_order=0``: nearest, CISCA's choice), maps nearest.
5. one of: motion blur k ∈ {3, 5, 7}, median 3, box 3, Gaussian noise of variance 10-19, sharpen, emboss.
6. one of: CLAHE on L (clip limit 0.6-1.4, 8×8 tiles, OpenCV semantics), contrast about the mean grey
   ×(1 ± 0.15), brightness ×(1 ± 0.2).
7. one of: OpenCV-style HSV shifts (hue ±5 of 180, saturation ±30, value ±20 of 255), TF-style hue ±0.1 of the
   circle and brightness ±0.1.
8. additive Gaussian noise, σ in 0.01-0.03 of 255.

Geometric steps (2-4) move the image, ``inst_map`` and ``type_map`` together; the others touch only the image.
Randomness comes from one ``numpy.random.Generator`` per call; :func:`tile_rng` seeds it from
``(seed, epoch, tile index)`` so an epoch's draws do not depend on worker processes or batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._base import relabel

AUGMENTS = ("none", "dihedral", "full")
STAIN_MEAN_SIGMA = (4.0, 3.0, 3.0)  # L*, a*, b* units: std of the shift of each channel's mean
STAIN_STD_SIGMA = 0.1  # std of the log of each channel's std scale
BLUR_WEIGHTS = (0.15, 0.15, 0.15, 0.2, 0.2, 0.15)  # motion, median, box, noise, sharpen, emboss
CONTRAST_WEIGHTS = (0.5, 0.5, 0.2)  # clahe, contrast, brightness
COLOUR_WEIGHTS = (0.5, 0.5)  # opencv hsv, tf hue + brightness


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities of the steps of :func:`augment_tile` (CISCA.md §4.4 by default) and the elastic settings.

    Attributes:
        p: probability that the pipeline runs at all.
        stain, rot90, flip, elastic, blur, contrast, colour, noise: probability of each step.
        elastic_grid: control points per axis of the displacement grid.
        elastic_px: largest displacement per axis, in pixels.
        elastic_image_order: 1 resamples the image bilinearly, 0 nearest (CISCA); maps are always nearest.
    """

    p: float = 0.99
    stain: float = 0.7
    rot90: float = 0.9
    flip: float = 0.9
    elastic: float = 0.7
    blur: float = 0.15
    contrast: float = 0.7
    colour: float = 0.65
    noise: float = 0.15
    elastic_grid: int = 5
    elastic_px: float = 10.0
    elastic_image_order: int = 1


GEOMETRIC_ONLY = AugmentConfig(p=1.0, stain=0.0, blur=0.0, contrast=0.0, colour=0.0, noise=0.0)
"""Only rot90, flip and elastic (for tests and ablations)."""


def tile_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one tile's draws in one epoch (``index``: the tile's index in its dataset)."""
    return np.random.default_rng([int(seed), int(epoch), int(index), 0xA06])


def augment_tile(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, rng: np.random.Generator,
                 config: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CISCA's training augmentation of one tile.

    Args:
        image: (H, W, 3) uint8 RGB.
        inst_map: (H, W) int32, 0 = background.
        type_map: (H, W) uint8, 0 = background.
        rng: the tile's generator (see :func:`tile_rng`); draws happen in a fixed order.
        config: step probabilities.

    Returns:
        ``(image, inst_map, type_map)`` with the input shapes and dtypes; ``inst_map`` is relabelled 1..N when
        the elastic step ran (an instance may be squeezed out), otherwise keeps its ids.
    """
    if rng.random() >= config.p:
        return image, inst_map, type_map
    c = config
    if rng.random() < c.stain:
        image = stain_jitter(image, rng)
    maps = [image, inst_map, type_map]
    if rng.random() < c.rot90:
        k = int(rng.integers(5)) % 4
        maps = [np.rot90(a, k, axes=(0, 1)) for a in maps]
    if rng.random() < c.flip:
        maps = flip(maps, int(rng.integers(-1, 2)))
    image, inst_map, type_map = (np.ascontiguousarray(a) for a in maps)
    if rng.random() < c.elastic:
        field = elastic_field(inst_map.shape, rng, c.elastic_grid, c.elastic_px)
        image, inst_map, type_map = warp(image, inst_map, type_map, field, c.elastic_image_order)
    for prob, weights, members in ((c.blur, BLUR_WEIGHTS, BLUR_NOISE), (c.contrast, CONTRAST_WEIGHTS, CONTRAST),
                                   (c.colour, COLOUR_WEIGHTS, COLOUR)):
        if rng.random() < prob:
            image = members[_pick(rng, weights)](image, rng)
    if rng.random() < c.noise:
        image = gaussian_noise(image, rng.uniform(0.01 * 255, 0.03 * 255), rng)
    return image, inst_map, type_map


def dihedral_tile(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One of the 8 flips/quarter turns, uniformly; variant ``v`` as in ``cellembed.cache._augment.dihedral``."""
    v = int(rng.integers(8))
    out = []
    for a in (image, inst_map, type_map):
        a = a[:, ::-1] if v >= 4 else a
        out.append(np.ascontiguousarray(np.rot90(a, v % 4, axes=(0, 1))))
    return tuple(out)


def _pick(rng: np.random.Generator, weights: tuple[float, ...]) -> int:
    w = np.asarray(weights, float)
    return int(rng.choice(len(w), p=w / w.sum()))


# ---- geometry: image and maps together -------------------------------------------------------------------------


def flip(arrays: list[np.ndarray], code: int) -> list[np.ndarray]:
    """OpenCV ``cv2.flip`` codes on (H, W, ...) arrays: 0 reverses rows, 1 columns, -1 both."""
    axes = {0: (0,), 1: (1,), -1: (0, 1)}[code]
    return [np.flip(a, axes) for a in arrays]


def elastic_field(shape: tuple[int, int], rng: np.random.Generator, grid: int = 5,
                  max_px: float = 10.0) -> np.ndarray:
    """A smooth displacement field: ``grid``×``grid`` uniform draws in ±``max_px``, upsampled bilinearly.

    Border control points point inwards (the first row's row displacement is >= 0, the last row's <= 0, the
    same for columns), so the tile's edges sample from inside it.

    Returns:
        (2, H, W) float32: row and column displacement; output pixel (r, c) samples the input at
        (r + field[0, r, c], c + field[1, r, c]).
    """
    d = rng.uniform(-max_px, max_px, size=(2, grid, grid))
    d[0, 0], d[0, -1] = np.abs(d[0, 0]), -np.abs(d[0, -1])
    d[1, :, 0], d[1, :, -1] = np.abs(d[1, :, 0]), -np.abs(d[1, :, -1])
    (h, w), nodes = shape, np.arange(grid)
    wy, wx = (np.maximum(0.0, 1 - np.abs(np.linspace(0, grid - 1, n)[:, None] - nodes)) for n in (h, w))
    return np.stack([wy @ d[k] @ wx.T for k in range(2)]).astype(np.float32)


def warp(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, field: np.ndarray,
         image_order: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample image and maps at ``(r, c) + field`` (clamped to the tile): image bilinear or nearest, maps nearest.

    Returns:
        (H, W, 3) uint8, (H, W) int32 relabelled 1..N, (H, W) type map in its input dtype.
    """
    h, w = inst_map.shape
    y = np.clip(np.arange(h, dtype=np.float32)[:, None] + field[0], 0, h - 1)
    x = np.clip(np.arange(w, dtype=np.float32)[None, :] + field[1], 0, w - 1)
    yn, xn = np.rint(y).astype(np.intp), np.rint(x).astype(np.intp)
    inst = relabel(inst_map[yn, xn]).astype(np.int32)
    types = type_map[yn, xn]
    if image_order == 0:
        return image[yn, xn], inst, types
    y0, x0 = np.minimum(y.astype(np.intp), h - 2), np.minimum(x.astype(np.intp), w - 2)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    img = image.astype(np.float32)
    top = img[y0, x0] * (1 - wx) + img[y0, x0 + 1] * wx
    bottom = img[y0 + 1, x0] * (1 - wx) + img[y0 + 1, x0 + 1] * wx
    return _to_uint8(top * (1 - wy) + bottom * wy), inst, types


# ---- photometric: image only, (H, W, 3) uint8 in and out ---------------------------------------------------------


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def stain_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reinhard transfer to a random target: each L*a*b* channel's mean shifted, its std scaled."""
    lab = rgb_to_lab(image)
    mean, std = lab.mean((0, 1)), lab.std((0, 1))
    target_mean = mean + rng.normal(0.0, STAIN_MEAN_SIGMA)
    target_std = std * np.exp(rng.normal(0.0, STAIN_STD_SIGMA, 3))
    lab = (lab - mean) / np.maximum(std, 1e-6) * target_std + target_mean
    return lab_to_rgb(lab.astype(np.float32))


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return _to_uint8(ndimage.correlate(image.astype(np.float32), kernel[..., None].astype(np.float32),
                                       mode="reflect"))


def motion_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Average along a random line of k ∈ {3, 5, 7} pixels."""
    k = int(rng.choice([3, 5, 7]))
    angle = rng.uniform(0, np.pi)
    t = np.linspace(-(k - 1) / 2, (k - 1) / 2, 4 * k)
    kernel = np.zeros((k, k))
    centre = (k - 1) / 2
    kernel[np.rint(centre + t * np.sin(angle)).astype(int), np.rint(centre + t * np.cos(angle)).astype(int)] = 1
    return _filter(image, kernel / kernel.sum())


def median3(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3×3 median per channel (edges mirrored as scipy's ``mode="reflect"``), by a 19-exchange sorting network."""
    h, w = image.shape[:2]
    pad = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="symmetric")
    p = [pad[i:i + h, j:j + w] for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9:
        p[a], p[b] = np.minimum(p[a], p[b]), np.maximum(p[a], p[b])
    return np.ascontiguousarray(p[4])


_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))  # Paeth / Devillard's opt_med9


def box3(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _filter(image, np.full((3, 3), 1 / 9))


def variance_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive zero-mean Gaussian noise of variance U(10, 19) (grey levels²)."""
    return gaussian_noise(image, np.sqrt(rng.uniform(10, 19)), rng)


def sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """imgaug ``Sharpen``: identity blended by alpha U(0.05, 0.1) with a Laplacian kernel of lightness U(0.9, 1.1)."""
    alpha, light = rng.uniform(0.05, 0.1), rng.uniform(0.9, 1.1)
    effect = np.array([[-1, -1, -1], [-1, 8 + light, -1], [-1, -1, -1]])
    return _filter(image, (1 - alpha) * _IDENTITY + alpha * effect)


def emboss(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """imgaug ``Emboss``: identity blended by alpha U(0.05, 0.1) with an emboss kernel of strength U(0.05, 0.1)."""
    alpha, s = rng.uniform(0.05, 0.1), rng.uniform(0.05, 0.1)
    effect = np.array([[-1 - s, -s, 0], [-s, 1, s], [0, s, 1 + s]])
    return _filter(image, (1 - alpha) * _IDENTITY + alpha * effect)


_IDENTITY = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], float)


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive zero-mean Gaussian noise of std ``sigma`` grey levels."""
    return _to_uint8(image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32))


def clahe(channel: np.ndarray, clip_limit: float, tiles: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation with OpenCV's ``clipLimit`` meaning.

    Each tile's 256-bin histogram is clipped at ``max(1, clip_limit * tile_area / 256)``, the excess spread
    evenly over all bins, and its scaled cumulative sum is the tile's lookup table; a pixel's value is the
    bilinear blend of the tables of the four nearest tile centres. With one tile and an infinite clip limit
    this is plain histogram equalisation.

    Args:
        channel: (H, W) uint8.
        clip_limit: OpenCV's clip limit (relative to the mean bin count).
        tiles: tiles per (row, column).

    Returns:
        (H, W) uint8.
    """
    h, w = channel.shape
    edges = [np.linspace(0, n, t + 1).astype(int) for n, t in ((h, tiles[0]), (w, tiles[1]))]
    ty = np.searchsorted(edges[0][1:], np.arange(h), side="right")
    tx = np.searchsorted(edges[1][1:], np.arange(w), side="right")
    tile = ty[:, None] * tiles[1] + tx[None, :]
    n = tiles[0] * tiles[1]
    hist = np.bincount((tile * 256 + channel).ravel(), minlength=n * 256).reshape(n, 256).astype(np.float64)
    area = hist.sum(1, keepdims=True)
    clip = np.maximum(clip_limit * area / 256, 1)
    excess = np.maximum(hist - clip, 0).sum(1, keepdims=True)
    hist = np.minimum(hist, clip) + excess / 256
    lut = np.clip(np.rint(np.cumsum(hist, 1) * 255 / np.maximum(area, 1)), 0, 255).reshape(*tiles, 256)
    (y0, y1, wy), (x0, x1, wx) = (_centre_weights(e, t) for e, t in zip(edges, tiles))
    wy, wx = wy[:, None], wx[None, :]
    v = channel
    top = lut[y0[:, None], x0[None, :], v] * (1 - wx) + lut[y0[:, None], x1[None, :], v] * wx
    bottom = lut[y1[:, None], x0[None, :], v] * (1 - wx) + lut[y1[:, None], x1[None, :], v] * wx
    return _to_uint8(top * (1 - wy) + bottom * wy)


def _centre_weights(edges: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel along one axis: the tile centres on either side and the weight of the second."""
    centres = (edges[:-1] + edges[1:] - 1) / 2
    pos = np.interp(np.arange(edges[-1]), centres, np.arange(t))
    lo = np.floor(pos).astype(int)
    return lo, np.minimum(lo + 1, t - 1), pos - lo


def clahe_l(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CLAHE on the L channel of L*a*b* (8-bit L, as OpenCV), clip limit U(0.6, 1.4), 8×8 tiles."""
    lab = rgb_to_lab(image)
    l8 = _to_uint8(lab[..., 0] * (255 / 100))
    lab[..., 0] = clahe(l8, rng.uniform(0.6, 1.4)) * np.float32(100 / 255)
    return lab_to_rgb(lab)


def contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale about the mean grey by 1 + U(±0.15)."""
    alpha = 1 + rng.uniform(-0.15, 0.15)
    grey = (image @ np.array([0.299, 0.587, 0.114])).mean()
    return _to_uint8(grey + alpha * (image - grey))


def brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiply by 1 + U(±0.2)."""
    return _to_uint8(image * (1 + rng.uniform(-0.2, 0.2)))


def hsv_shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """OpenCV-style shifts: hue U(±5) of 180, saturation U(±30) and value U(±20) of 255."""
    return _shift_hsv(image, rng.uniform(-5, 5) / 180, rng.uniform(-30, 30) / 255, rng.uniform(-20, 20) / 255)


def tf_hue_brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """TF-style ``adjust_hue`` by U(±0.1) of the circle, then ``adjust_brightness`` by U(±0.1) (of 1.0)."""
    image = _shift_hsv(image, rng.uniform(-0.1, 0.1), 0.0, 0.0)
    return _to_uint8(image + 255 * rng.uniform(-0.1, 0.1))


def _shift_hsv(image: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    h, s, v = rgb_to_hsv(image)
    return hsv_to_rgb((h + np.float32(hue)) % 1, np.clip(s + np.float32(sat), 0, 1), np.clip(v + np.float32(val), 0, 1))


# ---- colour spaces in float32 (skimage's float64 versions cost 3-5× more) ------------------------------------------


def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 → hue, saturation, value, each (H, W) float32 in [0, 1] (hue as a fraction of the circle)."""
    rgb = image.astype(np.float32) / 255
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, c = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
    safe = np.where(c > 0, c, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = np.where(c > 0, h / 6 % 1, 0).astype(np.float32)
    return h, np.where(v > 0, c / np.where(v > 0, v, 1), 0).astype(np.float32), v


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`, to (H, W, 3) uint8."""
    i = np.floor(h * 6).astype(np.intp) % 6
    f = h * 6 - np.floor(h * 6)
    comps = np.stack([v, v * (1 - s * (1 - f)), v * (1 - s), v * (1 - s * f)])  # v, t, p, q
    pick = _HSV_SECTORS[i]  # (H, W, 3) indices into comps
    rgb = np.take_along_axis(comps, pick.transpose(2, 0, 1), 0).transpose(1, 2, 0)
    return _to_uint8(rgb * 255)


_HSV_SECTORS = np.array([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]])
_SRGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]], np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)  # D65
_LINEAR = np.where(np.arange(256) / 255 <= 0.04045, np.arange(256) / 255 / 12.92,
                   ((np.arange(256) / 255 + 0.055) / 1.055) ** 2.4).astype(np.float32)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB → (H, W, 3) float32 CIE L*a*b* (D65; L in 0..100), as ``skimage.color.rgb2lab``."""
    xyz = _LINEAR[image] @ (_SRGB_TO_XYZ.T / _WHITE)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116).astype(np.float32)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 L*a*b* → (H, W, 3) uint8 sRGB; out-of-gamut colours are clipped."""
    fy = (np.clip(lab[..., 0], 0, 100) + 16) / 116
    f = np.stack([lab[..., 1] / 500 + fy, fy, np.maximum(fy - lab[..., 2] / 200, 16 / 116)], -1)
    xyz = np.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787) * _WHITE
    lin = np.clip(xyz @ np.linalg.inv(_SRGB_TO_XYZ).T.astype(np.float32), 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** np.float32(1 / 2.4) - 0.055)
    return _to_uint8(srgb * 255)


BLUR_NOISE = (motion_blur, median3, box3, variance_noise, sharpen, emboss)
CONTRAST = (clahe_l, contrast, brightness)
COLOUR = (hsv_shift, tf_hue_brightness)


VIEW_SEP = "~aug"
"""Key of view v > 0 of tile ``key`` in a cache with augmented views: ``f"{key}~aug{v}"`` (view 0 keeps ``key``)."""


class AugmentedViews:
    """The tiles ``indices`` of ``source``, each followed by ``views - 1`` augmented copies (:func:`augment_tile`).

    Item ``j`` is view ``j % views`` of tile ``indices[j // views]``; view 0 is the tile itself, view v > 0 is
    drawn with ``tile_rng(seed, v, source index)`` (the same draw whatever the worker or rank). What ``extract
    --augment-views`` encodes, so that a cached training run sees CISCA's stain, blur, colour and elastic
    augmentation (the image-space steps a cache cannot apply to features) on top of its dihedral turns. Has the
    ``TileSource`` interface that extraction uses (``keys``, ``class_names``, ``__getitem__``, picklable).

        >>> from cellembed.data import open_dataset
        >>> views = AugmentedViews(open_dataset("synthetic", n_tiles=4, size=64), [0, 2], views=3)
        >>> views.keys[:4]
        ['synthetic_00000', 'synthetic_00000~aug1', 'synthetic_00000~aug2', 'synthetic_00002']
    """

    def __init__(self, source, indices: list[int], views: int, seed: int = 0, config: AugmentConfig = AugmentConfig()):
        if views < 1:
            raise ValueError(f"views must be at least 1 (the tile itself), got {views}")
        self.source, self.indices, self.views, self.seed, self.config = source, list(indices), int(views), int(seed), config
        self.class_names = source.class_names
        self.keys = [source.keys[i] if v == 0 else f"{source.keys[i]}{VIEW_SEP}{v}"
                     for i in self.indices for v in range(self.views)]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int):
        i, v = self.indices[j // self.views], j % self.views
        tile = self.source[i]
        if v == 0:
            return tile
        image, inst_map, type_map = augment_tile(tile.image, tile.inst_map, tile.type_map,
                                                 tile_rng(self.seed, v, i), self.config)  # ids stay 1..N
        return tile._replace(key=self.keys[j], image=image, inst_map=inst_map, type_map=type_map,
                             meta={**tile.meta, "view": v})
