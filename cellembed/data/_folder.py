"""The generic ``folder`` format: reader and writer.

Layout (``<root>/``):

* ``images/<name>.(png|jpg|jpeg|tif|tiff)`` — 8-bit RGB (grey is repeated to RGB).
* labels, one of:
    * ``labels/<name>.(npy|tif|tiff|png)`` — (H, W) instance ids, or (H, W, 2) instance ids + type ids;
      with a 2-D label an optional ``types/<name>.(npy|tif|tiff|png)`` holds the type map;
    * ``labels.npz`` — ``inst`` (N, H, W), optional ``cls`` (N, H, W), ``names`` (N,) giving each
      row's image name, optional ``class_names`` (C,) and ``split`` (N,) (kept as ``meta["source_split"]``).
      Loaded without pickle; memory-mapped if stored uncompressed, else inflated once per process.
* ``classes.txt`` (optional) — one class name per line, the first is ``background``. Required when the
  labels carry types and the npz has no ``class_names``. Without types, ``type_map = inst > 0`` and the
  classes are ``("background", "nucleus")``.
* ``groups.csv`` (optional) — ``img_id,group[,stratum]``: the source image each tile was cut from
  (and its stratum), used by the ``cisca`` split so tiles of one image never straddle splits. Tiles
  not listed are their own group. The ``group_regex`` option is an alternative: the first capture
  group of the regex matched against the tile name, e.g. ``r"(.+)_\\d+$"`` maps ``train_10_003`` to
  ``train_10``.
* ``folds.csv`` (optional) — ``img_id,fold`` (0/1/2 = train/val/test), the default split when present.

Tile order: npz row order, else image names in natural order.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ._base import DATASETS, Tile, TileSource, files_fingerprint, finish_tile, natural_key, require_root
from ._io import (IMAGE_EXTS, LABEL_EXTS, npz_member_array, npz_member_header, npz_members, read_csv_rows,
                  read_label, read_rgb, stems_by_ext)

_HINT = "expected <root>/images/<name>.png with <root>/labels/<name>.npy or <root>/labels.npz (see cellembed.data docs)"


@DATASETS("folder")
class FolderSource(TileSource):
    """Reader for the generic folder format (see the module docstring).

    Args:
        root: the dataset folder.
        class_names: override class names (first must be ``"background"``).
        group_regex: derive ``meta["group"]`` from tile names (first capture group) instead of groups.csv.
    """

    name = "folder"

    def __init__(self, root: Path | None, *, class_names: Sequence[str] | None = None,
                 group_regex: str | None = None):
        root = require_root(root, "folder", _HINT)
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"folder: missing {root / 'images'}; {_HINT}")
        images = stems_by_ext(root / "images", IMAGE_EXTS)
        if not images:
            raise FileNotFoundError(f"folder: no images ({', '.join(IMAGE_EXTS)}) in {root / 'images'}; {_HINT}")
        self.layout = "npz" if (root / "labels.npz").is_file() else "files"
        if self.layout == "npz":
            keys, has_types, npz_classes = self._scan_npz(root, images)
        else:
            keys, has_types, npz_classes = self._scan_files(root, images)
        self._images = {k: images[k].name for k in keys}
        names = self._class_names(root, class_names, npz_classes, has_types)
        self.has_types = has_types
        self.group_regex = group_regex
        self._groups = self._read_groups(root, keys, group_regex)
        super().__init__(root, keys, names)

    def _scan_npz(self, root: Path, images: dict[str, Path]) -> tuple[list[str], bool, list[str] | None]:
        path = root / "labels.npz"
        members = npz_members(path)
        for need in ("inst", "names"):
            if need not in members:
                raise ValueError(f"{path}: no {need!r} array; expected inst (N, H, W), cls (N, H, W), names (N,)")
        with np.load(path, allow_pickle=False) as z:
            keys = [_as_str(n) for n in z["names"]]
            extra = {m: [_as_str(v) for v in z[m]] for m in ("class_names", "split") if m in members}
        self._check_npz_shapes(path, len(keys), "cls" in members)
        missing = [k for k in keys if k not in images]
        if missing:
            raise FileNotFoundError(f"folder: no image for {missing[0]!r} of {path}: expected "
                                    f"{root / 'images' / missing[0]}.png ({len(missing)} missing)")
        _refuse_unlabelled(root, images, keys, "labels.npz")
        self._npz_split = extra.get("split")
        return keys, "cls" in members, extra.get("class_names")

    @staticmethod
    def _check_npz_shapes(path: Path, n: int, has_cls: bool) -> None:
        shape, dtype = npz_member_header(path, "inst")
        if len(shape) != 3 or shape[0] != n or dtype.kind not in "iu":
            raise ValueError(f"{path}: inst is {shape} {dtype}, expected ({n}, H, W) integer (one row per name)")
        if has_cls:
            cls_shape, cls_dtype = npz_member_header(path, "cls")
            if cls_shape != shape or cls_dtype.kind not in "iu":
                raise ValueError(f"{path}: cls is {cls_shape} {cls_dtype}, expected {shape} integer like inst")

    def _scan_files(self, root: Path, images: dict[str, Path]) -> tuple[list[str], bool, None]:
        if not (root / "labels").is_dir():
            raise FileNotFoundError(f"folder: missing {root / 'labels'} (or {root / 'labels.npz'}); {_HINT}")
        labels = stems_by_ext(root / "labels", LABEL_EXTS)
        _refuse_unlabelled(root, images, labels, "labels/")
        keys = sorted(images, key=natural_key)
        types = stems_by_ext(root / "types", LABEL_EXTS) if (root / "types").is_dir() else {}
        self._labels = {k: labels[k].name for k in keys}
        self._types = {k: types[k].name for k in keys if k in types}
        has_types = bool(types) or (bool(keys) and _label_has_types(root / "labels" / self._labels[keys[0]]))
        return keys, has_types, None

    @staticmethod
    def _class_names(root: Path, given: Sequence[str] | None, from_npz: list[str] | None,
                     has_types: bool) -> tuple[str, ...]:
        if given is not None:
            return tuple(given)
        if (root / "classes.txt").is_file():
            lines = (root / "classes.txt").read_text(encoding="utf-8").splitlines()
            return tuple(line.strip() for line in lines if line.strip())
        if from_npz is not None:
            return tuple(from_npz)
        if has_types:
            raise ValueError(f"folder: {root} has type maps but no class names; write {root / 'classes.txt'} "
                             "(one name per line, first = background) or pass class_names=...")
        return ("background", "nucleus")

    @staticmethod
    def _read_groups(root: Path, keys: list[str], group_regex: str | None) -> dict[str, tuple[str, str | None]]:
        if group_regex is not None:
            return _groups_from_regex(keys, group_regex)
        path = root / "groups.csv"
        if not path.is_file():
            return {}
        rows = read_csv_rows(path, ("img_id", "group"))
        unknown = sorted({r["img_id"] for r in rows} - set(keys))
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} img_id(s) not in the dataset, e.g. {unknown[:5]}")
        return {r["img_id"]: (r["group"], r.get("stratum") or None) for r in rows}

    def _load(self, i: int) -> Tile:
        key = self.keys[i]
        image = read_rgb(self.root / "images" / self._images[key])
        if self.layout == "npz":
            path = self.root / "labels.npz"
            inst = np.asarray(self._cached("inst", lambda: npz_member_array(path, "inst"))[i])
            types = (np.asarray(self._cached("cls", lambda: npz_member_array(path, "cls"))[i])
                     if self.has_types else None)
            where = f"{path}[{key}]"
        else:
            inst, types, where = self._read_label_files(key)
        return finish_tile(key, image, inst, types, self._meta(i), len(self.class_names), where)

    def _read_label_files(self, key: str) -> tuple[np.ndarray, np.ndarray | None, str]:
        path = self.root / "labels" / self._labels[key]
        label = read_label(path)
        type_file = self._types.get(key)
        if label.ndim == 3:
            if type_file is not None:
                raise ValueError(f"{path}: (H, W, 2) label has its own types but types/{type_file} also exists")
            return label[:, :, 0], label[:, :, 1], str(path)
        if type_file is not None:
            types = read_label(self.root / "types" / type_file)
            return label, types, f"{self.root / 'types' / type_file}"
        if self.has_types:
            raise ValueError(f"{path}: (H, W) label without a types/ file, but other tiles of the dataset have types")
        return label, None, str(path)

    def _meta(self, i: int) -> dict:
        key = self.keys[i]
        group, stratum = self._groups.get(key, (key, None))
        meta = {"group": group}
        if stratum is not None:
            meta["stratum"] = stratum
        if self.layout == "npz" and self._npz_split is not None:
            meta["source_split"] = self._npz_split[i]
        return meta

    def _options(self) -> dict:
        files = [self.root / "images" / n for n in self._images.values()]
        if self.layout == "npz":
            files.append(self.root / "labels.npz")
        else:
            files += [self.root / "labels" / n for n in self._labels.values()]
            files += [self.root / "types" / n for n in self._types.values()]
        return {"layout": self.layout, "class_names": list(self.class_names),
                "files_sha256": files_fingerprint(self.root, files)}

    def default_split(self) -> tuple[str, Path | None]:
        folds = self.root / "folds.csv"
        return ("folds-csv", folds) if folds.is_file() else ("cisca", None)


def _refuse_unlabelled(root: Path, images: dict[str, Path], labelled: Iterable[str], where: str) -> None:
    missing = sorted(set(images) - set(labelled), key=natural_key)
    if missing:
        expected = root / "labels" / f"{missing[0]}.npy" if where == "labels/" else root / "labels.npz"
        raise FileNotFoundError(f"folder: no labels for image {images[missing[0]]}: expected {expected} "
                                f"({len(missing)} image(s) without labels)")


def _as_str(value) -> str:
    """npz string entries may be unicode (``<U``) or bytes (``S``)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _label_has_types(path: Path) -> bool:
    """Whether a label file is (H, W, 2), reading only the header for .npy."""
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 3
    return read_label(path).ndim == 3


