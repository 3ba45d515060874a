"""Feeding the decoder from a feature cache: stream / ram / gpu memory modes, dihedral augmentation, DDP splits.

One epoch's order is a pure function of (seed, epoch, rank, world size, number of streams, shuffle buffer) and
the manifest's shard sizes, shared by every memory mode, so ``stream``, ``ram`` and ``gpu`` give identical
batches for the same seed:

1. Rank ``r`` of ``world_size`` owns shards ``r, r + world_size, ...`` (fixed for the whole run, so every
   rank's sample count and ``len(loader)`` are the same every epoch).
2. Its shards are permuted per epoch and dealt to ``max(1, num_workers)`` streams round-robin; each stream
   reads its shards in order through a seeded shuffle buffer of ``shuffle_buffer`` samples ("auto": as many
   decoded samples as fit in 64 MB, between 16 and 512, computed from the manifest, so the same in every mode).
3. Streams are interleaved one sample at a time (what a DataLoader over an IterableDataset does with
   ``batch_size=None``) and cut into batches; every rank yields ``len(loader)`` batches, the smallest
   rank's count, so DDP ranks stay in step: when the ranks' sample counts differ (shards of unequal size, or
   a shard count that does not divide by the world size), the surplus of a larger rank (the samples last in
   its shuffled order, so other ones every epoch) sits out that epoch. A rank needs at least one shard.
   ``same_steps=False`` (validation, which runs no per-step collective) yields every sample of the rank.

Dihedral variants are drawn per epoch per sample (by the sample's index in the cache), so a sample gets the
same variant whatever the mode, rank or worker.

With ``oversample`` (CISCA.md §4.3), the oversampled list is computed once from the instance class counts of
every tile and turned into a number of copies per cache sample; the plan above then runs on those copies
(a shard's stream yields a sample once per copy, and each copy draws its own dihedral variant).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cellembed.cache._augment import (
    HEADS,
    TargetMemo,
    allowed_variants,
    dihedral_batch,
    finish_targets,
    stack_targets,
)
from cellembed.cache._layout import describe_difference
from cellembed.cache._manifest import CacheError
from cellembed.cache._oversample import OVERSAMPLE_SCHEMES, cisca_oversample
from cellembed.cache._reader import Cache, open_cache
from cellembed.cache._stream import (
    data_loader,
    epoch_order,
    epoch_reps,
    epoch_variants,
    occurrence_starts,
    stream_shards,
    tile_class_counts,
)

MEMORY_MODES = ("auto", "stream", "ram", "gpu")
AUGMENTS = ("none", "dihedral")
OVERSAMPLES = ("none", *OVERSAMPLE_SCHEMES)
SHUFFLE_BUFFER = "auto"
SHUFFLE_BUFFER_BYTES = 64 << 20
"""Byte budget of one stream's shuffle buffer with ``shuffle_buffer="auto"`` (decoded samples)."""
SHUFFLE_BUFFER_RANGE = (16, 512)
TARGET_BYTES_PER_PIXEL = 22  # cisca: classes 1 + directions 16 + types 1 + weights 4


class Batch(NamedTuple):
    """One training batch, everything on the loader's device.

    Attributes:
        feats: one (B, C, h, w) float32 tensor per served level, in ``loader.level_names`` order.
        image: (B, 3, T, T) uint8 RGB tile (augmented like the features).
        targets: per head, cisca: ``classes`` (B, T, T) int64, ``directions`` (B, 4, T, T) float32, ``types``
            (B, T, T) int64, ``weights`` (B, T, T) float32; hovernet: ``np`` (B, T, T) int64, ``hv``
            (B, 2, T, T) float32, ``nc`` (B, T, T) int64; semantic: ``semantic`` (B, T, T) int64. Always
            also ``inst_map`` (B, T, T) int32 and ``type_map`` (B, T, T) int64 (augmented GT, for scoring).
        keys: the B tile keys.
    """

    feats: list[torch.Tensor]
    image: torch.Tensor
    targets: dict[str, torch.Tensor]
    keys: list[str]


