"""The tile contract, the reader base class and the dataset registry."""

from __future__ import annotations

import hashlib
import inspect
import json
import operator
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from cellembed._registry import Registry


class Tile(NamedTuple):
    """One labelled tile, the unit every reader yields.

    Attributes:
        key: unique tile name within its dataset (also the cache sample key).
        image: (H, W, 3) uint8 RGB, axes (row, col, channel).
        inst_map: (H, W) int32, 0 = background, instance ids 1..N contiguous.
        type_map: (H, W) uint8, 0 = background, 1..C types; all ones on nuclei for
            datasets without types. Always 0 where ``inst_map`` is 0.
        meta: JSON-able dict, e.g. ``{"tissue": "Breast", "fold": 1, "group": ..., "stratum": ...}``.
    """

    key: str
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray
    meta: dict


DATASETS: Registry[Callable[..., "TileSource"]] = Registry("dataset")
"""Dataset name → reader class; every class takes ``(root, **options)``."""


class TileSource:
    """Random-access, picklable collection of tiles (base class of every reader).

    Subclasses set ``name``, call ``super().__init__`` with the tile keys and class
    names, and implement ``_load(i) -> Tile`` and ``_meta(i) -> dict``. Open file
    handles and memory maps live in ``self._lazy`` (per process, dropped on pickling),
    so pickling a source costs its key list, never its pixels.

    Attributes:
        name: dataset name as registered in ``DATASETS``.
        keys: unique tile keys in dataset order.
        class_names: type names; index 0 is ``"background"`` (semantic datasets: any class name).
        root: dataset folder, or None for generated data.
    """

    name = "base"
    first_is_background = True  # nucleus datasets: class 0 is "background"; semantic datasets: any class

    def __init__(self, root: Path | None, keys: Sequence[str], class_names: Sequence[str]):
        self.root = root
        self.keys = [str(k) for k in keys]
        self.class_names = tuple(str(c) for c in class_names)
        self._lazy: dict[str, Any] = {}
        _check_unique(self.keys, self.name)
        if not self.class_names or (self.first_is_background and self.class_names[0] != "background"):
            raise ValueError(f"{self.name}: class_names must start with 'background', got {self.class_names}")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Tile:
        return self._load(self._index(i))

    def __iter__(self) -> Iterator[Tile]:
        return (self[i] for i in range(len(self)))

    def meta_of(self, i: int) -> dict:
        """Metadata of tile ``i`` without decoding pixels (used by splits)."""
        return self._meta(self._index(i))

    def describe(self) -> dict:
        """JSON-able identity of the bytes this source yields (for a cache key).

        Holds the dataset name, the options that change the bytes, the number of
        tiles and a hash of the key list; never the absolute root path.
        """
        ident = {"dataset": self.name, **self._options()}
        ident["n_tiles"] = len(self)
        ident["keys_sha256"] = sha256_json(self.keys)
        return ident

    def default_split(self) -> tuple[str, Path | None]:
        """The split scheme used when the caller names none, and its folds csv if any."""
        return "cisca", None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lazy"] = {}
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_tiles={len(self)}, root={self.root})"

    def _index(self, i: int) -> int:
        n = len(self.keys)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: tile index {i} out of range for {n} tiles")
        return i % n

    def _cached(self, name: str, factory: Callable[[], Any]) -> Any:
        """Per-process lazy value (memory map, open archive); never pickled."""
        if name not in self._lazy:
            self._lazy[name] = factory()
        return self._lazy[name]

    def _options(self) -> dict:
        return {}

    def _load(self, i: int) -> Tile:
        raise NotImplementedError

    def _meta(self, i: int) -> dict:
        raise NotImplementedError


