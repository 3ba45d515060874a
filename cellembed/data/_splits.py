"""Train / val / test selections: PanNuke's official folds, CISCA's stratified recipe, user folds.csv.

Scheme names (``resolve_split(..., scheme=...)``):

* ``"pannuke-official"`` — fold 1 = train, 2 = val, 3 = test. Rotate with
  ``"pannuke-official:<train>,<val>,<test>"``, e.g. ``"pannuke-official:2,3,1"`` trains on fold 2,
  validates on fold 3 and tests on fold 1. Needs ``meta["fold"]`` (the PanNuke reader sets it).
* ``"cisca"`` — CISCA.md §4.2 (``generate_split_{conic,pannuke}2.py``): grouping units are the sorted
  unique ``meta["group"]`` values, stratified by ``meta["stratum"]`` (one stratum if absent);
  ``StratifiedShuffleSplit(n_splits=10, train_size=0.8, test_size=0.2, random_state=5)``, split
  index 1 gives train+val / test; then ``StratifiedShuffleSplit(1, train_size=0.9, test_size=0.1,
  random_state=5)`` on the sorted train+val units gives train / val (≈ 72 / 8 / 20). Where a
  stratified split is impossible (a stratum with one unit, too few units) it falls back to an
  unstratified ``ShuffleSplit`` with the same sizes and seed, and, if even that is impossible, puts
  every unit in the larger side; ``detail`` records what happened.
* ``"folds-csv"`` — a csv ``img_id,fold`` (0/1/2 = train/val/test); repeated rows (CISCA's
  oversampling) are deduplicated. Used when ``folds`` is given, or by default when the dataset
  ships one (folder: ``<root>/folds.csv``; cytodark0: ``folds.csv`` in the size folder).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from cellembed._registry import Registry

from ._base import TileSource, sha256_json
from ._io import read_csv_rows

log = logging.getLogger(__name__)
SPLITS = ("all", "train", "val", "test")
_FOLD_OF_SPLIT = {"train": 0, "val": 1, "test": 2}

SplitFn = Callable[[TileSource, str, "str | None", "Path | None"], tuple[dict[str, list[int]], dict]]
SPLIT_SCHEMES: Registry[SplitFn] = Registry("split scheme")
"""Scheme name → ``fn(source, split, argument, folds_csv) -> ({"train"|"val"|"test": indices}, detail)``."""


class SplitSelection(NamedTuple):
    """The tiles of one split.

    Attributes:
        split: "all", "train", "val" or "test".
        scheme: "all", "pannuke-official", "cisca" or "folds-csv".
        indices: sorted indices into the source.
        detail: JSON-able identity of the split for a cache key (scheme parameters, csv sha256,
            unit hashes) plus the tile counts of every split.
    """

    split: str
    scheme: str
    indices: list[int]
    detail: dict


def resolve_split(source: TileSource, split: str = "all", folds: str | Path | None = None,
                  scheme: str | None = None) -> SplitSelection:
    """Select the tiles of one split.

    Args:
        source: the dataset.
        split: "all" (every tile, whatever the scheme), "train", "val" or "test".
        folds: a user csv ``img_id,fold`` (implies scheme "folds-csv").
        scheme: "pannuke-official[:t,v,s]", "cisca" or "folds-csv"; default: "folds-csv" if
            ``folds`` is given or the dataset ships a folds.csv, else the dataset's default
            ("pannuke-official" for PanNuke, "cisca" otherwise).

    Returns:
        The selection.

    Raises:
        ValueError: unknown split, conflicting arguments, or a folds csv that does not fit the dataset.
        KeyError: unknown scheme (lists the valid ones).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if split == "all":
        return SplitSelection("all", "all", list(range(len(source))), {"scheme": "all", "n_tiles": len(source)})
    name, arg, csv_path = _choose_scheme(source, folds, scheme)
    by_split, detail = SPLIT_SCHEMES.get(name)(source, split, arg, csv_path)
    detail = {"scheme": scheme or name, **detail, "n_tiles": {k: len(v) for k, v in by_split.items()}}
    return SplitSelection(split, name, sorted(by_split[split]), detail)


