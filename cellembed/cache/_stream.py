"""The epoch plan shared by every memory mode, and the shard stream read in DataLoader workers.

Pipeline stages are plain generator functions (``read_shards`` → ``buffer_shuffle`` → ``prepare_sample``,
streams joined by ``round_robin``); ``epoch_order`` runs the same stages on sample indices, which is how the
RAM and GPU modes reproduce the stream mode's batches exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from cellembed.cache._augment import dihedral, dihedral_np, sample_targets
from cellembed.cache._manifest import CacheError


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


def epoch_order(spec: dict) -> list[int]:
    """This rank's sample indices (positions in the cache) in this epoch's order."""
    streams = []
    for w, shards in enumerate(stream_shards(spec)):
        idx = (i for s in shards for i in range(spec["offsets"][s], spec["offsets"][s + 1]))
        streams.append(buffer_shuffle(idx, spec["buffer"], _stream_rng(spec, w)) if spec["shuffle"] else idx)
    return list(round_robin(streams))


def epoch_variants(spec: dict) -> np.ndarray:
    """(n_samples,) dihedral variant of every cache sample for this epoch (all 0 without augmentation)."""
    n, allowed = spec["offsets"][-1], np.asarray(spec["variants"])
    if len(allowed) == 1:
        return np.zeros(n, np.int64)
    return allowed[np.random.default_rng([spec["seed"], spec["epoch"], 2]).integers(len(allowed), size=n)]


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's samples for one epoch, one stream per DataLoader worker, as prepared per-sample dicts."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec

    def __iter__(self):
        spec = self.spec
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
    """Generator stage: ``(cache index, Sample)`` for every sample of ``shards``; decode errors → CacheError."""
    cache = spec["cache"]
    for s in shards:
        path, n = cache.shard_paths[s], 0
        try:
            for n, sample in enumerate(cache.iter_shard(path), 1):
                yield spec["offsets"][s] + n - 1, sample
        except CacheError:
            raise
        except Exception as err:  # noqa: BLE001 - any undecodable member means a corrupt shard
            raise CacheError(f"{path}: corrupt sample ({type(err).__name__}: {err}); run `cellembed verify "
                             f"{cache.path}`, then rerun the same extract command to rebuild it") from None
        if n != spec["counts"][s]:
            raise CacheError(f"{path}: {n} samples, the manifest lists {spec['counts'][s]}; run `cellembed verify "
                             f"{cache.path}`, then rerun the same extract command to rebuild it")


def prepare_sample(index: int, sample, v: int, spec: dict) -> dict:
    """Select levels, apply dihedral variant ``v`` to levels, image and maps, compute targets after."""
    feats = [sample.feats[j] for j in spec["level_idx"]]
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


def data_loader(spec: dict, num_workers: int) -> torch.utils.data.DataLoader:
    if num_workers and spec["targets"]:
        sample_targets(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.uint8), spec["head"], spec["magnification"])
    return torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=num_workers,
                                       prefetch_factor=8 if num_workers else None)