def check_compatible(cache: Cache | str | Path, expected: dict | str) -> None:
    """Refuse a cache that does not match what a run was configured or trained with.

    Args:
        cache: the cache (or its directory).
        expected: a cache key string; a whole manifest; or any subset of the manifest's ``identity`` (nested
            dicts compare only the keys given, e.g. ``{"encoder": train.manifest["identity"]["encoder"],
            "dtype": "fp16"}`` to check that a validation cache comes from the same encoder, blocks and input),
            optionally with ``cache_key``, ``class_names``, ``tile_size`` and ``levels`` (level names that
            must all be cached).

    Raises:
        CacheError: naming every difference as ``field: cache value → expected value``.
    """
    cache = open_cache(cache) if isinstance(cache, (str, Path)) else cache
    if isinstance(expected, str):
        expected = {"cache_key": expected}
    if "identity" in expected and "cache_key" in expected:
        expected = expected["identity"]
    expected = dict(expected)
    diffs = []
    wanted_levels = expected.pop("levels", None)
    if wanted_levels is not None:
        missing = [name for name in wanted_levels if name not in cache.level_names]
        if missing:
            diffs.append(f"levels: {', '.join(missing)} not cached (cache has {', '.join(cache.level_names)})")
    view = dict(cache.manifest["identity"], cache_key=cache.cache_key,
                class_names=cache.manifest.get("class_names"), tile_size=cache.manifest.get("tile_size"))
    diffs += describe_difference(_restrict(view, expected), expected)
    if diffs:
        more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
        raise CacheError(f"{cache.path}: cache does not match the run ({'; '.join(diffs[:8])}{more}; shown as "
                         "cache → expected); point at a cache extracted with the run's settings, or re-extract")


def _restrict(view: dict, expected: dict) -> dict:
    out = {}
    for k, want in expected.items():
        have = view.get(k)
        out[k] = _restrict(have, want) if isinstance(have, dict) and isinstance(want, dict) else have
    return out


def make_loader(cache: Cache | str | Path, *, batch_size: int, memory: str = "auto", augment: str = "none",
                head: str = "cisca", magnification: str = "40x", shuffle: bool = True, seed: int = 0,
                num_workers: int = 2, device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                levels: list[str] | None = None, shuffle_buffer: int | str = SHUFFLE_BUFFER,
                drop_last: bool = False, oversample: str = "none", same_steps: bool = True) -> Loader:
    """A per-epoch iterable of :class:`Batch` over a feature cache.

    Args:
        cache: the cache (or its directory).
        batch_size: samples per batch (the last batch of an epoch may be smaller unless ``drop_last``).
        memory: "stream" (read shards each epoch in worker processes; memory bounded by the shuffle buffer),
            "ram" (decode every sample of this rank once into host tensors, pinned when ``device`` is CUDA),
            "gpu" (the whole rank's share as tensors on ``device``: an epoch is pure indexing), or "auto": "gpu"
            when ``device`` is CUDA and the decoded share plus its targets take under half the free GPU memory,
            else "ram" when they take under half the available RAM (divided by ``LOCAL_WORLD_SIZE``), else
            "stream".
        augment: "none" or "dihedral" (one random flip/rot90 per sample, applied jointly to every level, the
            image and the GT maps; targets computed after from the transformed maps).
        head: "cisca", "hovernet" or "semantic": which targets to compute.
        magnification: "20x" or "40x", for CISCA's targets.
        shuffle: shuffle shards and samples each epoch (``False``: cache order, streams interleaved).
        seed: same seed, epoch and settings → same batches and augmentations.
        num_workers: worker processes that read and decode shards in "stream" mode (and load "ram"/"gpu");
            also the number of streams the order is built from, so keep it equal to compare modes.
        device: where batches go.
        rank, world_size: this process's DDP rank and the number of ranks (shards are split between them;
            raises CacheError when there are fewer shards than ranks and ``same_steps``).
        levels: subset of ``cache.level_names`` to serve (default: all), in cache order.
        shuffle_buffer: samples held per stream when shuffling, or "auto": as many decoded samples (every
            cached level, image, GT maps) as fit in 64 MB, clamped to 16..512. The buffer bounds stream mode's
            memory (per reader process), whatever the cache's size; larger buffers mix samples across more
            shards. Part of the epoch plan: keep it equal to compare modes or seeds.
        drop_last: drop an epoch's incomplete last batch.
        oversample: "none", or CISCA's oversampling of rare classes for a *training* cache, "cisca-pannuke"
            (multipliers 1, 1, 1, 1; 98.5th percentile) or "cisca-conic" (1.6, 1.6, 0.9, 0.9, 0.9; 97th): an
            epoch is one pass over the oversampled tile list (duplicates included, ``len(loader)`` counts
            them). The list is drawn once with seed 5, whatever ``seed``, from every tile's instance class
            counts (read from the cache's GT when the loader is built; ``loader.oversampled``). Raises
            ValueError when the cache's classes do not fit the scheme (PanNuke: 5 classes, CoNIC: 6).
        same_steps: every rank yields the smallest rank's number of batches (training under DDP, whose ranks
            must step together); False: every sample of this rank (validation).
    """
    cache = open_cache(cache) if isinstance(cache, (str, Path)) else cache
    return Loader(cache, batch_size=batch_size, memory=memory, augment=augment, head=head,
                  magnification=magnification, shuffle=shuffle, seed=seed, num_workers=num_workers,
                  device=torch.device(device), rank=rank, world_size=world_size, levels=levels,
                  shuffle_buffer=shuffle_buffer, drop_last=drop_last, oversample=oversample, same_steps=same_steps)