def _choose_scheme(source: TileSource, folds: str | Path | None,
                   scheme: str | None) -> tuple[str, str | None, Path | None]:
    default_name, default_csv = source.default_split()
    if scheme is None:
        scheme = "folds-csv" if folds is not None else default_name
    name, _, arg = scheme.partition(":")
    if folds is not None and name != "folds-csv":
        raise ValueError(f"folds={folds} given together with scheme {scheme!r}; a folds csv implies 'folds-csv'")
    csv_path = Path(folds) if folds is not None else default_csv
    if name == "folds-csv" and csv_path is None:
        raise ValueError(f"scheme 'folds-csv' needs folds=<csv> (--folds CSV); {source.name} ships no folds.csv")
    return name, arg or None, csv_path


@SPLIT_SCHEMES("folds-csv")
def _folds_csv_split(source: TileSource, split: str, arg: str | None, csv_path: Path | None) -> tuple[dict, dict]:
    if arg is not None:
        raise ValueError(f"scheme 'folds-csv' takes no ':' argument (got {arg!r}); pass the csv as folds=")
    if not csv_path.is_file():
        raise FileNotFoundError(f"folds csv {csv_path} does not exist; expected a csv with header img_id,fold")
    fold_of = read_folds_csv(csv_path)
    index = {k: i for i, k in enumerate(source.keys)}
    unknown = [k for k in fold_of if k not in index]
    if unknown:
        raise ValueError(f"{csv_path}: {len(unknown)} img_id(s) not in dataset {source.name!r}, e.g. {unknown[:5]}")
    by_split = {s: [index[k] for k, f in fold_of.items() if f == code] for s, code in _FOLD_OF_SPLIT.items()}
    detail = {"folds_csv": csv_path.name, "sha256": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
              "n_unlisted": len(source) - len(fold_of)}
    return by_split, detail


def read_folds_csv(path: Path) -> dict[str, int]:
    """Parse ``img_id,fold`` rows (fold 0/1/2), dropping repeated rows.

    Returns:
        img_id → fold, in first-appearance order.

    Raises:
        ValueError: a bad fold value or an id listed in two different folds (names the csv).
    """
    fold_of: dict[str, int] = {}
    for line, row in enumerate(read_csv_rows(path, ("img_id", "fold")), start=2):
        key, text = row["img_id"], row["fold"]
        if text not in ("0", "1", "2"):
            raise ValueError(f"{path}:{line}: fold {text!r} for {key!r}; folds must be 0 (train), 1 (val), 2 (test)")
        if fold_of.setdefault(key, int(text)) != int(text):
            raise ValueError(f"{path}:{line}: {key!r} is listed in folds {fold_of[key]} and {text}")
    return fold_of


@SPLIT_SCHEMES("pannuke-official")
def _pannuke_official_split(source: TileSource, split: str, arg: str | None, csv_path: Path | None) -> tuple[dict, dict]:
    order = _parse_fold_order(arg)
    folds = []
    for i in range(len(source)):
        fold = source.meta_of(i).get("fold")
        if fold is None:
            raise ValueError(f"scheme 'pannuke-official' needs meta['fold'] on every tile; {source.name} tile "
                             f"{source.keys[i]!r} has none")
        folds.append(int(fold))
    present = sorted(set(folds))
    wanted = order[("train", "val", "test").index(split)]
    if wanted not in present:
        raise ValueError(f"PanNuke fold {wanted} ({split}) is not in the dataset (folds read: {present}); "
                         "unzip it under root or rotate with scheme 'pannuke-official:<train>,<val>,<test>'")
    by_split = {s: [i for i, f in enumerate(folds) if f == fold] for s, fold in zip(("train", "val", "test"), order)}
    return by_split, {"train_fold": order[0], "val_fold": order[1], "test_fold": order[2], "folds_present": present}


