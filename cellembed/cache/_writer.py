"""Atomic shard writing, in a background thread so the encoder never waits on the disk.

The thread does no torch compute (numpy, zlib, hashlib and file I/O only): a torch op here would start its own
OpenMP team and fight the encoder's threads for the cores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import tarfile
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from safetensors.torch import load as st_load

from cellembed.cache._codec import (FEATS, GT, IMAGE, META, add_member, encode_feats, encode_gt, encode_image,
                                    encode_meta, level_values, sample_key)
from cellembed.cache._manifest import CacheError, sidecar_path, write_json_atomic
from cellembed.cache._verify import file_sha256


class EncodedTile(NamedTuple):
    """What the writer needs for one tile (image and GT already encoded, by DataLoader workers or the writer)."""

    key: str
    index: int              # position in the cache's tile list
    feats: dict[str, torch.Tensor]  # "block_i" → (C, h, w), "prefix_i" → (P, C); CPU, storage dtype
    gt: bytes               # gt.safetensors
    png: bytes              # image.png
    meta: dict


class NonFiniteFeatures(ValueError):
    """A tile's features hold inf or NaN (``nan`` False: only infinities, e.g. beyond the fp16 range)."""

    def __init__(self, level: str, nan: bool):
        super().__init__(f"non-finite features at {level}")
        self.level, self.nan = level, nan


class ChannelStats:
    """Per-channel sum and sum of squares (float64) of feature maps, accumulated tile by tile in arrival order.

    Also the finiteness check: the float64 sum of squares of finite fp16 / bf16 / fp32 values is finite, and
    any inf or NaN makes it inf or NaN, so a tile is refused (:class:`NonFiniteFeatures`) at no extra cost.

    Args:
        level_names: the levels to accumulate (prefix tokens are not).
        bases: {level: :class:`~cellembed.cache._pca.Basis`} of ``pca<K>`` levels, whose statistics are those of the
            reconstructed (C, h, w) values (computed in float64 with numpy).
    """

    def __init__(self, level_names: list[str], bases: dict | None = None):
        self._bases = {n: (b.mean.double().numpy()[:, None], b.components.double().numpy().T)
                       for n, b in (bases or {}).items()}
        self._sum: dict[str, np.ndarray | None] = {n: None for n in level_names}
        self._sumsq: dict[str, np.ndarray | None] = {n: None for n in level_names}
        self._count = {n: 0 for n in level_names}

    def add(self, feats: dict[str, torch.Tensor]) -> None:
        """feats: name → (C, h, w) CPU tensor of one tile in its storage dtype. Nothing is added on error."""
        tile = {}
        for name in self._sum:
            if name in self._bases:  # (C, 1) mean + (C, K) componentsᵀ @ (K, n) coefficients
                mean, comps_t = self._bases[name]
                f = comps_t @ _float64(feats[name]) + mean
            else:
                f = _float64(level_values(feats, name))
            tile[name] = f.sum(1), np.einsum("ij,ij->i", f, f), f.shape[1]
            if not np.isfinite(tile[name][1]).all():
                raise NonFiniteFeatures(name, bool(np.isnan(tile[name][1]).any()))
        for name, (s, ss, n) in tile.items():
            self._sum[name] = s if self._sum[name] is None else self._sum[name] + s
            self._sumsq[name] = ss if self._sumsq[name] is None else self._sumsq[name] + ss
            self._count[name] += n

    def record(self) -> dict[str, dict]:
        return {n: {"count": self._count[n], "sum": self._sum[n].tolist(), "sumsq": self._sumsq[n].tolist()}
                for n in self._sum if self._sum[n] is not None}


