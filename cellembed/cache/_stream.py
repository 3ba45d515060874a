"""The epoch plan shared by every memory mode, and the shard stream read in DataLoader workers.

Pipeline stages are plain generator functions (``read_shards`` → ``buffer_shuffle`` → ``prepare_sample``,
streams joined by ``round_robin``); ``epoch_order`` runs the same stages on sample indices, which is how the
RAM and GPU modes reproduce the stream mode's batches exactly.

With oversampling, ``spec["reps"]`` gives each cache sample's number of copies in the epoch. The plan then runs
on *occurrences*: cache sample ``i`` owns occurrence ids ``first[i] .. first[i + 1] - 1`` (``first`` from
:func:`occurrence_starts`), a shard's stream yields each of its samples once per occurrence, and dihedral
variants are drawn per occurrence. Without oversampling occurrence ids are cache indices.
"""

from __future__ import annotations


import numpy as np
import torch
from safetensors.numpy import load as st_load_np

from cellembed.cache._augment import dihedral, dihedral_np, sample_targets
from cellembed.cache._codec import GT
from cellembed.cache._manifest import CacheError
from cellembed.cache._oversample import instance_class_counts


def stream_shards(spec: dict) -> list[list[int]]:
    """Shard indices of each stream of this rank for this epoch."""
    shards = list(range(spec["rank"], len(spec["counts"]), spec["world_size"]))
    if spec["shuffle"]:
        perm = np.random.default_rng([spec["seed"], spec["epoch"], spec["rank"], 0]).permutation(len(shards))
        shards = [shards[i] for i in perm]
    return [shards[w::spec["n_streams"]] for w in range(spec["n_streams"])]


def buffer_shuffle(items, size: int, rng: np.random.Generator):
    """Generator stage: shuffle a stream through a buffer of ``size`` items (webdataset's shuffle, seeded)."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def round_robin(streams):
    """Generator stage: one item from each live stream in turn (a DataLoader's order over its workers)."""
    live = [iter(s) for s in streams]
    while live:
        still = []
        for it in live:
            item = next(it, _END)
            if item is not _END:
                still.append(it)
                yield item
        live = still


_END = object()


def _stream_rng(spec: dict, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec["seed"], spec["epoch"], spec["rank"], stream, 1])


def epoch_reps(spec: dict) -> np.ndarray | None:
    """(n_samples,) copies of every cache sample in this epoch, or None for one copy each.

    ``spec["reps"]`` (oversampling) times, for a cache with augmented views (``spec["views"]`` V > 1, a tile's V
    views stored consecutively), a 0/1 mask that keeps one view per tile, drawn per epoch from (seed, epoch, tile):
    every epoch is one pass over the tiles, each in one of its views.
    """
    reps, views = spec.get("reps"), int(spec.get("views") or 1)
    if views == 1:
        return reps
    n = spec["offsets"][-1]
    pick = np.random.default_rng([spec["seed"], spec["epoch"], 3]).integers(views, size=n // views)
    mask = (np.arange(n) % views == np.repeat(pick, views)).astype(np.int64)
    return mask if reps is None else reps * mask


def occurrence_starts(spec: dict) -> np.ndarray:
    """(n_samples + 1,) int64 first occurrence id of every cache sample (cumulative :func:`epoch_reps`)."""
    reps = epoch_reps(spec)
    if reps is None:
        return np.arange(spec["offsets"][-1] + 1, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(reps)]).astype(np.int64)


def epoch_order(spec: dict) -> list[int]:
    """This rank's occurrence ids (cache indices without oversampling) in this epoch's order."""
    first, streams = occurrence_starts(spec).tolist(), []
    for w, shards in enumerate(stream_shards(spec)):
        idx = (i for s in shards for i in range(first[spec["offsets"][s]], first[spec["offsets"][s + 1]]))
        streams.append(buffer_shuffle(idx, spec["buffer"], _stream_rng(spec, w)) if spec["shuffle"] else idx)
    return list(round_robin(streams))