def _groups_from_regex(keys: list[str], pattern: str) -> dict[str, tuple[str, None]]:
    regex = re.compile(pattern)
    groups = {}
    for key in keys:
        match = regex.match(key)
        if match is None:
            raise ValueError(f"folder: group_regex {pattern!r} does not match tile name {key!r}")
        groups[key] = (match.group(1) if regex.groups else match.group(0), None)
    return groups


def write_folder_dataset(out: str | Path, tiles: Iterable[Tile], class_names: Sequence[str], *,
                         overwrite: bool = False, progress: Callable[[int], None] | None = None) -> Path:
    """Write tiles in the folder format: ``images/<key>.png``, ``labels/<key>.npy`` ((H, W, 2) int32
    instance + type), ``classes.txt`` and ``groups.csv`` (``img_id,group,stratum``).

    Everything is written into a hidden temporary sibling folder that is renamed to ``out``
    only when complete, so a half-written dataset never looks like a full one.

    Args:
        out: destination folder.
        tiles: the tiles; keys must be unique and usable as file names.
        class_names: names of the type ids, first ``"background"``.
        overwrite: replace an existing non-empty ``out``.
        progress: called with the number of tiles written so far, after each tile.

    Returns:
        ``out`` as a Path.

    Raises:
        FileExistsError: ``out`` exists, is not empty and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _write_tiles(tmp, tiles, class_names, progress)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tiles(folder: Path, tiles: Iterable[Tile], class_names: Sequence[str],
                 progress: Callable[[int], None] | None) -> None:
    from PIL import Image

    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    rows, seen = [], set()
    for n, tile in enumerate(tiles, start=1):
        if tile.key in seen or not tile.key or "/" in tile.key or tile.key.startswith("."):
            raise ValueError(f"tile key {tile.key!r} is duplicated or not a valid file name")
        seen.add(tile.key)
        Image.fromarray(tile.image).save(folder / "images" / f"{tile.key}.png", compress_level=1)
        label = np.stack([tile.inst_map.astype(np.int32), tile.type_map.astype(np.int32)], axis=-1)
        np.save(folder / "labels" / f"{tile.key}.npy", label)
        rows.append((tile.key, str(tile.meta.get("group", tile.key)), str(tile.meta.get("stratum", ""))))
        if progress is not None:
            progress(n)
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in class_names), encoding="utf-8")
    with open(folder / "groups.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("img_id", "group", "stratum"))
        writer.writerows(rows)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, moving any old ``out`` aside first."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
