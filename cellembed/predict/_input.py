"""Inputs of ``cellembed predict``: plain images and whole-slide images, read at the run's pixel size.

Plain images (PNG, JPEG, single-page TIFF) are read whole with Pillow / tifffile. Whole-slide images (``.svs``,
``.ndpi``, ``.scn``, ``.bif``, pyramidal TIFF, ...) go through **tiffslide** (pure Python on tifffile + zarr,
installs from the package index on every platform, no system library; OpenSlide's formats that are not TIFF-based,
such as ``.mrxs``, are not read). Reads are by region, from the pyramid level closest to the run's pixel size,
then resampled, so memory does not grow with the slide.

Pixel size: a slide's ``mpp`` comes from its metadata (tiffslide ``tiffslide.mpp-x``, or a TIFF's resolution tags
in centimetres / inches); a PNG or JPEG carries none, so ``--mpp`` must say it (or ``--mpp run``: the image is
already at the run's pixel size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".vms", ".svslide")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MAGNIFICATION_MPP = {"40x": 0.25, "20x": 0.5}
"""Pixel size (µm) a run trained at a magnification expects, unless ``--target-mpp`` says otherwise."""
SAME_MPP = 0.05
"""Relative difference under which the input's pixel size counts as the run's (no resampling)."""


class InputError(ValueError):
    """An input that cannot be predicted as given (the message names the file and the fix)."""


class Input:
    """A readable image at level 0: ``height``, ``width``, ``mpp`` (µm per pixel or None) and ``read``.

    ``read(y0, y1, x0, x1, scale)`` returns the (h, w, 3) uint8 RGB pixels of the window ``[y0, y1) × [x0, x1)`` of the
    image resampled by ``1 / scale`` (``scale`` level-0 pixels per output pixel), the window given in output pixels.
    """

    def __init__(self, path: Path, height: int, width: int, mpp: float | None, slide: bool):
        self.path, self.height, self.width, self.mpp, self.slide = path, height, width, mpp, slide
        self.name = path.name.split(".")[0] if path.name.count(".") > 1 else path.stem

    def read(self, y0: int, y1: int, x0: int, x1: int, scale: float) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """(RGB uint8 thumbnail, level-0 pixels per thumbnail pixel), the longer side at most ``max_side``."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if a.shape[:2] == (h, w):
        return a
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.LANCZOS if a.shape[0] > h else
                                                Image.Resampling.BICUBIC))


class ImageInput(Input):
    """A plain image held in memory."""

    def __init__(self, path: Path, array: np.ndarray, mpp: float | None):
        super().__init__(path, array.shape[0], array.shape[1], mpp, slide=False)
        self.array = array

    def read(self, y0, y1, x0, x1, scale):
        if abs(scale - 1.0) <= 1e-9:
            return self.array[y0:y1, x0:x1]
        a = self.array[int(y0 * scale):max(int(round(y1 * scale)), int(y0 * scale) + 1),
                       int(x0 * scale):max(int(round(x1 * scale)), int(x0 * scale) + 1)]
        return _resize(np.ascontiguousarray(a), y1 - y0, x1 - x0)

    def thumbnail(self, max_side):
        f = max(1.0, max(self.height, self.width) / max_side)
        h, w = max(1, round(self.height / f)), max(1, round(self.width / f))
        return _resize(self.array, h, w), self.height / h


class SlideInput(Input):
    """A whole-slide image read by region through tiffslide."""

    def __init__(self, path: Path, slide, mpp: float | None):
        w, h = slide.dimensions
        super().__init__(path, h, w, mpp, slide=True)
        self.handle = slide

    def read(self, y0, y1, x0, x1, scale):
        s = self.handle
        level = s.get_best_level_for_downsample(scale * (1 + 1e-6)) if scale > 1 else 0
        down = s.level_downsamples[level]
        lx0, ly0 = int(x0 * scale), int(y0 * scale)
        lx1 = min(self.width, max(int(round(x1 * scale)), lx0 + 1))
        ly1 = min(self.height, max(int(round(y1 * scale)), ly0 + 1))
        size = (max(1, round((lx1 - lx0) / down)), max(1, round((ly1 - ly0) / down)))
        a = np.asarray(s.read_region((lx0, ly0), level, size, as_array=True))[..., :3]
        return _resize(np.ascontiguousarray(a), y1 - y0, x1 - x0)

    def thumbnail(self, max_side):
        img = np.asarray(self.handle.get_thumbnail((max_side, max_side)).convert("RGB"))
        return img, self.height / img.shape[0]

    def close(self):
        self.handle.close()


def _tiff_mpp(path: Path) -> float | None:
    """µm per pixel from a TIFF's first page resolution tags (centimetre or inch units), else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if res is None or unit is None:
                return None
            num, den = res.value
            per_unit = num / den if den else 0
            um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            return um / per_unit if um and per_unit > 0 else None
    except Exception:  # noqa: BLE001 - an unreadable tag only means "unknown"
        return None


def _is_pyramid(path: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return bool(page.is_tiled and (len(tif.series[0].levels) > 1 or max(page.shape[:2]) > 8192))


def open_input(path: str | Path, mpp: float | None = None) -> Input:
    """Open an image or slide; ``mpp`` (µm / px) overrides what the file says.

    Raises:
        InputError: missing or unreadable file, unknown format (each names the file and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give an image (PNG, JPEG, TIFF) or a whole-slide image")
    suffix = path.suffix.lower()
    if suffix not in SLIDE_SUFFIXES + IMAGE_SUFFIXES:
        raise InputError(f"{path}: unknown format {suffix!r}; give PNG, JPEG, TIFF or a slide "
                         f"({', '.join(SLIDE_SUFFIXES)})")
    try:
        if suffix in SLIDE_SUFFIXES or (suffix in (".tif", ".tiff") and _is_pyramid(path)):
            import tiffslide

            slide = tiffslide.open_slide(str(path))
            meta = slide.properties.get("tiffslide.mpp-x")
            return SlideInput(path, slide, mpp if mpp is not None else (float(meta) if meta else None))
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
            found = _tiff_mpp(path)
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None  # the user's own large field of view, not a decompression bomb
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
            found = None
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow / tifffile / tiffslide raise many types on a bad file
        raise InputError(f"{path}: unreadable ({type(err).__name__}: {err}); is it a complete image file?") from None
    array = _as_rgb(array, path)
    return ImageInput(path, array, mpp if mpp is not None else found)


def _as_rgb(a: np.ndarray, path: Path) -> np.ndarray:
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InputError(f"{path}: expected an RGB image, got an array of shape {a.shape}; convert it to RGB")
    if a.dtype != np.uint8:
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        else:
            raise InputError(f"{path}: expected 8-bit RGB, got {a.dtype}; convert it to 8-bit RGB")
    return np.ascontiguousarray(a[..., :3])


def resolve_scale(inp: Input, target_mpp: float, mpp_option: str | float | None) -> float:
    """Level-0 pixels per run pixel (1.0: no resampling).

    Raises:
        InputError: the input's pixel size is unknown and ``--mpp`` was not given.
    """
    if mpp_option == "run":
        return 1.0
    mpp = inp.mpp
    if mpp is None:
        raise InputError(f"{inp.path}: pixel size unknown (no resolution metadata); pass --mpp MICRONS_PER_PIXEL "
                         f"(e.g. --mpp 0.25 for 40x), or --mpp run if it is already at the run's {target_mpp} µm/px")
    scale = target_mpp / mpp
    return 1.0 if abs(scale - 1.0) <= SAME_MPP else scale