def open_dataset(name: str, root: str | Path | None = None, **options: Any) -> TileSource:
    """Open a registered dataset.

    Args:
        name: one of ``DATASETS.names()`` ("conic", "cytodark0", "folder", "pannuke", "semantic_folder", "synthetic").
        root: dataset folder (ignored by "synthetic").
        **options: reader options, e.g. ``magnification="20x"`` for cytodark0 or
            ``n_tiles=64, seed=0`` for synthetic.

    Returns:
        The reader, a ``TileSource``.

    Raises:
        KeyError: unknown dataset name (lists the valid names).
        TypeError: an option the reader does not take (lists the valid options).
        FileNotFoundError: a missing file or folder (names the expected path).
        ValueError: a file with the wrong shape or dtype (names the file).
    """
    factory = DATASETS.get(name)
    valid = [p.name for p in inspect.signature(factory).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"dataset {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    params = inspect.signature(factory).parameters
    for key, value in options.items():
        default = params[key].default
        if isinstance(default, (int, float, str)) and not isinstance(value, type(default)):
            raise TypeError(f"dataset {name!r}: option {key}={value!r} should be {type(default).__name__} "
                            f"(default {default!r})")
    return factory(None if root is None else Path(root), **options)


def require_root(root: Path | None, dataset: str, hint: str) -> Path:
    """Return ``root`` as an existing folder, or raise one clear line saying what to pass."""
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs a root folder: {hint}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset}: root folder {root} does not exist; {hint}")
    return root


def require_file(path: Path, dataset: str, hint: str) -> Path:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: missing {path}; {hint}")
    return path


def relabel(labels: np.ndarray) -> np.ndarray:
    """Map the non-zero ids of a label map to 1..N, keeping their sorted order.

    Args:
        labels: (H, W) non-negative integer ids (any integer dtype), 0 = background.

    Returns:
        (H, W) int32 with ids 1..N contiguous; 0 stays 0.
    """
    if labels.size == 0:
        return np.zeros(labels.shape, np.int32)
    lo, hi = labels.min(), labels.max()
    if lo < 0:
        raise ValueError(f"negative instance id {lo}")
    if labels.dtype.kind in "iu" and hi < 1 << 24:
        present = np.bincount(labels.ravel(), minlength=1) > 0
        present[0] = False
        lut = (np.cumsum(present) * present).astype(np.int32)
        return lut[labels]
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    return inverse if ids[0] == 0 else inverse + 1


def finish_tile(key: str, image: np.ndarray, inst: np.ndarray, types: np.ndarray | None,
                meta: dict, n_classes: int, where: str) -> Tile:
    """Validate decoded arrays and build a ``Tile`` that honours the contract.

    Args:
        key: tile key.
        image: (H, W, 3) uint8 RGB.
        inst: (H, W) non-negative integer instance ids, any numbering.
        types: (H, W) integer type ids 0..n_classes-1, or None for "one class".
        meta: JSON-able metadata.
        n_classes: number of classes including background.
        where: the file (or file[index]) the arrays came from, for error messages.

    Returns:
        The tile, with ``inst_map`` relabelled and ``type_map`` zeroed off nuclei; every array is a
        fresh writable array (never a view into a memory-mapped file).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if not image.flags.writeable:                # decoded from a memory map or a PIL buffer: own a copy
        image = image.copy()
    if inst.shape != image.shape[:2]:
        raise ValueError(f"{where}: instance map {inst.shape} does not match image {image.shape[:2]}")
    _check_integral(inst, where, "instance map")
    try:
        inst_map = relabel(inst)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if types is None:
        return Tile(key, image, inst_map, (inst_map > 0).astype(np.uint8), meta)
    if types.shape != inst.shape:
        raise ValueError(f"{where}: type map {types.shape} does not match instance map {inst.shape}")
    _check_integral(types, where, "type map")
    lo, hi = (int(types.min()), int(types.max())) if types.size else (0, 0)
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"{where}: type ids span {lo}..{hi}, expected 0..{n_classes - 1} (class_names)")
    type_map = types.astype(np.uint8)
    type_map[inst_map == 0] = 0
    return Tile(key, image, inst_map, type_map, meta)


def _check_integral(arr: np.ndarray, where: str, what: str) -> None:
    if arr.dtype.kind in "biu":
        return
    if arr.dtype.kind == "f" and np.array_equal(arr, np.floor(arr)):
        return
    raise ValueError(f"{where}: {what} must hold integer ids, got dtype {arr.dtype}")


def _check_unique(keys: list[str], dataset: str) -> None:
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dups = sorted({k for k in keys if k in seen or seen.add(k)})
        raise ValueError(f"{dataset}: duplicate tile keys, e.g. {dups[:5]}")


def natural_key(text: str) -> tuple:
    """Sort key that orders ``ID2_10`` after ``ID2_9`` (digit runs compare as numbers)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def files_fingerprint(root: Path, paths: Sequence[Path]) -> str:
    """sha256 over (path relative to root, size in bytes) of each file; cheap stand-in for content."""
    return sha256_json([[p.relative_to(root).as_posix(), p.stat().st_size] for p in paths])
