"""Manifest, cache key and per-shard records of a feature cache (DESIGN.md §5)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = ".parts"  # per-shard records written as each shard completes; the manifest is built from them
SHARD_RE = re.compile(r"^shard-(\d{2})-(\d{6})\.tar$")


class CacheError(RuntimeError):
    """A cache is missing, corrupt, or does not match what was asked for. The message names the path and the fix."""


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:02d}-{index:06d}.tar"


def shard_index(name: str) -> int:
    match = SHARD_RE.match(name)
    if match is None:
        raise ValueError(f"not a shard name: {name!r}")
    return int(match.group(2))


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def cache_key(identity: dict) -> str:
    """Hash of everything that changes the bytes of a cache (encoder, weights, blocks, input, dtype, data, split, tiles)."""
    return hashlib.sha256(canonical_json(identity)).hexdigest()[:24]


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON under a temporary name, fsync, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: {what} not found; is this a cellembed cache directory? (run `cellembed extract`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: {what} is not valid JSON ({err}); rerun `cellembed extract` to rebuild it") from None


def read_manifest(cache_dir: str | Path) -> dict:
    """Load ``manifest.json`` of a cache (a directory, or a remote location: ``cellembed.cache._location``),
    checking its format version."""
    from cellembed.cache._location import is_remote, local_path, member_url, read_member

    if is_remote(cache_dir):
        url = member_url(str(cache_dir), MANIFEST)
        try:
            manifest = json.loads(read_member(str(cache_dir), MANIFEST))
        except OSError as err:
            raise CacheError(f"{url}: cannot read the cache's manifest ({err}); check the location (a directory URL, "
                             "or a pipe: command with {} where the file name goes)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheError(f"{url}: manifest.json is not valid JSON ({err})") from None
        return _check_version(manifest, url)
    cache_dir = local_path(cache_dir)
    if not (Path(cache_dir) / MANIFEST).is_file() and (Path(cache_dir) / PARTS).is_dir():
        raise CacheError(f"{cache_dir}: incomplete cache (extraction interrupted, or other ranks still writing); "
                         "rerun the same `cellembed extract` command to finish it")
    return _check_version(read_json(Path(cache_dir) / MANIFEST, "manifest.json"), Path(cache_dir) / MANIFEST)


def _check_version(manifest: dict, where) -> dict:
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"{where}: format version {version}, this cellembed reads {FORMAT_VERSION}; re-extract the "
                         "cache with this version")
    return manifest


def sidecar_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / PARTS / f"{name}.json"


def merge_stats(records: list[dict]) -> dict[str, dict]:
    """Pool shard statistics into per-level channel mean and std (population std)."""
    pooled: dict[str, list] = {}
    for rec in records:
        for name, st in rec["stats"].items():
            acc = pooled.setdefault(name, [0, np.zeros(len(st["sum"])), np.zeros(len(st["sum"]))])
            acc[0] += st["count"]
            acc[1] += np.asarray(st["sum"])
            acc[2] += np.asarray(st["sumsq"])
    out = {}
    for name, (count, s, ss) in pooled.items():
        mean = s / max(count, 1)
        var = np.maximum(ss / max(count, 1) - mean**2, 0.0)
        out[name] = {"mean": [round(float(x), 6) for x in mean], "std": [round(float(x), 6) for x in np.sqrt(var)]}
    return out


def build_manifest(header: dict, records: list[dict]) -> dict:
    """The manifest: the extraction header plus shard list, counts and per-level channel statistics."""
    records = sorted(records, key=lambda r: r["index"])
    stats = merge_stats(records)
    levels = [dict(level, **stats.get(level["name"], {})) for level in header["levels"]]
    shards = [{k: r[k] for k in ("name", "index", "n_samples", "bytes", "sha256", "first_key", "last_key")}
              for r in records]
    return dict(header, levels=levels, shards=shards, n_samples=sum(r["n_samples"] for r in records),
                n_bytes=sum(r["bytes"] for r in records))
