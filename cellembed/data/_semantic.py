"""The ``semantic_folder`` format: tissue semantic segmentation (one class id per pixel).

Layout (``<root>/``):

* ``images/<name>.(png|jpg|jpeg|tif|tiff)`` — 8-bit RGB (grey is repeated to RGB).
* ``masks/<name>.(png|tif|tiff|npy)`` — (H, W) integer class ids, the same size as the image:
  ``0..C-1`` index ``classes.txt``; :data:`IGNORE` (255) marks unlabelled pixels, left out of the loss and of
  every metric. Any other value is an error.
* ``classes.txt`` (required) — one class name per line, in id order (line 1 is class 0). Class 0 is a class
  like any other (it need not be a background); at most 255 classes.
* ``groups.csv`` / ``group_regex`` and ``folds.csv`` (optional) — as in the ``folder`` format.

Tiles: ``inst_map`` is empty (all 0: there are no instances) and ``type_map`` holds the class of every pixel,
so the ``semantic`` head's targets (the type map) are the mask; the nucleus contract "type 0 off nuclei" does
not hold here. Tile order: image names in natural order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ._base import DATASETS, Tile, TileSource, _check_integral, files_fingerprint, natural_key, require_root
from ._folder import FolderSource
from ._io import IMAGE_EXTS, LABEL_EXTS, read_label, read_rgb, stems_by_ext

IGNORE = 255
"""Mask value of unlabelled pixels: no loss, not counted by Dice / IoU."""

_HINT = ("expected <root>/images/<name>.png, <root>/masks/<name>.png ((H, W) class ids) and <root>/classes.txt "
         "(one class name per line, in id order)")


@DATASETS("semantic_folder")
class SemanticFolderSource(TileSource):
    """Reader for tissue semantic segmentation folders (see the module docstring).

    Args:
        root: the dataset folder.
        class_names: override ``classes.txt`` (names in id order).
        group_regex: derive ``meta["group"]`` from tile names (first capture group) instead of groups.csv.
    """

    name = "semantic_folder"
    first_is_background = False

    def __init__(self, root: Path | None, *, class_names: Sequence[str] | None = None,
                 group_regex: str | None = None):
        root = require_root(root, "semantic_folder", _HINT)
        for sub in ("images", "masks"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"semantic_folder: missing {root / sub}; {_HINT}")
        images = stems_by_ext(root / "images", IMAGE_EXTS)
        if not images:
            raise FileNotFoundError(f"semantic_folder: no images ({', '.join(IMAGE_EXTS)}) in {root / 'images'}; "
                                    f"{_HINT}")
        masks = stems_by_ext(root / "masks", LABEL_EXTS)
        missing = sorted(set(images) - set(masks), key=natural_key)
        if missing:
            raise FileNotFoundError(f"semantic_folder: no mask for image {images[missing[0]]}: expected "
                                    f"{root / 'masks' / missing[0]}.png ({len(missing)} image(s) without a mask)")
        keys = sorted(images, key=natural_key)
        self._images = {k: images[k].name for k in keys}
        self._masks = {k: masks[k].name for k in keys}
        names = tuple(class_names) if class_names is not None else _read_classes(root)
        if not 1 <= len(names) < IGNORE:
            raise ValueError(f"semantic_folder: {len(names)} classes; expected 1..{IGNORE - 1} "
                             f"({IGNORE} is the ignore value)")
        self.group_regex = group_regex
        self._groups = FolderSource._read_groups(root, keys, group_regex)
        super().__init__(root, keys, names)

    def _load(self, i: int) -> Tile:
        key = self.keys[i]
        image = read_rgb(self.root / "images" / self._images[key])
        path = self.root / "masks" / self._masks[key]
        mask = read_label(path)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{path}: mask is {mask.shape}, expected {image.shape[:2]} like its image "
                             f"{self._images[key]}; save the mask as (H, W) class ids at the image's size")
        _check_integral(mask, str(path), "mask")
        n = len(self.class_names)
        bad = np.unique(mask[(mask < 0) | ((mask >= n) & (mask != IGNORE))])
        if bad.size:
            raise ValueError(f"{path}: class id(s) {bad[:5].tolist()} out of range; classes.txt names {n} classes "
                             f"(ids 0..{n - 1}) and {IGNORE} means ignore: fix the mask or add the class names")
        return Tile(key, image, np.zeros(mask.shape, np.int32), mask.astype(np.uint8), self._meta(i))

    def _meta(self, i: int) -> dict:
        group, stratum = self._groups.get(self.keys[i], (self.keys[i], None))
        return {"group": group} if stratum is None else {"group": group, "stratum": stratum}

    def _options(self) -> dict:
        files = [self.root / "images" / n for n in self._images.values()]
        files += [self.root / "masks" / n for n in self._masks.values()]
        return {"class_names": list(self.class_names), "ignore": IGNORE,
                "files_sha256": files_fingerprint(self.root, files)}

    default_split = FolderSource.default_split


def _read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(f"semantic_folder: missing {path}; write one class name per line, in id order "
                                "(line 1 = class 0), or pass class_names=...")
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise ValueError(f"{path}: no class names; write one class name per line, in id order")
    return names
