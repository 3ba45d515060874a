"""A sweep file resolved into configurations: one extraction per encoder and split, one run per config and seed.

A sweep YAML has these sections (unknown keys are errors naming the file)::

    data:     {dataset: pannuke, root: /data/pannuke, splits: {train: train, val: val, test: test},
               folds: null, scheme: null, dataset_options: {}}
    extract:  ExtractConfig fields shared by every cache (weights, input_policy, dtype, batch_size, ...)
    fit:      FitConfig fields shared by every run (epochs, batch_size, lr, decoder, head, loss, augment, ...)
    seeds:    [0, 1, 2]
    runs:     [{encoder: uni2_h, blocks: deep}, {encoder: uni2_h, blocks: mixed, loss: cisca}, ...]
    grid:     {encoder: [a, b], blocks: [shallow, deep], loss: [...]}   # the cartesian product, after `runs`

A run entry holds ``encoder``, ``blocks``, an optional ``name``, an optional ``extract`` mapping (ExtractConfig
fields for this encoder's cache, e.g. ``{weights: packaged}``) and any FitConfig field. Every encoder's cache
holds the union of the blocks its runs need (one extraction per encoder and split); each run picks its levels at
fit time (``FitConfig.levels``). Folder names carry a hash of the resolved configuration, so a changed config
lands in a fresh folder and is never mixed with an old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import NamedTuple

from cellembed._config import ConfigError, from_dict, load_yaml

SECTIONS = ("data", "extract", "fit", "seeds", "runs", "grid")
DATA_KEYS = ("dataset", "root", "splits", "folds", "scheme", "dataset_options")
SPLIT_ROLES = ("train", "val", "test")
# set by the sweep itself, never by the file
EXTRACT_OWN = ("dataset", "root", "split", "folds", "scheme", "dataset_options", "out", "encoder", "blocks",
               "overwrite", "repair", "rank", "world_size")
FIT_OWN = ("out", "cache", "val_cache", "source", "levels", "seed", "overwrite", "tune", "dataset", "root", "split",
           "folds", "encoder", "blocks", "weights", "input_policy", "dtype", "dataset_options")


class CacheJob(NamedTuple):
    """One encoder's caches: ``paths`` maps train/val/test to folders; ``configs`` the ExtractConfig per role."""

    encoder: str
    folder: Path
    paths: dict
    configs: dict


class RunJob(NamedTuple):
    """One configuration at one seed.

    Attributes:
        config_id: ``<name>-<hash>`` of the config without its seed (the seeds of one config share it).
        name: the readable name.
        seed: the seed.
        folder: ``<out>/runs/<config_id>/seed<seed>``.
        fit: the FitConfig (``out`` = ``folder/run``).
        cache: the CacheJob it reads.
        resolved: everything that defines the run (written to ``sweep.json`` beside it).
    """

    config_id: str
    name: str
    seed: int
    folder: Path
    fit: object
    cache: CacheJob
    resolved: dict


class Sweep(NamedTuple):
    """A resolved sweep: its caches and its runs, in file order (configs, then seeds)."""

    source: str
    out: Path
    caches: list
    runs: list


def parse_sets(pairs: list[str]) -> dict:
    """``--set section.key=value`` (``key=value`` for a ``fit`` field, ``seeds=[0,1]``) as a nested dict; values
    are read as YAML (``2`` an int, ``[0, 1]`` a list)."""
    import yaml

    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r} is not KEY=VALUE (e.g. --set fit.epochs=2 or --set data.root=/data)")
        section, dot, field = key.partition(".")
        if key == "seeds":
            out["seeds"] = yaml.safe_load(value)
            continue
        if not dot:
            section, field = "fit", key
        out.setdefault(section, {})[field] = yaml.safe_load(value)
    return out


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _expand(source: str, sweep: dict) -> list[dict]:
    runs = list(sweep.get("runs") or [])
    grid = sweep.get("grid") or {}
    if not isinstance(runs, list) or not isinstance(grid, dict):
        raise ConfigError(f"{source}: `runs` is a list of mappings and `grid` a mapping of key: [values]")
    if grid:
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        runs += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    if not runs:
        raise ConfigError(f"{source}: no configurations; add `runs:` entries or a `grid:`")
    return runs