def _float64(t: torch.Tensor) -> np.ndarray:
    """(C, ...) fp16 / bf16 / fp32 CPU tensor → (C, n) float64 array, exactly (numpy has no bfloat16)."""
    if t.dtype == torch.bfloat16:
        bits = t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(t.shape[0], -1).astype(np.float64)
    return t.numpy().reshape(t.shape[0], -1).astype(np.float64)


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Writes one shard under a temporary name; :meth:`close` fsyncs, renames and records it.

    Args:
        cache_dir: the cache directory.
        name: final shard file name, e.g. ``shard-00-000003.tar``.
        index: the shard's position in the cache.
        cache_key: written into the shard's record so that a rerun can tell its own shards.
        level_names: names of the feature levels whose channel statistics are accumulated.
        bases: the PCA bases of ``pca<K>`` levels (see :class:`ChannelStats`).
    """

    def __init__(self, cache_dir: Path, name: str, index: int, cache_key: str, level_names: list[str],
                 bases: dict | None = None):
        self.cache_dir, self.name, self.index, self.cache_key = Path(cache_dir), name, index, cache_key
        self.path = self.cache_dir / name
        self.tmp = self.cache_dir / f".{name}.tmp"
        self._file = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []
        self._stats = ChannelStats(level_names, bases)

    def add(self, tile: EncodedTile) -> None:
        try:
            self._stats.add(tile.feats)
        except NonFiniteFeatures as err:
            fp16 = not err.nan and tile.feats[err.level].dtype == torch.float16
            hint = " (values exceed the fp16 range: use --dtype bf16)" if fp16 else ""
            raise CacheError(f"non-finite features at {err.level} for tiles {[tile.key]}{hint}; nothing was "
                             "written for them") from None
        base = sample_key(tile.key)
        add_member(self._tar, f"{base}.{FEATS}", encode_feats(tile.feats))
        add_member(self._tar, f"{base}.{GT}", tile.gt)
        add_member(self._tar, f"{base}.{IMAGE}", tile.png)
        add_member(self._tar, f"{base}.{META}", encode_meta(tile.key, tile.index, tile.meta))
        self.keys.append(tile.key)

    def close(self) -> dict:
        """Finish the shard: fsync, rename into place, write its record. Returns the record."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        record = shard_record(self.name, self.index, self.cache_key, self.keys, self._hashing.size,
                              self._hashing.sha.hexdigest(), self._stats)
        # The record goes first: a shard file that exists always has its record, so a rerun can verify it.
        write_json_atomic(sidecar_path(self.cache_dir, self.name), record)
        os.replace(self.tmp, self.path)
        return record

    def abort(self) -> None:
        """Drop an unfinished shard (its temporary file is removed; finished shards are untouched)."""
        try:
            self._tar.close()
            self._file.close()
        except Exception:  # noqa: BLE001 - best effort on an already failing path
            pass
        self.tmp.unlink(missing_ok=True)


def shard_record(name: str, index: int, cache_key: str, keys: list[str], n_bytes: int, sha256: str,
                 stats: ChannelStats) -> dict:
    """The record of one finished shard, kept in ``.parts`` until the manifest is built from all of them."""
    return {"name": name, "index": index, "cache_key": cache_key, "n_samples": len(keys), "bytes": n_bytes,
            "sha256": sha256, "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None,
            "keys": keys, "stats": stats.record()}


def record_from_shard(path: Path, index: int, cache_key: str, level_names: list[str],
                      bases: dict | None = None) -> dict:
    """Rebuild a finished shard's record from its bytes (what :meth:`ShardWriter.close` wrote), without the encoder.

    Raises:
        CacheError: the shard is not a readable cellembed tar.
    """
    keys, stats = [], ChannelStats(level_names, bases)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.name.endswith("." + FEATS):
                    stats.add(st_load(tar.extractfile(member).read()))
                elif member.name.endswith("." + META):
                    keys.append(json.loads(tar.extractfile(member).read())["key"])
    except (tarfile.TarError, OSError, ValueError, KeyError) as err:
        raise CacheError(f"{path}: cannot read shard ({err}); rerun extract to rebuild it") from None
    return shard_record(path.name, index, cache_key, keys, path.stat().st_size, file_sha256(path), stats)


