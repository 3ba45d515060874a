"""Where a cache's files are: refusing foreign directories, finding finished shards, clearing stale ones."""

from __future__ import annotations

import shutil
from pathlib import Path

from cellembed.cache._manifest import MANIFEST, PARTS, CacheError, read_json, sidecar_path, write_json_atomic
from cellembed.cache._pca import PCA_FILE
from cellembed.cache._verify import check_shard, file_sha256
from cellembed.cache._writer import record_from_shard

HEADER = "header.json"  # inside .parts: the identity of a cache being written, before its manifest exists


def describe_difference(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Flatten two identity dicts and list what differs, e.g. ``["encoder.name: test_vit → test_convnext"]``."""
    diffs = []
    for k in sorted(set(old) | set(new), key=lambda k: (isinstance(old.get(k), dict), k)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_difference(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {_short(a)} → {_short(b)}")
    return diffs


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def existing_header(out: Path) -> tuple[dict, Path] | None:
    """The manifest of ``out``, else the header of its unfinished extraction, with its path; None when neither."""
    for path in (out / MANIFEST, out / PARTS / HEADER):
        if path.is_file():
            return read_json(path, path.name), path
    return None


def check_out(out: Path, header: dict, overwrite: bool) -> bool:
    """Refuse a directory holding another cache (unless overwrite) or other files. Returns True when ``out`` holds
    another cache that must be cleared (overwrite)."""
    found = existing_header(out)
    existing = found[0] if found else None
    if existing is not None and existing.get("cache_key") != header["cache_key"]:
        if not overwrite:
            diff = "; ".join(describe_difference(existing.get("identity", {}), header["identity"])[:4])
            raise CacheError(f"{out} holds a different cache ({diff}); pass --overwrite to replace it "
                             "or choose another --out")
        return True
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out} is a file, not a cache directory; choose another --out")
    if existing is None and out.exists() and any(out.iterdir()) and not (out / PARTS).exists():
        raise CacheError(f"{out} exists, is not empty and is not a cellembed cache; choose another --out "
                         "(--overwrite only replaces caches, never other files)")
    return False


def prepare_out(out: Path, header: dict, overwrite: bool, rank: int) -> None:
    """Refuse a directory holding another cache (unless overwrite, which clears it: :func:`check_out`); remove a
    manifest temp file that a killed run left (rank 0); record this cache's header."""
    if check_out(out, header, overwrite):
        clear_cache(out, rank)
    if rank == 0:  # only rank 0 writes the manifest: a temp file of it is a killed run's leftover
        for path in out.glob(f".{MANIFEST}.*.tmp"):
            path.unlink(missing_ok=True)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PARTS / HEADER, header)


def clear_cache(out: Path, rank: int) -> None:
    """Remove the previous cache's files (rank 0 removes the manifest; every rank may remove shards)."""
    if rank == 0:
        (out / MANIFEST).unlink(missing_ok=True)
        (out / PCA_FILE).unlink(missing_ok=True)
    for path in list(out.glob("shard-*.tar")) + list(out.glob(".shard-*.tmp")):
        path.unlink(missing_ok=True)
    if (out / PARTS).exists():
        for path in (out / PARTS).glob("shard-*.json"):
            path.unlink(missing_ok=True)
    if rank == 0 and not any(out.glob("shard-*")) and (out / PARTS).exists():
        shutil.rmtree(out / PARTS, ignore_errors=True)


def has_cache(out: Path) -> bool:
    """True when ``out`` holds a manifest, or the header of an unfinished extraction."""
    return (out / MANIFEST).is_file() or (out / PARTS / HEADER).is_file()


def existing_shard(out: Path, index: int) -> Path | None:
    found = sorted(out.glob(f"shard-??-{index:06d}.tar"))
    return found[0] if found else None


def shard_done(out: Path, index: int, key: str) -> bool:
    """A shard counts as done when its file and record exist, the record carries our key, and the hash matches."""
    path = existing_shard(out, index)
    if path is None:
        return False
    record_path = sidecar_path(out, path.name)
    try:
        record = read_json(record_path, "shard record")
    except CacheError:
        return False
    return record.get("cache_key") == key and record.get("bytes") == path.stat().st_size \
        and record.get("sha256") == file_sha256(path)


def remove_stale(out: Path, todo) -> None:
    """Delete leftovers of shards about to be rewritten (unverified files, their records, temp files)."""
    for index, _, _ in todo:
        for path in list(out.glob(f"shard-??-{index:06d}.tar")) + list(out.glob(f".shard-??-{index:06d}.tar.tmp")):
            sidecar_path(out, path.name.lstrip(".").removesuffix(".tmp")).unlink(missing_ok=True)
            path.unlink(missing_ok=True)


def plan_repair(out: Path, key: str, mine: list[tuple[int, int, int]], level_names: list[str],
                bases: dict | None = None) -> tuple[list[tuple[int, int, int]], dict[int, str]]:
    """Which of ``mine`` (``[(shard index, start, stop)]``) a repair must re-extract, and every shard's file name.

    With a finished manifest, a shard is bad when it is missing, truncated or its sha256 differs from the
    manifest's entry; names come from the manifest, so shards written by other ranks keep theirs. A good shard
    whose record in ``.parts`` is gone or disagrees gets the record rebuilt from its bytes (no re-encoding).
    Without a manifest (an unfinished extraction), this is a plain resume: shards that verify against their
    records are kept.
    """
    if not (out / MANIFEST).is_file():
        return [s for s in mine if not shard_done(out, s[0], key)], {}
    listed = {s["index"]: s for s in read_json(out / MANIFEST, MANIFEST).get("shards", [])}
    todo = []
    for shard in mine:
        entry = listed.get(shard[0])
        if entry is None or check_shard(out / entry["name"], entry) is not None:
            todo.append(shard)
        elif not _record_agrees(out, entry, key):
            write_json_atomic(sidecar_path(out, entry["name"]),
                              record_from_shard(out / entry["name"], shard[0], key, level_names, bases))
    return todo, {i: s["name"] for i, s in listed.items()}


def _record_agrees(out: Path, entry: dict, key: str) -> bool:
    try:
        record = read_json(sidecar_path(out, entry["name"]), "shard record")
    except CacheError:
        return False
    same = all(record.get(k) == entry[k] for k in ("name", "index", "bytes", "sha256"))
    return same and record.get("cache_key") == key