def epoch_variants(spec: dict) -> np.ndarray:
    """(n_occurrences,) dihedral variant of every occurrence for this epoch (all 0 without augmentation)."""
    n, allowed = int(occurrence_starts(spec)[-1]), np.asarray(spec["variants"])
    if len(allowed) == 1:
        return np.zeros(n, np.int64)
    return allowed[np.random.default_rng([spec["seed"], spec["epoch"], 2]).integers(len(allowed), size=n)]


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's samples for one epoch, one stream per DataLoader worker, as prepared per-sample dicts."""

    def __init__(self, spec: dict, epoch=None):
        super().__init__()
        self.spec = spec
        self.epoch = epoch      # a shared multiprocessing Value overriding spec["epoch"] (persistent workers)

    def __iter__(self):
        spec = self.spec if self.epoch is None else {**self.spec, "epoch": int(self.epoch.value)}
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        streams = stream_shards(spec)
        if w >= len(streams):
            return
        variants = epoch_variants(spec)
        samples = read_shards(spec, streams[w])
        if spec["shuffle"]:
            samples = buffer_shuffle(samples, spec["buffer"], _stream_rng(spec, w))
        try:
            for index, sample in samples:
                yield prepare_sample(index, sample, int(variants[index]), spec)
        except CacheError as err:
            yield {"error": str(err)}


def read_shards(spec: dict, shards: list[int]):
    """Generator stage: ``(occurrence id, Sample)`` for every occurrence of the samples of ``shards`` (a sample
    repeated per occurrence); decode errors → CacheError."""
    first, cache = occurrence_starts(spec).tolist(), spec["cache"]
    served = [cache.level_names[j] for j in spec["level_idx"]]  # only these are decoded
    read = lambda c, path: c.iter_shard(path, level_names=served)  # noqa: E731
    for s in shards:
        for i, sample in read_shard(cache, s, spec["offsets"][s], spec["counts"][s], read):
            check_sample(sample, cache, cache.shard_paths[s], spec["level_idx"])
            for occurrence in range(first[i], first[i + 1]):
                yield occurrence, sample


def check_sample(sample, cache, path, level_idx: list[int] | None = None) -> None:
    """Refuse a decoded sample that does not fit the manifest: level shapes (of the decoded levels ``level_idx``,
    default all), (T, T, 3) uint8 image, (T, T) maps, ids >= 0, types <= K. Damaged payload bytes that still
    decode land here instead of in a batch."""
    m, problems = cache.manifest, []
    t, k = m["tile_size"], len(m["class_names"]) - 1
    levels = m["levels"] if level_idx is None else [m["levels"][j] for j in level_idx]
    for lv, f in zip(levels, sample.feats):
        if tuple(f.shape) != (lv["channels"], *lv["grid"]):
            problems.append(f"{lv['name']} has shape {tuple(f.shape)}, expected {(lv['channels'], *lv['grid'])}")
    if sample.image.shape != (t, t, 3) or sample.image.dtype != np.uint8:
        problems.append(f"image is {sample.image.dtype} {sample.image.shape}, expected uint8 {(t, t, 3)}")
    for name, a in (("inst_map", sample.inst_map), ("type_map", sample.type_map)):
        if a.shape != (t, t):
            problems.append(f"{name} has shape {a.shape}, expected {(t, t)}")
    if sample.inst_map.size and sample.inst_map.min() < 0:
        problems.append(f"inst_map holds negative id {sample.inst_map.min()}")
    if sample.type_map.size and sample.type_map.max() > k:
        problems.append(f"type_map holds type {sample.type_map.max()}, the cache has {k} classes")
    if problems:
        raise CacheError(f"{path}: corrupt sample {sample.key!r} ({'; '.join(problems)}); run `cellembed verify "
                         f"{cache.path}`, then rerun the same extract command to rebuild it")


