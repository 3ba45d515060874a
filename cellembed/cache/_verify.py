"""Re-hash every shard of a cache against its manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, NamedTuple

from cellembed.cache._manifest import SHARD_RE, read_manifest
from cellembed.cache._pca import PCA_FILE


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


class ShardProblem(NamedTuple):
    """One shard that failed verification. ``problem`` is ``missing``, ``truncated``, ``corrupt`` or ``unlisted``."""

    shard: str
    problem: str
    detail: str


class VerifyReport(NamedTuple):
    """Result of :func:`verify_cache`: ``ok`` is True when every listed shard is present and intact."""

    cache_dir: Path
    n_shards: int
    n_samples: int
    n_bytes: int
    problems: list[ShardProblem]

    @property
    def ok(self) -> bool:
        return not any(p.problem != "unlisted" for p in self.problems)


def verify_cache(cache_dir: str | Path, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check that every shard in the manifest exists with its recorded size and sha256.

    Args:
        cache_dir: the cache directory, or a remote location (each shard is then streamed and hashed).
        progress: optional callback ``(bytes checked, bytes total)``.
    """
    from cellembed.cache._location import is_remote, local_path

    if is_remote(cache_dir):
        return _verify_remote(str(cache_dir), progress)
    cache_dir = local_path(cache_dir)
    manifest = read_manifest(cache_dir)
    problems, done, total = [], 0, manifest["n_bytes"]
    for shard in manifest["shards"]:
        path = cache_dir / shard["name"]
        problem = check_shard(path, shard)
        if problem is not None:
            problems.append(problem)
        done += shard["bytes"]
        if progress:
            progress(done, total)
    problems += _basis_problems(manifest, lambda: (cache_dir / PCA_FILE).read_bytes())
    listed = {s["name"] for s in manifest["shards"]}
    for path in sorted(cache_dir.glob("shard-*.tar")):
        if SHARD_RE.match(path.name) and path.name not in listed:
            problems.append(ShardProblem(path.name, "unlisted", "not in manifest.json (left over; safe to delete)"))
    return VerifyReport(cache_dir, len(manifest["shards"]), manifest["n_samples"], manifest["n_bytes"], problems)


def _verify_remote(location: str, progress) -> VerifyReport:
    """``verify_cache`` of a remote cache: every listed shard streamed once, its bytes counted and hashed."""
    from cellembed.cache._location import close_stream, member_url, open_url

    manifest = read_manifest(location)
    problems, done, total = [], 0, manifest["n_bytes"]
    for shard in manifest["shards"]:
        url, sha, size = member_url(location, shard["name"]), hashlib.sha256(), 0
        try:
            stream = open_url(url)
            try:
                while chunk := stream.read(1 << 20):
                    sha.update(chunk)
                    size += len(chunk)
            finally:
                close_stream(stream, url)
        except OSError as err:
            problems.append(ShardProblem(shard["name"], "missing", f"cannot read it ({err})"))
        else:
            problem = _judge(shard, size, sha.hexdigest)
            if problem is not None:
                problems.append(problem)
        done += shard["bytes"]
        if progress:
            progress(done, total)
    from cellembed.cache._location import read_member

    problems += _basis_problems(manifest, lambda: read_member(location, PCA_FILE))
    return VerifyReport(location, len(manifest["shards"]), manifest["n_samples"], manifest["n_bytes"], problems)


def _basis_problems(manifest: dict, read: Callable[[], bytes]) -> list[ShardProblem]:
    """A PCA cache's basis file (``read()`` → its bytes) against the sha256 in the manifest's identity."""
    pca = manifest["identity"].get("pca")
    if pca is None:
        return []
    try:
        data = read()
    except OSError as err:
        return [ShardProblem(PCA_FILE, "missing", f"the PCA basis cannot be read ({err})")]
    if hashlib.sha256(data).hexdigest() != pca["sha256"]:
        return [ShardProblem(PCA_FILE, "corrupt", "sha256 differs from the manifest's; restore the original file "
                             "(a repair cannot refit it: re-extract with --overwrite)")]
    return []


def check_shard(path: Path, shard: dict) -> ShardProblem | None:
    """Compare one shard file with its manifest entry (``name``, ``bytes``, ``sha256``); None when it matches."""
    if not path.is_file():
        return ShardProblem(shard["name"], "missing", "file not found")
    return _judge(shard, path.stat().st_size, lambda: file_sha256(path))


def _judge(shard: dict, size: int, digest: Callable[[], str]) -> ShardProblem | None:
    """A shard of ``size`` bytes against its manifest entry; ``digest()`` (its sha256) only when the size matches."""
    if size < shard["bytes"]:
        return ShardProblem(shard["name"], "truncated", f"{size} of {shard['bytes']} bytes")
    if size != shard["bytes"] or digest() != shard["sha256"]:
        return ShardProblem(shard["name"], "corrupt", "sha256 differs from the manifest")
    return None
