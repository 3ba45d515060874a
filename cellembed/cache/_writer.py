"""Atomic shard writing, in a background thread so the encoder never waits on the disk."""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import tarfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from cellembed.cache._codec import FEATS, GT, IMAGE, META, add_member, encode_feats, encode_meta, sample_key
from cellembed.cache._manifest import CacheError, sidecar_path, write_json_atomic


class EncodedTile(NamedTuple):
    """What the writer needs for one tile; image and GT are encoded by the DataLoader workers."""

    key: str
    index: int              # position in the cache's tile list
    feats: dict[str, torch.Tensor]  # "block_i" → (C, h, w), "prefix_i" → (P, C); CPU, storage dtype
    gt: bytes               # gt.safetensors
    png: bytes              # image.png
    meta: dict


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
    """

    def __init__(self, cache_dir: Path, name: str, index: int, cache_key: str, level_names: list[str]):
        self.cache_dir, self.name, self.index, self.cache_key = Path(cache_dir), name, index, cache_key
        self.path = self.cache_dir / name
        self.tmp = self.cache_dir / f".{name}.tmp"
        self._file = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []
        self._sum = {n: None for n in level_names}
        self._sumsq = {n: None for n in level_names}
        self._count = {n: 0 for n in level_names}

    def add(self, tile: EncodedTile) -> None:
        base = sample_key(tile.key)
        add_member(self._tar, f"{base}.{FEATS}", encode_feats(tile.feats))
        add_member(self._tar, f"{base}.{GT}", tile.gt)
        add_member(self._tar, f"{base}.{IMAGE}", tile.png)
        add_member(self._tar, f"{base}.{META}", encode_meta(tile.key, tile.index, tile.meta))
        self.keys.append(tile.key)
        for name in self._sum:
            f = tile.feats[name].double().flatten(1)
            s, ss = f.sum(1), (f * f).sum(1)
            self._sum[name] = s if self._sum[name] is None else self._sum[name] + s
            self._sumsq[name] = ss if self._sumsq[name] is None else self._sumsq[name] + ss
            self._count[name] += f.shape[1]

    def close(self) -> dict:
        """Finish the shard: fsync, rename into place, write its record. Returns the record."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        record = {
            "name": self.name, "index": self.index, "cache_key": self.cache_key,
            "n_samples": len(self.keys), "bytes": self._hashing.size, "sha256": self._hashing.sha.hexdigest(),
            "first_key": self.keys[0] if self.keys else None, "last_key": self.keys[-1] if self.keys else None,
            "keys": self.keys,
            "stats": {n: {"count": self._count[n], "sum": self._sum[n].tolist(), "sumsq": self._sumsq[n].tolist()}
                      for n in self._sum if self._sum[n] is not None},
        }
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


class BackgroundWriter:
    """Consumes encoded tiles from a bounded queue and writes them shard by shard in a thread.

    Args:
        cache_dir: the cache directory.
        plan: ``[(shard_name, shard_index, n_tiles), ...]`` in the order tiles will arrive.
        cache_key: the cache's key.
        level_names: feature level names.
        max_pending: queue bound, in batches; keeps memory bounded.
    """

    def __init__(self, cache_dir: Path, plan: list[tuple[str, int, int]], cache_key: str, level_names: list[str],
                 max_pending: int = 4):
        self.cache_dir, self.plan, self.cache_key, self.level_names = Path(cache_dir), plan, cache_key, level_names
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.records: list[dict] = []
        self.bytes_written = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cellembed-shard-writer", daemon=True)
        self._thread.start()

    def put(self, tiles: list[EncodedTile]) -> None:
        while True:
            self.raise_if_failed()
            try:
                self.queue.put(tiles, timeout=0.5)
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
            while (batch := self.queue.get()) is not None:
                for tile in batch:
                    if remaining == 0:
                        name, index, remaining = next(shards)
                        writer = ShardWriter(self.cache_dir, name, index, self.cache_key, self.level_names)
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
