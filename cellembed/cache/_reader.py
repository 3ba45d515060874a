"""Reading a feature cache: manifest access and sample iteration."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import IO, Iterator

from cellembed.cache._codec import Sample, decode_sample
from cellembed.cache._location import close_stream, is_remote, local_path, member_url, open_url, read_member
from cellembed.cache._manifest import MANIFEST, CacheError, read_manifest
from cellembed.cache._pca import PCA_FILE, Basis, check_basis, load_bases


class Cache:
    """A feature cache on disk.

    Args:
        path: the cache directory (holding ``manifest.json`` and ``shard-*.tar``), or a remote location
            (``pipe:cat /data/cache/{}``, ``s3://bucket/cache``; see ``cellembed.cache._location``).

    Attributes:
        manifest: the parsed manifest.
        level_names: the cached levels, e.g. ``["block_2", "block_5"]``.
        bases: {level: :class:`~cellembed.cache._pca.Basis`} of its ``pca<K>`` levels, read once here (from the
            same location as the manifest, checked against the manifest's sha256); empty for other caches.
    """

    def __init__(self, path: str | Path):
        self.remote = is_remote(path)
        self.path = str(path) if self.remote else local_path(path)
        self.manifest = read_manifest(self.path)
        self.level_names = [lv["name"] for lv in self.manifest["levels"]]
        self.bases = self._read_bases()

    def _read_bases(self) -> dict[str, Basis]:
        pca = self.manifest["identity"].get("pca")
        if pca is None:
            return {}
        where = member_url(self.path, MANIFEST) if self.remote else str(self.path / MANIFEST)
        path = member_url(self.path, PCA_FILE) if self.remote else self.path / PCA_FILE
        try:
            data = read_member(self.path, PCA_FILE) if self.remote else Path(path).read_bytes()
        except OSError as err:
            raise CacheError(f"{path}: cannot read this PCA cache's basis ({err}); copy {PCA_FILE} with the "
                             "cache's other files") from None
        return load_bases(check_basis(data, pca["sha256"], str(path), where))

    @property
    def cache_key(self) -> str:
        return self.manifest["cache_key"]

    @property
    def shard_paths(self) -> list:
        """Every shard's path (a URL string for a remote cache), in cache order."""
        if self.remote:
            return [member_url(self.path, s["name"]) for s in self.manifest["shards"]]
        return [self.path / s["name"] for s in self.manifest["shards"]]

    def shard_members(self, path, suffix: str) -> Iterator[tuple[str, bytes]]:
        """(member name, bytes) of one shard's members whose names end with ``suffix``, streamed in order (the
        others are skipped unread). Errors propagate (tarfile / OS errors) for the caller to name."""
        raw = self.open_shard(path)
        try:
            with tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(suffix):
                        yield member.name, tar.extractfile(member).read()
        finally:
            close_stream(raw, str(path))

    def open_shard(self, path) -> IO[bytes]:
        """A binary stream of one of ``shard_paths`` (close it with ``close_stream`` for remote caches)."""
        if self.remote:
            return open_url(path)
        if not Path(path).is_file():
            raise CacheError(f"{path}: shard missing; {self.repair_hint}")
        return open(path, "rb")

    def __len__(self) -> int:
        return self.manifest["n_samples"]

    def __iter__(self) -> Iterator[Sample]:
        for path in self.shard_paths:
            yield from self.iter_shard(path)

    def iter_shard(self, path: Path, check: bool = True, level_names: list[str] | None = None) -> Iterator[Sample]:
        """Decode the samples of one shard in order (only ``level_names``, default all cached levels: the others
        are skipped without being decoded).

        With ``check`` the shard's bytes are hashed as they stream by and compared with the manifest's sha256
        once the shard is read, so silent corruption (flipped bytes inside a tensor) fails the read with a
        ``CacheError`` after the shard's last sample instead of going unnoticed.
        """
        name = str(path).rsplit("/", 1)[-1] if not self.remote else self._names.get(path, "")
        expected = self._sha256.get(name) if check else None
        try:
            raw = self.open_shard(path)
            try:
                reader = _HashingReader(raw)
                with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                    yield from _group_samples(tar, self.level_names if level_names is None else level_names, path,
                                              self.repair_hint, self.bases)
                if expected is not None and reader.finish() != expected:
                    raise CacheError(f"{path}: corrupt shard (its sha256 differs from the manifest's); "
                                     f"{self.repair_hint}")
            finally:
                close_stream(raw, str(path))
        except (tarfile.TarError, EOFError, OSError) as err:
            raise CacheError(f"{path}: unreadable shard ({err}); {self.repair_hint}") from None

    @property
    def repair_hint(self) -> str:
        if self.remote:
            return ("the remote copy of this cache is damaged or unreachable; copy the cache again from a verified "
                    "source (`cellembed verify` on the local original)")
        return (f"run `cellembed verify {self.path}`, then rerun the extract command that made it with --repair "
                "to rebuild the bad shards")

    @property
    def _names(self) -> dict[str, str]:
        return {member_url(self.path, s["name"]): s["name"] for s in self.manifest["shards"]}

    @property
    def _sha256(self) -> dict[str, str]:
        return {s["name"]: s["sha256"] for s in self.manifest["shards"] if "sha256" in s}


class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, raw):
        self.raw, self.hash = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.hash.update(memoryview(buffer)[:n])
        return n

    def finish(self) -> str:
        """Hash the rest of the file (tar padding after the last member) and return the hex digest."""
        while chunk := self.raw.read(1 << 20):
            self.hash.update(chunk)
        return self.hash.hexdigest()


def _group_samples(tar: tarfile.TarFile, level_names: list[str], path: Path, hint: str, bases: dict) \
        -> Iterator[Sample]:
    current, parts = None, {}
    for member in tar:
        base, _, suffix = member.name.partition(".")
        if base != current and parts:
            yield _decode(parts, level_names, path, hint, bases)
            parts = {}
        current = base
        parts[suffix] = tar.extractfile(member).read()
    if parts:
        yield _decode(parts, level_names, path, hint, bases)


def _decode(parts: dict, level_names: list[str], path: Path, hint: str, bases: dict) -> Sample:
    try:
        return decode_sample(parts, level_names, str(path), bases)
    except CacheError:
        raise
    except Exception as err:  # noqa: BLE001 - any undecodable member (safetensors, JSON, PNG, keys) is corruption
        raise CacheError(f"{path}: corrupt sample ({type(err).__name__}: {err}); {hint}") from None


def open_cache(path: str | Path) -> Cache:
    """Open a cache directory written by :func:`cellembed.extract`."""
    return Cache(path)
