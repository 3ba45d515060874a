"""File decoding shared by the readers: images, label maps, npy/npz members, csv tables."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LABEL_EXTS = (".npy", ".tif", ".tiff", ".png")
_PIL_8BIT_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "RGBX"}


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
        path: .png, .jpg/.jpeg (Pillow) or .tif/.tiff (tifffile), 8-bit grey, RGB or RGBA.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ValueError: not 8-bit, or not grey/RGB/RGBA (names the file).
    """
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return _to_rgb(np.asarray(tifffile.imread(path)), path)
        from PIL import Image

        with Image.open(path) as img:
            if img.mode not in _PIL_8BIT_MODES:
                raise ValueError(f"{path}: image mode {img.mode!r} is not 8-bit; cellembed reads 8-bit RGB images")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: unreadable image ({err})") from None
    except (OSError, SyntaxError, EOFError) as err:  # PIL / tifffile on a damaged or foreign file
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err}); replace or remove it") from None


def _to_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: image dtype {arr.dtype}, expected uint8 (8-bit RGB)")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[:, :, :3])
    raise ValueError(f"{path}: image shape {arr.shape}, expected (H, W), (H, W, 3) or (H, W, 4)")


def read_label(path: Path) -> np.ndarray:
    """Decode a label file without interpreting it.

    Args:
        path: .npy (no pickle), .tif/.tiff (tifffile) or .png (Pillow, 8/16-bit grey).

    Returns:
        The array as stored, with a trailing singleton channel squeezed: (H, W) or (H, W, 2).

    Raises:
        ValueError: pickled content, unsupported shape (names the file).
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = load_npy(path)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        arr = np.asarray(tifffile.imread(path))
    else:
        from PIL import Image

        with Image.open(path) as img:
            arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 2):
        raise ValueError(f"{path}: label shape {arr.shape}, expected (H, W) instance ids or (H, W, 2) instance+type")
    return arr


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """``np.load`` without pickle; a pickled or malformed file raises ValueError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: cannot load without pickle ({err}); save a plain numeric array") from None


def npz_member_header(path: Path, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of ``member`` (without ``.npy``) of an npz archive, without reading its data."""
    with zipfile.ZipFile(path) as zf:
        name = _member_name(zf, path, member)
        with zf.open(name) as fh:
            shape, _, dtype = _read_npy_header(fh, path)
    return shape, dtype


def npz_members(path: Path) -> set[str]:
    """Member names of an npz archive, without the ``.npy`` suffix."""
    with zipfile.ZipFile(path) as zf:
        return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}


def npz_member_array(path: Path, member: str) -> np.ndarray:
    """Read-only array for an npz member: memory-mapped when stored uncompressed, else loaded once.

    A compressed member (``np.savez_compressed``) cannot be sliced without inflating it, so
    it is loaded whole; callers cache the result per process.
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(_member_name(zf, path, member))
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path, allow_pickle=False) as z:
                return z[member]
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        fh.seek(start)
        shape, fortran, dtype = _read_npy_header(fh, path)
        offset = fh.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _member_name(zf: zipfile.ZipFile, path: Path, member: str) -> str:
    name = member + ".npy"
    if name not in zf.namelist():
        raise ValueError(f"{path}: no array {member!r} in the archive (has {sorted(zf.namelist())})")
    return name


def _read_npy_header(fh, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fh)
    reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran, dtype = reader(fh)
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects (needs pickle); save plain numeric/string arrays")
    return tuple(int(s) for s in shape), bool(fortran), dtype


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a headed csv as dicts; raises ValueError naming the file if a column is missing."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}, expected {list(required)}")
        reader.fieldnames = header
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def stems_by_ext(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """Map file stem → path for files in ``folder`` with one of ``exts``; ValueError on clashing stems."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in exts and not entry.name.startswith("."):
            if entry.stem in found:
                raise ValueError(f"{folder}: two files share the name {entry.stem!r}: {found[entry.stem].name}, {entry.name}")
            found[entry.stem] = entry
    return found