class PendingBatch(NamedTuple):
    """One encoded batch on its way to the writer thread (tensors are on the host, or being copied there)."""

    key: list[str]
    index: list[int]                  # positions in the cache's tile list
    feats: dict[str, torch.Tensor]    # "block_i" → (N, C, h, w), "prefix_i" → (N, P, C); storage dtype
    ready: torch.cuda.Event | None    # recorded after the device → host copies
    png: list                         # PNG bytes, or (H, W, 3) uint8 images to encode
    gt: list                          # gt.safetensors bytes, or (inst_map, type_map) to encode
    meta: list[dict]


def unpack_batch(pending: PendingBatch) -> list[EncodedTile]:
    """Writer thread: wait for the batch's copy to land, encode PNG / GT where not done yet, split into tiles."""
    if pending.ready is not None:
        pending.ready.synchronize()
    tiles = []
    for j, key in enumerate(pending.key):
        png, gt = pending.png[j], pending.gt[j]
        if not isinstance(png, bytes):  # no DataLoader workers: encode here, off the encoder's thread
            png, gt = encode_image(png), encode_gt(*gt)
        tiles.append(EncodedTile(key, pending.index[j], {n: t[j] for n, t in pending.feats.items()}, gt, png,
                                 pending.meta[j]))
    return tiles


class BackgroundWriter:
    """Consumes encoded tiles from a bounded queue and writes them shard by shard in a thread.

    Args:
        cache_dir: the cache directory.
        plan: ``[(shard_name, shard_index, n_tiles), ...]`` in the order tiles will arrive.
        cache_key: the cache's key.
        level_names: feature level names.
        bases: the PCA bases of ``pca<K>`` levels (see :class:`ChannelStats`).
        max_pending: queue bound, in batches; keeps memory bounded.
        prepare: run in the writer thread on each item given to :meth:`put`, turning it into the batch's tiles
            (waiting for device copies, encoding PNG / GT); items are lists of tiles already when None.
    """

    def __init__(self, cache_dir: Path, plan: list[tuple[str, int, int]], cache_key: str, level_names: list[str],
                 bases: dict | None = None, max_pending: int = 4,
                 prepare: Callable[[Any], list[EncodedTile]] | None = None):
        self.cache_dir, self.plan, self.cache_key, self.level_names = Path(cache_dir), plan, cache_key, level_names
        self.bases = bases
        self.prepare = prepare
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.records: list[dict] = []
        self.bytes_written = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cellembed-shard-writer", daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        """Queue one batch (a list of tiles, or what ``prepare`` takes); re-raises a writer error at once."""
        while True:
            self.raise_if_failed()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> list[dict]:
        """Wait for every queued tile to be written; re-raise any writer error."""
        self.put(None)
        self._thread.join()
        self.raise_if_failed()
        return self.records

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        writer, shards = None, iter(self.plan)
        remaining = 0
        try:
            while (item := self.queue.get()) is not None:
                for tile in item if self.prepare is None else self.prepare(item):
                    if remaining == 0:
                        name, index, remaining = next(shards)
                        writer = ShardWriter(self.cache_dir, name, index, self.cache_key, self.level_names,
                                             self.bases)
                    writer.add(tile)
                    remaining -= 1
                    if remaining == 0:
                        self.records.append(writer.close())
                        self.bytes_written += self.records[-1]["bytes"]
                        writer = None
            if writer is not None:  # stopped early (error or Ctrl-C upstream): drop the unfinished shard
                writer.abort()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            if writer is not None:
                writer.abort()
            self.error = _disk_error(err, self.cache_dir)  # the producer sees it on its next put


def _disk_error(err: BaseException, cache_dir: Path) -> BaseException:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheError(f"{cache_dir}: disk full while writing shards; free space and rerun the same command "
                          "to resume (finished shards are kept)")
    return err