def _check_options(o: dict, cache: Cache) -> None:
    for name, valid in (("memory", MEMORY_MODES), ("augment", AUGMENTS), ("head", HEADS),
                        ("oversample", OVERSAMPLES)):
        if o[name] not in valid:
            raise ValueError(f"unknown {name} {o[name]!r}; valid: {', '.join(valid)}")
    if o["magnification"] not in ("20x", "40x"):
        raise ValueError(f"unknown magnification {o['magnification']!r}; valid: 20x, 40x")
    buf = o["shuffle_buffer"]
    if buf != "auto" and (not isinstance(buf, int) or isinstance(buf, bool) or buf < 1):
        raise ValueError(f"shuffle_buffer must be 'auto' or an integer >= 1, got {buf!r}")
    if o["batch_size"] < 1 or o["num_workers"] < 0:
        raise ValueError("batch_size must be >= 1 and num_workers >= 0")
    if not 0 <= o["rank"] < o["world_size"]:
        raise ValueError(f"rank {o['rank']} is outside world size {o['world_size']}")
    if o["same_steps"]:
        check_world_size(cache, o["world_size"])
    unknown = [n for n in (o["levels"] or []) if n not in cache.level_names]
    if unknown:
        raise CacheError(f"{cache.path}: levels {unknown} are not cached; this cache holds {cache.level_names}")


def check_world_size(cache: Cache, world_size: int) -> None:
    """Refuse more training ranks than the cache has shards (ranks read whole shards; each needs one)."""
    n_shards = len(cache.manifest["shards"])
    if world_size > n_shards:
        raise CacheError(f"{cache.path}: {n_shards} shard(s) for {world_size} processes; every rank reads whole "
                         f"shards, so run at most {n_shards} processes or re-extract with a smaller --shard-size")


