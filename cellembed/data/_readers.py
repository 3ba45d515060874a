"""Readers for the official on-disk releases: PanNuke, CoNIC, CytoDArk0 (METRICS.md §2)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ._base import (DATASETS, Tile, TileSource, files_fingerprint, finish_tile, natural_key, require_file,
                    require_root)
from ._io import load_npy, read_csv_rows, read_label, read_rgb, stems_by_ext

PANNUKE_CLASSES = ("background", "neoplastic", "inflammatory", "connective", "dead", "epithelial")
CONIC_CLASSES = ("background", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")
CELL_CLASSES = ("background", "cell")

_PANNUKE_HINT = "expected the official layout '<root>/Fold 1/images/fold1/images.npy' (unzip Warwick's fold_1.zip … fold_3.zip into root)"
_CONIC_HINT = "expected the CoNIC release: <root>/images.npy, <root>/labels.npy, <root>/patch_info.csv"


def _pannuke_paths(root: Path, k: int) -> dict[str, Path]:
    fold = root / f"Fold {k}"
    return {
        "images": fold / "images" / f"fold{k}" / "images.npy",
        "types": fold / "images" / f"fold{k}" / "types.npy",
        "masks": fold / "masks" / f"fold{k}" / "masks.npy",
    }


def _check_array(arr: np.ndarray, path: Path, ndim_shape: tuple, kinds: str, what: str) -> None:
    """Raise ValueError naming ``path`` unless arr matches ``ndim_shape`` (None = any) and dtype kind."""
    ok = arr.ndim == len(ndim_shape) and all(s is None or s == a for s, a in zip(ndim_shape, arr.shape))
    if not ok or arr.dtype.kind not in kinds:
        want = "(" + ", ".join("N" if s is None else str(s) for s in ndim_shape) + ")"
        raise ValueError(f"{path}: {what} has shape {arr.shape} dtype {arr.dtype}, expected {want} of kind {kinds!r}")


@DATASETS("pannuke")
class PanNukeSource(TileSource):
    """PanNuke official release: ``<root>/Fold k/{images,masks}/foldk/*.npy``.

    The five instance channels of ``masks.npy`` (Neoplastic, Inflammatory, Connective, Dead,
    Epithelial; channel 5 = background) are merged with (channel, id) as the instance key,
    since ids repeat across channels; where channels overlap the later channel wins (as
    CellViT's ``prepare_pannuke.py``). Type = channel + 1. Images are float64 0–255,
    clipped and cast (truncated) to uint8 like the official scripts. Keys follow CISCA:
    ``pannuke_<tissue lower>_fold<k>_<i>``. Instances split into several connected
    components in the release are kept as one instance.

    Args:
        root: folder holding ``Fold 1``, ``Fold 2``, ``Fold 3`` (any present subset is read).
        folds: read only these folds (each must be present); default all present.
    """

    name = "pannuke"

    def __init__(self, root: Path | None, *, folds: Sequence[int] | None = None):
        root = require_root(root, "pannuke", _PANNUKE_HINT)
        present = [k for k in (1, 2, 3) if (root / f"Fold {k}").is_dir()]
        wanted = list(folds) if folds is not None else present
        if not wanted:
            raise FileNotFoundError(f"pannuke: no 'Fold 1'..'Fold 3' folder under {root}; {_PANNUKE_HINT}")
        keys, self._tissues, self._fold_of, self._local = [], [], [], []
        for k in wanted:
            tissues = self._open_fold(root, int(k))
            self._tissues += tissues
            self._fold_of += [int(k)] * len(tissues)
            self._local += list(range(len(tissues)))
            keys += [f"pannuke_{t.lower()}_fold{k}_{i}" for i, t in enumerate(tissues)]
        self.folds = [int(k) for k in wanted]
        super().__init__(root, keys, PANNUKE_CLASSES)

    @staticmethod
    def _open_fold(root: Path, k: int) -> list[str]:
        """Validate fold k's three files (headers only); return its tissue names."""
        if k not in (1, 2, 3):
            raise ValueError(f"pannuke: fold {k} does not exist (PanNuke has folds 1, 2, 3)")
        paths = {n: require_file(p, "pannuke", _PANNUKE_HINT) for n, p in _pannuke_paths(root, k).items()}
        types = load_npy(paths["types"])
        _check_array(types, paths["types"], (None,), "U", "tissue names")
        images = load_npy(paths["images"], mmap=True)
        _check_array(images, paths["images"], (len(types), None, None, 3), "fu", "images")
        masks = load_npy(paths["masks"], mmap=True)
        _check_array(masks, paths["masks"], (len(types), images.shape[1], images.shape[2], 6), "fiu", "masks")
        return [str(t) for t in types]

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        paths = _pannuke_paths(self.root, k)
        return self._cached(f"fold{k}", lambda: (load_npy(paths["images"], True), load_npy(paths["masks"], True)))

    def _load(self, i: int) -> Tile:
        k, j = self._fold_of[i], self._local[i]
        images, masks = self._arrays(k)
        raw = np.asarray(images[j])
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise ValueError(f"{_pannuke_paths(self.root, k)['images']}[{j}]: NaN or Inf in the image; fix or "
                             "drop that tile (a folds.csv can leave it out)")
        image = np.clip(raw, 0, 255).astype(np.uint8)
        inst, types = combine_pannuke_channels(np.asarray(masks[j]))
        where = f"{_pannuke_paths(self.root, k)['masks']}[{j}]"
        return finish_tile(self.keys[i], image, inst, types, self._meta(i), len(self.class_names), where)

    def _meta(self, i: int) -> dict:
        tissue = self._tissues[i]
        return {"tissue": tissue, "fold": self._fold_of[i], "index_in_fold": self._local[i],
                "group": self.keys[i], "stratum": tissue.lower()}

    def _options(self) -> dict:
        sizes = [p.stat().st_size for k in self.folds for p in _pannuke_paths(self.root, k).values()]
        return {"folds": self.folds, "file_sizes": sizes}

    def default_split(self) -> tuple[str, Path | None]:
        return "pannuke-official", None


def combine_pannuke_channels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge PanNuke's per-class instance channels into one instance map and one type map.

    Args:
        mask: (H, W, 6) PanNuke mask (float64 ids); channels 0–4 classes, 5 background.

    Returns:
        inst: (H, W) int64 keys, unique per (channel, id), sorted channel-major; 0 = background.
        types: (H, W) uint8, channel + 1 of the winning (last) channel, 0 = background.
    """
    inst = np.zeros(mask.shape[:2], np.int64)
    types = np.zeros(mask.shape[:2], np.uint8)
    for c in range(5):
        ids = mask[:, :, c].astype(np.int64)
        on = ids > 0
        inst[on] = (np.int64(c) << 32) | ids[on]
        types[on] = c + 1
    return inst, types


@DATASETS("conic")
class CoNICSource(TileSource):
    """CoNIC challenge release: ``images.npy`` (N,256,256,3) uint8, ``labels.npy`` (N,256,256,2)
    uint16 (instance ids, class 0–6) and ``patch_info.csv`` (``<cohort>_<image>-<patch>``).

    ``counts.csv`` is not needed. meta: ``group`` = source image (before ``-``),
    ``stratum`` = cohort (before ``_``), as CISCA's split script.

    Args:
        root: folder holding the three files.
    """

    name = "conic"

    def __init__(self, root: Path | None):
        root = require_root(root, "conic", _CONIC_HINT)
        paths = self._paths(root)
        for p in paths.values():
            require_file(p, "conic", _CONIC_HINT)
        images = load_npy(paths["images"], mmap=True)
        _check_array(images, paths["images"], (None, None, None, 3), "u", "images")
        if images.dtype != np.uint8:
            raise ValueError(f"{paths['images']}: images dtype {images.dtype}, expected uint8")
        labels = load_npy(paths["labels"], mmap=True)
        _check_array(labels, paths["labels"], (len(images), images.shape[1], images.shape[2], 2), "iu", "labels")
        names = self._patch_names(paths["patch_info"])
        if len(names) != len(images):
            raise ValueError(f"{paths['patch_info']}: {len(names)} patch names for {len(images)} images in images.npy")
        super().__init__(root, names, CONIC_CLASSES)

    @staticmethod
    def _paths(root: Path) -> dict[str, Path]:
        return {"images": root / "images.npy", "labels": root / "labels.npy", "patch_info": root / "patch_info.csv"}

    @staticmethod
    def _patch_names(path: Path) -> list[str]:
        rows = read_csv_rows(path, ("patch_info",))
        return [r["patch_info"] for r in rows]

    def _load(self, i: int) -> Tile:
        paths = self._paths(self.root)
        images, labels = self._cached(
            "arrays", lambda: (load_npy(paths["images"], True), load_npy(paths["labels"], True)))
        label = np.asarray(labels[i])
        where = f"{paths['labels']}[{i}]"
        return finish_tile(self.keys[i], np.asarray(images[i]), label[:, :, 0], label[:, :, 1],
                           self._meta(i), len(self.class_names), where)

    def _meta(self, i: int) -> dict:
        group = self.keys[i].split("-")[0]
        return {"group": group, "stratum": group.split("_")[0]}

    def _options(self) -> dict:
        return {"file_sizes": [p.stat().st_size for p in self._paths(self.root).values()]}


@DATASETS("cytodark0")
class CytoDArk0Source(TileSource):
    """CytoDArk0 (Zenodo 10.5281/zenodo.13694738): ``<root>/<mag>/<S>x<S>/image/<id>.png`` with
    ``label/<id>.tiff`` instance maps and an optional ``folds.csv`` (0/1/2 = train/val/test).

    One class (neurons and glia together): ``type_map`` is 1 on cells. Keys are the file
    stems in natural order (``ID1_2`` before ``ID1_10``); meta ``group`` is the ROI id
    (the part before ``_``).

    Args:
        root: the unzipped ``cytoDArk0`` folder (holding ``20x``, ``40x``).
        magnification: "20x" or "40x".
        size: tile side S of the size folder (20x: 256, 512, 1024; 40x: also 2048).
    """

    name = "cytodark0"

    def __init__(self, root: Path | None, *, magnification: str = "20x", size: int = 256):
        hint = "expected <root>/{20x,40x}/<S>x<S>/{image/*.png,label/*.tiff} from Zenodo's cytoDArk0.zip"
        root = require_root(root, "cytodark0", hint)
        if magnification not in ("20x", "40x"):
            raise ValueError(f"cytodark0: magnification must be '20x' or '40x', got {magnification!r}")
        self.magnification, self.size = magnification, int(size)
        folder = self.folder_of(root)
        for sub in ("image", "label"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"cytodark0: missing folder {folder / sub}; {hint}")
        images = stems_by_ext(folder / "image", (".png",))
        labels = stems_by_ext(folder / "label", (".tiff", ".tif"))
        missing = [s for s in images if s not in labels]
        if missing:
            raise FileNotFoundError(
                f"cytodark0: no label for image {folder / 'image' / images[missing[0]].name}: expected "
                f"{folder / 'label' / (missing[0] + '.tiff')} ({len(missing)} image(s) without labels)")
        keys = sorted(images, key=natural_key)
        self._files = [(images[k].name, labels[k].name) for k in keys]
        super().__init__(root, keys, CELL_CLASSES)

    def folder_of(self, root: Path) -> Path:
        return root / self.magnification / f"{self.size}x{self.size}"

    def _load(self, i: int) -> Tile:
        folder = self.folder_of(self.root)
        image_name, label_name = self._files[i]
        label_path = folder / "label" / label_name
        label = read_label(label_path)
        if label.ndim != 2:
            raise ValueError(f"{label_path}: label shape {label.shape}, expected (H, W) instance ids")
        image = read_rgb(folder / "image" / image_name)
        return finish_tile(self.keys[i], image, label, None, self._meta(i), 2, str(label_path))

    def _meta(self, i: int) -> dict:
        roi = self.keys[i].split("_")[0]
        return {"group": roi, "roi": roi, "magnification": self.magnification}

    def _options(self) -> dict:
        folder = self.folder_of(self.root)
        paths = [folder / d / n for pair in self._files for d, n in zip(("image", "label"), pair)]
        return {"magnification": self.magnification, "size": self.size,
                "files_sha256": files_fingerprint(self.root, paths)}

    def default_split(self) -> tuple[str, Path | None]:
        folds = self.folder_of(self.root) / "folds.csv"
        return ("folds-csv", folds) if folds.is_file() else ("cisca", None)