def read_shard(cache, s: int, offset: int, count: int, read=None):
    """Generator stage: ``(cache index, item)`` of shard ``s``, whose ``count`` samples start at ``offset``.

    ``read(cache, path)`` iterates the shard's items (default ``cache.iter_shard``). Any failure, and a sample
    count other than ``count``, raises a CacheError naming the shard file and the fix.
    """
    path, n = cache.shard_paths[s], 0
    fix = f"run `cellembed verify {cache.path}`, then rerun the same extract command to rebuild it"
    try:
        for n, item in enumerate(cache.iter_shard(path) if read is None else read(cache, path), 1):
            if n > count:
                break
            yield offset + n - 1, item
    except CacheError:
        raise
    except Exception as err:  # noqa: BLE001 - any undecodable member means a corrupt shard
        raise CacheError(f"{path}: corrupt sample ({type(err).__name__}: {err}); {fix}") from None
    if n != count:
        found = f"more than {count}" if n > count else str(n)
        raise CacheError(f"{path}: {found} samples, the manifest lists {count}; {fix}")


def read_class_counts(cache, path):
    """Iterate the (K + 1,) instance class counts of a shard's samples, decoding only their ``gt.safetensors``."""
    k = len(cache.manifest["class_names"]) - 1
    for _, data in cache.shard_members(path, "." + GT):
        gt = st_load_np(data)
        yield instance_class_counts(gt["inst_map"], gt["type_map"], k)


def tile_class_counts(cache) -> np.ndarray:
    """(n, K + 1) int64 instances per class of every cache sample, in cache order (reads only the GT members).

    Raises:
        CacheError: a shard is missing, unreadable, or holds another number of samples than the manifest lists.
    """
    k = len(cache.manifest["class_names"]) - 1
    rows = [np.zeros((0, k + 1), np.int64)]
    offset = 0
    for s, shard in enumerate(cache.manifest["shards"]):
        rows += [c[None] for _, c in read_shard(cache, s, offset, shard["n_samples"], read=read_class_counts)]
        offset += shard["n_samples"]
    return np.concatenate(rows)


def prepare_sample(index: int, sample, v: int, spec: dict) -> dict:
    """Apply dihedral variant ``v`` to the levels (``read_shards`` decoded the served ones only), image and maps,
    compute targets after."""
    feats = list(sample.feats)
    image = torch.from_numpy(sample.image if sample.image.flags.writeable else sample.image.copy()).permute(2, 0, 1)
    inst, typ = sample.inst_map, sample.type_map
    if v:
        feats, image = [dihedral(f, v) for f in feats], dihedral(image, v)
        inst, typ = dihedral_np(inst, v), dihedral_np(typ, v)
    item = {"index": index, "key": sample.key, "feats": [f.contiguous() for f in feats],
            "image": image.contiguous(), "inst_map": torch.from_numpy(np.ascontiguousarray(inst)),
            "type_map": torch.from_numpy(np.ascontiguousarray(typ))}
    if spec["targets"]:
        item["targets"] = sample_targets(inst, typ, spec["head"], spec["magnification"])
    return item


def data_loader(spec: dict, num_workers: int, epoch=None) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's shard streams.

    Args:
        spec: from ``Loader.spec``.
        num_workers: reader processes (0: read in this process).
        epoch: a ``multiprocessing.Value`` holding the epoch to serve; with it the reader processes persist
            across epochs (set the value, then iterate again) instead of starting anew each epoch.
    """
    if num_workers and spec["targets"]:
        sample_targets(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.uint8), spec["head"], spec["magnification"])
    return torch.utils.data.DataLoader(ShardStream(spec, epoch), batch_size=None, num_workers=num_workers,
                                       prefetch_factor=8 if num_workers else None,
                                       persistent_workers=bool(num_workers) and epoch is not None)