class Loader:
    """Batches of a feature cache, one pass per epoch. Build with :func:`make_loader`.

    Attributes:
        cache: the cache read.
        memory: the resolved memory mode ("stream", "ram" or "gpu").
        level_names: the served levels.
        n_samples: samples this rank serves per epoch (oversampling copies included).
        n_tiles: distinct cache samples this rank owns.
        oversampled: the ``Oversampled`` list (indices, classes, n_draws) of the whole cache, or None.
        class_counts: (n, K + 1) int64 instance counts per tile and class (``oversample`` set), or None.
    """

    def __init__(self, cache: Cache, **o):
        _check_options(o, cache)
        if o["shuffle_buffer"] == "auto":
            o = {**o, "shuffle_buffer": auto_shuffle_buffer(cache)}
        self.cache, self.o, self.epoch = cache, o, 0
        self.device = o["device"]
        self.level_names = [n for n in cache.level_names if o["levels"] is None or n in o["levels"]]
        self.level_idx = [cache.level_names.index(n) for n in self.level_names]
        self.counts = [s["n_samples"] for s in cache.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(int).tolist()
        grids = [tuple(lv["grid"]) for lv in cache.manifest["levels"]]
        self.variants = allowed_variants(grids) if o["augment"] == "dihedral" else [0]
        self.views = cache_views(cache)
        self.class_counts = self.oversampled = self.reps = None
        if o["oversample"] != "none":
            self.class_counts, self.oversampled = _oversample(cache, o["oversample"], self.views)
            n_tiles = len(self.class_counts)
            self.reps = np.repeat(np.bincount(self.oversampled.indices, minlength=n_tiles), self.views)
        first = occurrence_starts(self.spec(0))
        served = [int(first[self.offsets[s + 1]] - first[self.offsets[s]]) for s in range(len(self.counts))]
        per_rank = [sum(served[r::o["world_size"]]) for r in range(o["world_size"])]
        self.n_samples = per_rank[o["rank"]]
        self.n_tiles = sum(self.counts[o["rank"]::o["world_size"]])
        b = o["batch_size"]
        steps = [n // b if o["drop_last"] else -(-n // b) for n in per_rank]
        self.n_batches = min(steps) if o["same_steps"] else steps[o["rank"]]
        self.memory = o["memory"] if o["memory"] != "auto" else choose_memory(self)
        self.store = self.memo = self._stream = None
        if self.memory != "stream":
            self.memo = TargetMemo(o["head"], o["magnification"], _memo_budget(self), self.store_device)
            self.store = _load_store(self)

    @property
    def store_device(self) -> torch.device:
        return self.device if self.memory == "gpu" else torch.device("cpu")

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation draw the next iteration uses."""
        self.epoch = int(epoch)

    def spec(self, epoch: int, augment: bool = True, targets: bool = True, shuffle: bool | None = None) -> dict:
        """Everything a stream needs to rebuild this rank's epoch (picklable, for worker processes)."""
        o = self.o
        return {"cache": self.cache, "level_idx": self.level_idx, "counts": self.counts, "offsets": self.offsets,
                "seed": o["seed"], "epoch": epoch, "rank": o["rank"], "world_size": o["world_size"],
                "n_streams": max(1, o["num_workers"]), "shuffle": o["shuffle"] if shuffle is None else shuffle,
                "buffer": o["shuffle_buffer"], "variants": self.variants if augment else [0],
                "head": o["head"], "magnification": o["magnification"], "targets": targets, "reps": self.reps,
                "views": self.views}

    def __iter__(self) -> Iterator[Batch]:
        if self.memory == "stream":
            if self._stream is None:       # reader processes started once, kept across epochs
                self._epoch_value = mp.get_context().Value("q", self.epoch, lock=False)
                self._stream = data_loader(self.spec(self.epoch), self.o["num_workers"], self._epoch_value)
            self._epoch_value.value = self.epoch
            items = iter(self._stream)
            for _ in range(self.n_batches):
                yield self._finish(_collate(_take(items, self.o["batch_size"])))
            return
        spec = self.spec(self.epoch)
        order = epoch_order(spec)
        variants = epoch_variants(spec)
        reps = epoch_reps(spec)
        tile_of = None if reps is None else np.repeat(np.arange(len(reps)), reps)
        b = self.o["batch_size"]
        for start in range(0, self.n_batches * b, b):
            yield self._indexed_batch(order[start:start + b], variants, tile_of)

    def _indexed_batch(self, indices: list[int], variants: np.ndarray, tile_of: np.ndarray | None) -> Batch:
        s = self.store
        tiles = indices if tile_of is None else tile_of[indices].tolist()
        rows = [s["row"][i] for i in tiles]
        var = torch.as_tensor(variants[indices], dtype=torch.int64)
        sel = torch.as_tensor(rows, dtype=torch.int64, device=self.store_device)
        pick = lambda t: dihedral_batch(t.index_select(0, sel), var)
        targets = stack_targets([self.memo.get(r, int(v), s["inst_np"][r], s["type_np"][r])
                                 for r, v in zip(rows, var.tolist())])
        return self._finish({"feats": [pick(f) for f in s["feats"]], "image": pick(s["image"]),
                             "inst_map": pick(s["inst_map"]), "type_map": pick(s["type_map"]),
                             "targets": targets, "keys": [s["keys"][r] for r in rows]})

    def _finish(self, c: dict) -> Batch:
        move = lambda t: _to_device(t, self.device)
        targets = finish_targets({**c["targets"], "type_map": c["type_map"]}, self.device)
        targets["inst_map"] = move(c["inst_map"])
        return Batch([move(f).float() for f in c["feats"]], move(c["image"]), targets, c["keys"])


def cache_views(cache: Cache) -> int:
    """Views per tile of a cache extracted with ``--augment-views`` (1 otherwise)."""
    return int((cache.manifest["identity"].get("augment_views") or {}).get("views", 1))


def _oversample(cache: Cache, scheme: str, views: int = 1):
    """Instance class counts and the oversampled list of the cache's tiles (of view 0 only with augmented views:
    a tile's views share its number of copies, so every shard serves the same count each epoch)."""
    counts = tile_class_counts(cache)[::views]
    try:
        return counts, cisca_oversample(counts, scheme)
    except ValueError as err:
        raise ValueError(f"{cache.path}: oversample={scheme!r}: {err} "
                         f"(cache classes: {', '.join(cache.manifest['class_names'])})") from None


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _take(items: Iterator[dict], n: int) -> list[dict]:
    group = list(islice(items, n))
    for item in group:
        if "error" in item:
            raise CacheError(item["error"])
    if not group:
        raise CacheError("the cache yielded fewer samples than its manifest lists; run `cellembed verify` on it")
    return group


def _collate(items: list[dict]) -> dict:
    return {"feats": [torch.stack([it["feats"][j] for it in items]) for j in range(len(items[0]["feats"]))],
            "image": torch.stack([it["image"] for it in items]),
            "inst_map": torch.stack([it["inst_map"] for it in items]),
            "type_map": torch.stack([it["type_map"] for it in items]),
            "targets": stack_targets([it["targets"] for it in items]) if "targets" in items[0] else {},
            "keys": [it["key"] for it in items]}


# ---- ram / gpu: this rank's share decoded once ---------------------------------------------------------------


def _load_store(loader: Loader) -> dict:
    """Decode this rank's samples once into stacked tensors (fp16 levels as cached) on the store device."""
    # each sample once (no oversampling copies, every view); workers also compute its unaugmented targets
    spec = dict(loader.spec(0, augment=False, targets=True, shuffle=False), reps=None, views=1)
    mine = sorted(i for shards in stream_shards(spec) for s in shards
                  for i in range(loader.offsets[s], loader.offsets[s + 1]))
    row = {i: r for r, i in enumerate(mine)}
    store, n = None, len(mine)
    for item in data_loader(spec, loader.o["num_workers"]):
        if "error" in item:
            raise CacheError(item["error"])
        if store is None:
            store = {"feats": [torch.empty((n, *f.shape), dtype=f.dtype) for f in item["feats"]], "keys": [""] * n,
                     **{k: torch.empty((n, *item[k].shape), dtype=item[k].dtype)
                        for k in ("image", "inst_map", "type_map")}}
        r = row[item["index"]]
        for j, f in enumerate(item["feats"]):
            store["feats"][j][r] = f
        for k in ("image", "inst_map", "type_map"):
            store[k][r] = item[k]
        store["keys"][r] = item["key"]
        loader.memo.put(r, 0, item["targets"])
    store["inst_np"], store["type_np"] = store["inst_map"].numpy(), store["type_map"].numpy()
    dev = loader.store_device
    place = (lambda t: t.pin_memory()) if dev.type == "cpu" and loader.device.type == "cuda" else (lambda t: t.to(dev))
    store["feats"] = [place(f) for f in store["feats"]]
    for k in ("image", "inst_map", "type_map"):
        store[k] = place(store[k])
    store["row"] = row
    return store


def _decoded_bytes(manifest: dict, level_names: list[str] | None = None) -> int:
    """Bytes of one decoded sample: the levels (all, or ``level_names``) as stored, the image and the GT maps."""
    item = 4 if manifest["identity"].get("dtype") == "fp32" else 2
    levels = [lv for lv in manifest["levels"] if level_names is None or lv["name"] in level_names]
    feats = sum(lv["channels"] * lv["grid"][0] * lv["grid"][1] * item for lv in levels)
    return feats + manifest["tile_size"] ** 2 * (3 + 4 + 1)


def _bytes_per_sample(loader: Loader) -> int:
    """A served sample in RAM/GPU mode: its decoded bytes plus its memoised targets."""
    m = loader.cache.manifest
    return _decoded_bytes(m, loader.level_names) + m["tile_size"] ** 2 * TARGET_BYTES_PER_PIXEL


def auto_shuffle_buffer(cache: Cache) -> int:
    """``shuffle_buffer="auto"``: decoded samples per 64 MB (all levels as stored, image, GT), in 16..512."""
    lo, hi = SHUFFLE_BUFFER_RANGE
    return int(min(hi, max(lo, SHUFFLE_BUFFER_BYTES // max(_decoded_bytes(cache.manifest), 1))))


def available_ram() -> int:
    """Bytes of RAM available now (``MemAvailable``), or total physical memory where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_memory(loader: Loader) -> str:
    """The "auto" rule: see :func:`make_loader`."""
    need = max(_bytes_per_sample(loader) * loader.n_tiles,
               loader.cache.manifest["n_bytes"] // loader.o["world_size"])
    if loader.device.type == "cuda" and need < 0.5 * torch.cuda.mem_get_info(loader.device)[0]:
        return "gpu"
    if need * _local_world() < 0.5 * available_ram():
        return "ram"
    return "stream"


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _memo_budget(loader: Loader) -> int:
    """Targets memo: at most a quarter of the free memory where the store lives."""
    if loader.store_device.type == "cuda":
        return int(0.25 * torch.cuda.mem_get_info(loader.store_device)[0])
    return int(0.25 * available_ram() / _local_world())