def load_sweep(path: str | Path, sets: dict | None = None, out: str | Path | None = None) -> Sweep:
    """Read a sweep YAML (with ``--set`` overrides) and resolve every cache and run.

    Raises:
        ConfigError: unknown sections or keys, a run without an encoder, wrong types (naming the file).
        ValueError / KeyError: an unknown encoder or block preset.
    """
    source = str(path)
    sweep = load_yaml(path)
    for section, values in (sets or {}).items():
        if section in ("seeds",):
            sweep[section] = values
        else:
            sweep[section] = {**(sweep.get(section) or {}), **values}
    unknown = sorted(set(sweep) - set(SECTIONS) - {"out"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid: {list(SECTIONS)} (see configs/sweeps/)")
    data = dict(sweep.get("data") or {})
    bad = sorted(set(data) - set(DATA_KEYS))
    if bad or "dataset" not in data:
        raise ConfigError(f"{source}: data needs `dataset` and takes {list(DATA_KEYS)}; unknown {bad}")
    data["splits"] = {**{r: r for r in SPLIT_ROLES}, **(data.get("splits") or {})}
    seeds = sweep.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{source}: seeds should be a list of integers, e.g. [0, 1, 2]")
    root = Path(out or sweep.get("out") or Path("sweeps") / Path(source).stem)
    entries = [_entry(source, i, e, sweep.get("fit") or {}) for i, e in enumerate(_expand(source, sweep))]
    caches = _caches(source, root, data, sweep.get("extract") or {}, entries)
    runs = [_run(source, root, data, caches[_cache_group(e)], e, seed) for e in entries for seed in seeds]
    return Sweep(source, root, list(caches.values()), runs)


def _entry(source: str, i: int, entry: dict, fit: dict) -> dict:
    from cellembed.encoders import get_spec, resolve_blocks
    from cellembed.train import FitConfig

    where = f"{source} (config {i})"
    if not isinstance(entry, dict) or "encoder" not in entry:
        raise ConfigError(f"{where}: each run needs an `encoder` (and usually `blocks`)")
    own = {k: v for k, v in entry.items() if k not in ("encoder", "blocks", "name", "extract")}
    extract = entry.get("extract") or {}
    if not isinstance(extract, dict):
        raise ConfigError(f"{where}: `extract` in a run is a mapping of ExtractConfig fields (e.g. weights: packaged)")
    for key in sorted(set(own) & set(FIT_OWN) | set(fit) & set(FIT_OWN)):
        raise ConfigError(f"{where}: `{key}` is set by the sweep itself; remove it (seeds go in `seeds:`)")
    fields = {**fit, **own}
    from_dict(FitConfig, {**fields, "out": "-"}, where)  # unknown keys and wrong types, early
    blocks = str(entry.get("blocks", "default"))
    indices = resolve_blocks(get_spec(entry["encoder"]), blocks)
    name = entry.get("name") or "-".join([entry["encoder"], blocks.replace(",", "+"),
                                          *(f"{k}={v}" for k, v in sorted(own.items()))])
    return {"encoder": entry["encoder"], "blocks": blocks, "indices": list(indices), "fit": fields, "extract": extract,
            "name": str(name).replace("/", "_").replace(" ", "")}


def _caches(source: str, root: Path, data: dict, extract: dict, entries: list[dict]) -> dict:
    from cellembed.cache import ExtractConfig

    for key in sorted(set(extract) & set(EXTRACT_OWN)):
        raise ConfigError(f"{source}: extract.{key} is set by the sweep (data section or runs); remove it")
    caches = {}
    for group in dict.fromkeys(_cache_group(e) for e in entries):
        encoder, extract_run = group[0], {**extract, **json.loads(group[1])}
        for key in sorted(set(extract_run) & set(EXTRACT_OWN)):
            raise ConfigError(f"{source}: extract.{key} is set by the sweep (data section or runs); remove it")
        union = sorted({i for e in entries if _cache_group(e) == group for i in e["indices"]})
        blocks = ",".join(map(str, union))
        ident = {"data": data, "encoder": encoder, "blocks": blocks,  # how fast it runs does not name the cache
                 "extract": {k: v for k, v in extract_run.items() if k not in ("batch_size", "num_workers", "device")}}
        folder = root / "caches" / f"{encoder}-{_hash(ident)}"
        configs = {role: from_dict(ExtractConfig, {**extract_run, "dataset": data["dataset"], "root": data.get("root"),
                                                   "split": split, "folds": data.get("folds"),
                                                   "scheme": data.get("scheme"),
                                                   "dataset_options": data.get("dataset_options") or {},
                                                   "encoder": encoder, "blocks": blocks,
                                                   "out": str(folder / role)}, f"{source} (extract)")
                   for role, split in data["splits"].items()}
        caches[group] = CacheJob(encoder, folder, {r: folder / r for r in configs}, configs)
    return caches


def _cache_group(entry: dict) -> tuple[str, str]:
    """Runs of one encoder with the same extract options share a cache."""
    return entry["encoder"], json.dumps(entry["extract"], sort_keys=True)


def _run(source: str, root: Path, data: dict, cache: CacheJob, entry: dict, seed: int) -> RunJob:
    from cellembed.train import FitConfig

    from cellembed.train._fit import RESUME_FREE

    levels = ",".join(f"block_{i}" for i in entry["indices"])
    # what may change when a run resumes (device, workers, memory mode) does not define it
    defining = {k: v for k, v in entry["fit"].items() if k not in RESUME_FREE}
    resolved = {"data": data, "cache": cache.folder.name, "encoder": entry["encoder"], "blocks": entry["blocks"],
                "levels": levels, "fit": defining}
    config_id = f"{entry['name']}-{_hash(resolved)}"
    folder = root / "runs" / config_id / f"seed{seed}"
    fit = from_dict(FitConfig, {**entry["fit"], "out": str(folder / "run"), "cache": str(cache.paths["train"]),
                                "val_cache": str(cache.paths["val"]), "levels": levels, "seed": seed, "tune": True},
                    f"{source} ({entry['name']})")
    fit_config = {k: v for k, v in dataclasses.asdict(fit).items() if k not in RESUME_FREE + ("out", "cache")}
    return RunJob(config_id, entry["name"], seed, folder, fit, cache,
                  {**resolved, "name": entry["name"], "seed": seed, "fit_config": fit_config})


def parse_part(text: str | None, env: dict) -> tuple[int, int]:
    """``--part I/N`` (1 ≤ I ≤ N) or, unset, SLURM's array task: I = (ID − MIN) / STEP + 1, N = COUNT.

    SLURM numbers array tasks by the ids given to ``--array`` (``0-3`` gives 0..3, ``1-4`` gives 1..4) and sets
    ``SLURM_ARRAY_TASK_MIN`` / ``_MAX`` / ``_STEP`` / ``_COUNT``, so any range (``0-15:5`` too) maps onto parts
    1..N. An irregular id list (``--array=1,3,7``) is refused in one line; pass ``--part`` there. Without either: 1/1 (the whole sweep).

    Raises:
        ValueError: one line naming the bad value and the valid range.
    """
    if text is None and "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        low, count = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env["SLURM_ARRAY_TASK_COUNT"])
        high = int(env.get("SLURM_ARRAY_TASK_MAX", low + (count - 1) * step))
        if (high - low) // step + 1 != count:
            raise ValueError(f"SLURM array ids {low}..{high} (step {step}) are not a regular range of {count} tasks; "
                             "use --array=0-<N-1> or pass --part I/N")
        index = (int(env["SLURM_ARRAY_TASK_ID"]) - low) // step + 1
        text = f"{index}/{env['SLURM_ARRAY_TASK_COUNT']}"
    if text is None:
        return 1, 1
    i, sep, n = str(text).partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(i) <= int(n):
        raise ValueError(f"--part {text!r} should be I/N with 1 <= I <= N (e.g. --part 1/4 ... --part 4/4)")
    return int(i), int(n)


def share(configs: list[str], part: tuple[int, int]) -> set[str]:
    """The config ids part ``I/N`` runs: every N-th config from the I-th (all seeds of a config stay together)."""
    i, n = part
    return {c for k, c in enumerate(dict.fromkeys(configs)) if k % n == i - 1}