def _parse_fold_order(arg: str | None) -> tuple[int, int, int]:
    if arg is None:
        return (1, 2, 3)
    try:
        order = tuple(int(p) for p in arg.split(","))
    except ValueError:
        order = ()
    if sorted(order) != [1, 2, 3]:
        raise ValueError(f"scheme 'pannuke-official:{arg}': expected a permutation of 1,2,3 as "
                         "<train>,<val>,<test>, e.g. 'pannuke-official:2,3,1'")
    return order


@SPLIT_SCHEMES("cisca")
def _cisca_split(source: TileSource, split: str, arg: str | None, csv_path: Path | None) -> tuple[dict, dict]:
    if arg is not None:
        raise ValueError(f"scheme 'cisca' takes no ':' argument (got {arg!r})")
    tile_units, unit_stratum = _units(source)
    units = np.array(sorted(unit_stratum), dtype=object)
    strata = np.array([unit_stratum[u] for u in units], dtype=object)
    trainval, test, outer = _shuffle_split(strata, n_splits=10, train_size=0.8, test_size=0.2, pick=1)
    tv_units = np.array(sorted(units[trainval]), dtype=object)
    tv_strata = np.array([unit_stratum[u] for u in tv_units], dtype=object)
    train, val, inner = _shuffle_split(tv_strata, n_splits=1, train_size=0.9, test_size=0.1, pick=0)
    split_of_unit = {**{u: "test" for u in units[test]}, **{u: "train" for u in tv_units[train]},
                     **{u: "val" for u in tv_units[val]}}
    by_split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, unit in enumerate(tile_units):
        by_split[split_of_unit[unit]].append(i)
    detail = {"random_state": 5, "outer": outer, "inner": inner,
              "units_sha256": sha256_json(sorted(unit_stratum.items())),
              "n_units": {s: sum(v == s for v in split_of_unit.values()) for s in ("train", "val", "test")}}
    return by_split, detail


def _units(source: TileSource) -> tuple[list[str], dict[str, str]]:
    """Each tile's grouping unit, and each unit's stratum (ValueError if a unit has two)."""
    tile_units, unit_stratum = [], {}
    for i in range(len(source)):
        meta = source.meta_of(i)
        unit, stratum = str(meta.get("group", source.keys[i])), str(meta.get("stratum", ""))
        if unit_stratum.setdefault(unit, stratum) != stratum:
            raise ValueError(f"{source.name}: group {unit!r} has tiles in strata {unit_stratum[unit]!r} and "
                             f"{stratum!r}; a grouping unit must have one stratum")
        tile_units.append(unit)
    return tile_units, unit_stratum


def _shuffle_split(strata: np.ndarray, n_splits: int, train_size: float, test_size: float,
                   pick: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split positions 0..n-1 as ``list(StratifiedShuffleSplit(...).split(...))[pick]``, with fallbacks.

    Returns:
        first, second: position arrays (e.g. train+val, test); info: what was run, JSON-able.
    """
    from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

    n = len(strata)
    info = {"n_splits": n_splits, "train_size": train_size, "test_size": test_size, "split_index": pick,
            "n_units": n, "stratified": True, "fallback": None}
    kwargs = dict(n_splits=n_splits, train_size=train_size, test_size=test_size, random_state=5)
    try:
        first, second = list(StratifiedShuffleSplit(**kwargs).split(np.zeros(n), strata))[pick]
        return first, second, info
    except ValueError as err:
        info.update(stratified=False, fallback="unstratified ShuffleSplit")
        reason = str(err)
    try:
        first, second = list(ShuffleSplit(**kwargs).split(np.zeros(n)))[pick]
    except ValueError as err:
        info["fallback"] = "every unit on the first side"
        reason = str(err)
        first, second = np.arange(n), np.arange(0)
    message = f"cisca split over {n} unit(s): {info['fallback']} ({reason})"
    if message not in _WARNED:  # once per process: extracting train, val and test splits the same way would repeat it
        _WARNED.add(message)
        log.warning(message)
    return first, second, info


_WARNED: set[str] = set()
