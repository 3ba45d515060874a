"""Reading a feature cache: manifest access and sample iteration."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

from cellembed.cache._codec import Sample, decode_sample
from cellembed.cache._manifest import CacheError, read_manifest


class Cache:
    """A feature cache on disk.

    Args:
        path: the cache directory (holding ``manifest.json`` and ``shard-*.tar``).

    Attributes:
        manifest: the parsed manifest.
        level_names: the cached levels, e.g. ``["block_2", "block_5"]``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.level_names = [lv["name"] for lv in self.manifest["levels"]]

    @property
    def cache_key(self) -> str:
        return self.manifest["cache_key"]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["name"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return self.manifest["n_samples"]

    def __iter__(self) -> Iterator[Sample]:
        for path in self.shard_paths:
            yield from self.iter_shard(path)

    def iter_shard(self, path: Path) -> Iterator[Sample]:
        """Decode the samples of one shard in order."""
        if not path.is_file():
            raise CacheError(f"{path}: shard missing; run `cellembed verify {self.path}` and re-extract")
        try:
            with tarfile.open(path, "r") as tar:
                yield from _group_samples(tar, self.level_names, path)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise CacheError(f"{path}: unreadable shard ({err}); run `cellembed verify {self.path}`, then rerun "
                             "the same extract command to rebuild it") from None


def _group_samples(tar: tarfile.TarFile, level_names: list[str], path: Path) -> Iterator[Sample]:
    current, parts = None, {}
    for member in tar:
        base, _, suffix = member.name.partition(".")
        if base != current and parts:
            yield decode_sample(parts, level_names, str(path))
            parts = {}
        current = base
        parts[suffix] = tar.extractfile(member).read()
    if parts:
        yield decode_sample(parts, level_names, str(path))


def open_cache(path: str | Path) -> Cache:
    """Open a cache directory written by :func:`cellembed.extract`."""
    return Cache(path)
