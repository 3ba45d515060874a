"""Stage one: run a frozen encoder once over every tile and write the feature cache."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from cellembed.cache._codec import QUANT_LEVELS, encode_gt, encode_image, parse_codecs, pca_k, prefix_name, quantize
from cellembed.cache._layout import (check_out, existing_header, existing_shard, has_cache, plan_repair, prepare_out,
                                     remove_stale, shard_done)
from cellembed.cache._manifest import (FORMAT_VERSION, MANIFEST, CacheError, build_manifest, cache_key, read_json,
                                       shard_name, sidecar_path, write_json_atomic)
from cellembed.cache._pca import (PCA_FILE, Basis, explained_variance, fit_bases, load_bases, recorded_basis, sha256,
                                  write_basis)
from cellembed.cache._writer import BackgroundWriter, PendingBatch, unpack_batch

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

Progress = Callable[[int, int, int], None]  # (tiles done, tiles total, bytes written)


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``cellembed extract`` needs. See the CLI's ``--help`` for each option."""

    dataset: str
    out: str
    encoder: str
    root: str | None = None
    split: str = "all"
    folds: str | None = None
    scheme: str | None = None
    blocks: str = "default"
    weights: str = "hub"
    input_policy: str = "auto"
    dtype: str = "fp16"
    codec: str = "none"
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 2
    shard_size: int = 256
    overwrite: bool = False
    repair: bool = False
    rank: int | None = None
    world_size: int | None = None
    dataset_options: dict = field(default_factory=dict)
    augment_views: int = 0
    pca_tiles: int = 256
    pca_basis: str | None = None


class ExtractResult(NamedTuple):
    """What one process of an extraction did.

    Attributes:
        out: the cache directory.
        cache_key: the cache's key.
        n_tiles: tiles in the whole cache.
        n_written: tiles this process encoded now.
        n_skipped: tiles this process found already written and verified.
        seconds: wall time of this process, start-up included.
        encode_seconds: wall time of the encode-and-write loop alone (what tiles/s should be measured on).
        manifest: the manifest, or None while other ranks are still writing their shards.
        rewritten: names of the shards this process wrote now.
        changed: with ``repair``: rewritten shards whose sha256 differs from the old manifest's (another batch
            size, device or library version than the original run); the new manifest lists their new bytes.
    """

    out: Path
    cache_key: str
    n_tiles: int
    n_written: int
    n_skipped: int
    seconds: float
    encode_seconds: float
    manifest: dict | None
    rewritten: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()


def extract(config: ExtractConfig, progress: Progress | None = None) -> ExtractResult:
    """Encode every tile of a dataset split once with a frozen encoder and write a WebDataset feature cache.

    Resumable (finished shards that verify are kept), atomic per shard, and rank-aware: under ``torchrun``
    or with ``rank``/``world_size`` each process writes a disjoint set of shards, and the manifest is written
    once every shard exists. With ``repair``, a finished cache is checked against its manifest and only the
    shards that are missing, truncated or corrupt are re-extracted, under their old names (see
    :func:`~cellembed.cache._layout.plan_repair`).
    """
    from cellembed.data import open_dataset, resolve_split
    from cellembed.encoders import build_encoder

    t0 = time.perf_counter()
    rank, world = _rank_and_world(config)
    device = _pick_device(config.device)
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    if config.repair and config.overwrite:
        raise ValueError("--repair keeps an existing cache and --overwrite replaces it; pass one of them")
    if config.folds and config.split == "all":
        raise ValueError("--folds only selects tiles together with --split train|val|test (with --split all every "
                         "tile is extracted)")
    source = open_dataset(config.dataset, config.root, **config.dataset_options)
    selection = resolve_split(source, config.split, folds=config.folds, scheme=config.scheme)
    if not selection.indices:
        raise ValueError(f"split {config.split!r} of {config.dataset} is empty ({selection.scheme}); pick another split")
    tile_size = _tile_size(source, selection.indices[0])
    encoder = build_encoder(config.encoder, blocks=config.blocks, weights=config.weights,
                            input_policy=config.input_policy, tile_size=tile_size, device=device)
    indices, shard_size = selection.indices, config.shard_size
    header_source = source
    if config.augment_views:
        source, indices, shard_size = _with_views(source, selection, config)
    keys = [source.keys[i] for i in indices]
    codecs = parse_codecs(config.codec, [lv.name for lv in encoder.levels], config.dtype,
                          [lv.channels for lv in encoder.levels])
    header = _header(config, header_source, selection, encoder, keys, tile_size, device, shard_size, codecs)
    out = Path(config.out)
    if config.repair and not has_cache(out):
        raise CacheError(f"{out}: no cache to repair (no manifest.json); run extract without --repair")
    old = read_json(out / MANIFEST, MANIFEST) if config.repair and (out / MANIFEST).is_file() else None
    fit = lambda: _fit_feats(encoder, source, indices, tile_size, config, device)  # noqa: E731
    header, bases = _prepare(out, header, codecs, config, rank, fit)
    plan = _plan(len(keys), shard_size)
    mine = [s for s in plan if s[0] % world == rank]
    todo, names = _pending_shards(out, header, mine, config.repair, bases)
    n_skipped = sum(s[2] - s[1] for s in mine if s not in todo)
    plan_out = [(names.get(i, shard_name(rank, i)), i, stop - start) for i, start, stop in todo]
    t_loop = time.perf_counter()
    n_written = _run(encoder, source, indices, todo, plan_out, header, out, config, device, progress,
                     n_skipped, sum(s[2] - s[1] for s in mine), bases)
    t_done = time.perf_counter()
    manifest = _finalize(out, header, len(plan), rank, world, names)
    rewritten = tuple(name for name, _, _ in plan_out)
    changed = _changed_shards(old, manifest, rewritten)
    return ExtractResult(out, header["cache_key"], len(keys), n_written, n_skipped, time.perf_counter() - t0,
                         t_done - t_loop, manifest, rewritten, changed)


def _pending_shards(out: Path, header: dict, mine: list, repair: bool, bases: dict | None) \
        -> tuple[list, dict[int, str]]:
    """The shards of ``mine`` to (re-)extract, leftovers of them removed, and known shard names (repair)."""
    if repair:
        todo, names = plan_repair(out, header["cache_key"], mine, [lv["name"] for lv in header["levels"]], bases)
    else:
        todo, names = [s for s in mine if not shard_done(out, s[0], header["cache_key"])], {}
    remove_stale(out, todo)
    return todo, names


def _changed_shards(old: dict | None, new: dict | None, rewritten: tuple[str, ...]) -> tuple[str, ...]:
    """Rewritten shards whose bytes differ from the old manifest's entry (a repair under other settings)."""
    if old is None or new is None:
        return ()
    before = {s["name"]: s["sha256"] for s in old.get("shards", [])}
    after = {s["name"]: s["sha256"] for s in new["shards"]}
    changed = tuple(n for n in rewritten if n in before and before[n] != after.get(n))
    if changed:
        log.warning("repaired shards %s differ from the old manifest (features depend on batch size, device and "
                    "library versions); the manifest now lists their new bytes", ", ".join(changed))
    return changed


def _rank_and_world(config: ExtractConfig) -> tuple[int, int]:
    rank = config.rank if config.rank is not None else int(os.environ.get("RANK", 0))
    world = config.world_size if config.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    if world > 1 and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world


def _pick_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} was asked for but torch sees no GPU; use --device cpu or auto")
        return torch.device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no GPU; use --device cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def _with_views(source, selection, config: ExtractConfig) -> tuple:
    """``--augment-views K``: every tile of the split followed by K augmented copies (``AugmentedViews``), and the
    shard size rounded up to a multiple of K + 1 so that a tile's views always share a shard (the loader serves
    one view per tile per epoch and needs every shard's tile count fixed)."""
    from cellembed.data._augment import AugmentedViews

    k = int(config.augment_views)
    if k < 0:
        raise ValueError(f"--augment-views must be 0 or more, got {k}")
    if selection.split in ("val", "test"):
        raise ValueError(f"--augment-views {k} with --split {selection.split}: augmented copies are for training "
                         "caches; extract validation and test splits without them")
    views = AugmentedViews(source, selection.indices, k + 1)
    return views, list(range(len(views))), -(-config.shard_size // (k + 1)) * (k + 1)


def _tile_size(source, index: int) -> int:
    h, w = source[index].image.shape[:2]
    if h != w:
        raise ValueError(f"tile {source.keys[index]!r} is {h}x{w}; the cache needs square tiles of one size")
    return h


def _compute_mode(device: torch.device, dtype: str) -> str:
    """GPU runs bf16 autocast unless fp32 storage is asked for; CPU always computes in fp32."""
    return "bf16-autocast" if device.type == "cuda" and dtype != "fp32" else "fp32"


def _header(config, source, selection, encoder, keys, tile_size, device, shard_size: int, codecs: dict) -> dict:
    import timm

    import cellembed

    identity = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.describe(),
        "dtype": config.dtype,
        "compute": _compute_mode(device, config.dtype),
        "dataset": source.describe(),
        "split": {"split": selection.split, "scheme": selection.scheme, "detail": selection.detail},
        "tiles": {"n": len(keys), "sha256": _keys_hash(keys), "size": tile_size},
        "shard_size": shard_size,
    }
    if any(c != config.dtype for c in codecs.values()):  # absent for plain caches: their keys stay as they were
        identity["codec"] = codecs
    if config.pca_basis and not any(pca_k(c) for c in codecs.values()):
        raise ValueError(f"--pca-basis {config.pca_basis}: this extraction stores no pcaK level; add --codec pcaK "
                         "(the codec of the cache the basis comes from) or drop --pca-basis")
    if any(pca_k(c) for c in codecs.values()):  # the basis file and its sha256 are added once it exists
        if config.pca_tiles < 1:
            raise ValueError(f"--pca-tiles must be at least 1, got {config.pca_tiles}")
        # a given basis (--pca-basis) is named by its sha256 alone, added with the file: wherever it was read from
        identity["pca"] = ({"given": True} if config.pca_basis
                           else {"fit_tiles": min(int(config.pca_tiles), len(keys))})
    if config.augment_views:
        identity["augment_views"] = {"copies": int(config.augment_views), "views": int(config.augment_views) + 1,
                                     "augment": "cisca-full", "seed": 0}
    levels = [{"name": lv.name, "block": lv.block, "channels": lv.channels, "grid": list(lv.grid),
               "stride": lv.stride} for lv in encoder.levels]
    return {
        "format_version": FORMAT_VERSION,
        "cache_key": cache_key(identity),
        "identity": identity,
        "versions": {"cellembed": cellembed.__version__, "timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
        "levels": levels,
        "num_prefix_tokens": encoder.num_prefix_tokens,
        "class_names": list(source.class_names),
        "tile_size": tile_size,
        "n_tiles": len(keys),
    }


def _prepare(out: Path, header: dict, codecs: dict, config: ExtractConfig, rank: int, fit) -> tuple[dict, dict | None]:
    """:func:`prepare_out`, and for caches with ``pca<K>`` levels first the basis: the recorded one when ``out``
    holds this extraction already (checked against its sha256), else fitted now (``fit()``: batches of features)
    and written after the header. Under torch.distributed rank 0 fits and writes it and the other ranks read it
    after a barrier; ranks started by hand (``--rank``) each fit the same deterministic basis unless one has
    recorded it already (a rank whose fit differed, e.g. on other hardware, is refused by :func:`prepare_out`).
    Returns the header (with the basis's sha256 in its identity and key) and the bases (None without PCA
    levels)."""
    ks = {n: pca_k(c) for n, c in codecs.items() if pca_k(c)}
    if not ks:
        prepare_out(out, header, config.overwrite, rank)
        return header, None
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist and rank != 0:
        torch.distributed.barrier()  # rank 0 has written its header and the basis
    fitted = (lambda: given_basis(config.pca_basis, ks, header["levels"])) if config.pca_basis \
        else (lambda: fit_bases(fit(), ks))
    data = _basis_bytes(out, header, config.overwrite, rank == 0 or not dist, fitted)
    header = _with_basis(header, data)
    prepare_out(out, header, config.overwrite, rank)
    if rank == 0 or not dist:
        write_basis(out, data)
    if dist and rank == 0:
        torch.distributed.barrier()
    return header, load_bases(data)


def given_basis(path: str, ks: dict[str, int], levels: list[dict]) -> bytes:
    """``--pca-basis``: the basis file of another cache (its folder or its ``pca.safetensors``), typically the
    training cache's, so validation and test tiles are projected on the basis fitted on training tiles (as any
    fitted transform is applied to held-out data) instead of fitting their own.

    Raises:
        CacheError: the file is missing, or lacks a level of ``ks`` or holds it with another K or channel count
            (one line naming the file and the fix).
    """
    file = Path(path) / PCA_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise CacheError(f"{file}: no PCA basis here; pass a cache extracted with a pcaK codec (its folder or its "
                         f"{PCA_FILE})")
    data = file.read_bytes()
    bases = load_bases(data)
    channels = {lv["name"]: lv["channels"] for lv in levels}
    for name, k in ks.items():
        shape = tuple(bases[name].components.shape) if name in bases else None
        if shape != (k, channels[name]):
            raise CacheError(f"{file}: {name} is {'absent' if shape is None else f'K x C = {shape}'}, this extraction "
                             f"needs pca{k} over {channels[name]} channels; extract with the codec and encoder of the "
                             "cache the basis comes from")
    return data


def _basis_bytes(out: Path, header: dict, overwrite: bool, fits: bool, fit) -> bytes:
    """The PCA basis of this extraction: the one recorded in ``out`` for the same identity (a resume; refitted with
    ``overwrite`` where ``fits``), else ``fit()`` where this rank ``fits``, after refusing a directory it may not
    write."""
    found = existing_header(out)
    if found is not None and _fit_identity(found[0].get("identity", {})) == header["identity"] \
            and not (overwrite and fits):
        return recorded_basis(out, found[0]["identity"]["pca"]["sha256"], str(found[1]))
    if not fits:
        raise CacheError(f"{out}: rank 0 wrote no header with a PCA basis for this extraction; rerun every rank "
                         "with the same options")
    check_out(out, header, overwrite)  # refuse before the fit, not after it
    return fit()


def _fit_identity(identity: dict) -> dict:
    """A PCA cache's identity without its basis (what it was before the fit)."""
    if "pca" not in identity:
        return identity
    return dict(identity, pca={k: v for k, v in identity["pca"].items() if k not in ("file", "sha256")})


def _with_basis(header: dict, data: bytes) -> dict:
    """The header with the basis file's name and sha256 in its identity (so in its key) and each PCA level's K and
    explained variance fraction in its levels."""
    identity = dict(header["identity"], pca=dict(header["identity"]["pca"], file=PCA_FILE, sha256=sha256(data)))
    explained = explained_variance(data)
    levels = [dict(lv, pca={"k": pca_k(identity["codec"][lv["name"]]), "explained_variance": explained[lv["name"]]})
              if lv["name"] in explained else lv for lv in header["levels"]]
    return dict(header, identity=identity, cache_key=cache_key(identity), levels=levels)


def _fit_feats(encoder, source, indices: list[int], tile_size: int, config: ExtractConfig, device) -> Iterator[dict]:
    """Features of the first ``config.pca_tiles`` tiles in cache order (level name → (N, C, h, w)), in batches of
    ``config.batch_size``, from the same forward as the extraction."""
    names = [lv.name for lv in encoder.levels]
    n = min(config.pca_tiles, len(indices))
    for start in range(0, n, config.batch_size):
        tiles = [source[i] for i in indices[start:min(start + config.batch_size, n)]]
        for tile in tiles:
            _check_tile(tile, tile_size)
        images = np.ascontiguousarray(np.stack([t.image for t in tiles]).transpose(0, 3, 1, 2))
        with torch.inference_mode():
            output = _forward(encoder, torch.from_numpy(images).to(device), config.dtype, device)
        yield dict(zip(names, output.feats))


def _keys_hash(keys: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _plan(n_tiles: int, shard_size: int) -> list[tuple[int, int, int]]:
    """Fixed chunks of the tile list, independent of the number of ranks: ``[(shard index, start, stop)]``."""
    if shard_size < 1:
        raise ValueError("shard size must be at least 1")
    return [(i, start, min(start + shard_size, n_tiles)) for i, start in enumerate(range(0, n_tiles, shard_size))]


class _TileItems(torch.utils.data.Dataset):
    """Decodes tiles for the DataLoader: uint8 image tensor, plus the PNG and GT either encoded here (in
    worker processes) or left as arrays for the writer thread to encode (``encode=False``, no workers)."""

    def __init__(self, source, indices: list[int], tile_size: int, encode: bool):
        self.source, self.indices, self.tile_size, self.encode = source, indices, tile_size, encode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> dict:
        tile = self.source[self.indices[pos]]
        _check_tile(tile, self.tile_size)
        image = np.ascontiguousarray(tile.image)
        png, gt = (encode_image(image), encode_gt(tile.inst_map, tile.type_map)) if self.encode else \
            (image, (tile.inst_map, tile.type_map))
        return {"pos": pos, "key": tile.key, "image": image, "gt": gt, "png": png, "meta": tile.meta}


def _check_tile(tile, size: int) -> None:
    if tile.image.shape != (size, size, 3) or tile.image.dtype != np.uint8:
        raise ValueError(f"tile {tile.key!r}: image is {tile.image.shape} {tile.image.dtype}, expected "
                         f"({size}, {size}, 3) uint8; every tile of a cache must have the same size")
    for name in ("inst_map", "type_map"):
        if getattr(tile, name).shape != (size, size):
            raise ValueError(f"tile {tile.key!r}: {name} is {getattr(tile, name).shape}, expected ({size}, {size})")


def _ignore_sigint(_worker_id: int) -> None:
    """Ctrl-C is handled by the main process, which then stops the workers at once (no shutdown timeouts)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _collate(items: list[dict]) -> dict:
    """Lists per key, and the images as one (N, 3, H, W) uint8 tensor (transposed by numpy: torch's strided
    uint8 copy is ~100x slower, milliseconds per tile)."""
    batch = {k: [it[k] for it in items] for k in items[0] if k != "image"}
    images = np.stack([it["image"] for it in items]).transpose(0, 3, 1, 2)
    batch["image"] = torch.from_numpy(np.ascontiguousarray(images))
    return batch


def _batches(todo, batch_size: int) -> list[list[int]]:
    """Batches never cross shard boundaries, so features do not depend on how shards are spread over ranks."""
    out, pos = [], 0
    for _, start, stop in todo:
        n = stop - start
        out += [list(range(pos + b, pos + min(b + batch_size, n))) for b in range(0, n, batch_size)]
        pos += n
    return out


def _run(encoder, source, indices, todo, plan, header, out, config, device, progress, n_skipped, n_mine,
         bases: dict | None = None) -> int:
    """Encode the pending shards' tiles (``pca<K>`` levels projected on ``bases``) and hand them to the background
    writer. Returns tiles written."""
    if progress:
        progress(n_skipped, n_mine, 0)
    if not todo:
        return 0
    positions = [p for _, start, stop in todo for p in range(start, stop)]
    items = _TileItems(source, [indices[p] for p in positions], header["tile_size"], encode=config.num_workers > 0)
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=_batches(todo, config.batch_size), num_workers=config.num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=False,
        worker_init_fn=_ignore_sigint,
        prefetch_factor=4 if config.num_workers > 0 else None)
    level_names = [lv["name"] for lv in header["levels"]]
    writer = BackgroundWriter(out, plan, header["cache_key"], level_names, bases, prepare=unpack_batch)
    on_device = {n: Basis(b.mean.to(device), b.components.to(device)) for n, b in (bases or {}).items()}
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    done = n_skipped
    batches = _read_ahead(loader) if config.num_workers == 0 else iter(loader)
    try:
        for batch in batches:
            index = [positions[p] for p in batch["pos"]]
            writer.put(_encode_batch(encoder, batch, index, level_names, config.dtype, device, copy_stream,
                                     header["identity"].get("codec"), on_device))
            done += len(batch["key"])
            if progress:
                progress(done, n_mine, writer.bytes_written)
        writer.finish()
    except BaseException:
        _abandon(writer)
        raise
    finally:
        if hasattr(batches, "close"):
            batches.close()
    if progress:
        progress(done, n_mine, writer.bytes_written)
    return done - n_skipped


def _read_ahead(loader, depth: int = 2) -> Iterator[dict]:
    """Iterate ``loader`` in a thread, ``depth`` batches ahead: without DataLoader workers, reading tiles
    (PIL decoding and numpy, which release the GIL) then overlaps the encoder instead of stalling it."""
    ahead: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for batch in loader:
                if not _offer(ahead, ("batch", batch), stop):
                    return
            _offer(ahead, ("end", None), stop)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
            _offer(ahead, ("error", err), stop)

    thread = threading.Thread(target=fill, name="cellembed-tile-reader", daemon=True)
    thread.start()
    try:
        while (item := ahead.get())[0] == "batch":
            yield item[1]
        if item[0] == "error":
            raise item[1]
    finally:
        stop.set()
        thread.join()


def _offer(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; True when it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _abandon(writer: BackgroundWriter) -> None:
    """On error or Ctrl-C: stop the writer; finished shards stay, the unfinished one is removed."""
    try:
        writer.finish()
    except BaseException:  # noqa: BLE001 - the original error is what the user needs to see
        pass


@torch.inference_mode()
def _encode(encoder, images, dtype: str, device):
    """Features and prefix tokens of a batch in float32 (bf16 autocast on GPU unless fp32 storage)."""
    output = _forward(encoder, images, dtype, device)
    return [f.float() for f in output.feats], None if output.prefix is None else [p.float() for p in output.prefix]


def _forward(encoder, images, dtype: str, device):
    autocast = _compute_mode(device, dtype) == "bf16-autocast"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return encoder(images)


@torch.inference_mode()
def _encode_batch(encoder, batch: dict, index: list[int], level_names: list[str], dtype: str, device,
                  copy_stream, codecs: dict | None = None, bases: dict | None = None) -> PendingBatch:
    """Run the encoder, cast to each level's storage (``codecs``, default ``dtype`` everywhere; int8 quantized
    / int4 quantized here, on the device; ``pca<K>`` levels projected on their ``bases`` and stored as K
    coefficients in ``dtype``) and start the copy to the host.

    Nothing here waits for the device, so the next batch is launched while this one is being copied; the
    writer thread refuses non-finite features when it computes the channel statistics.
    """
    output = _forward(encoder, batch["image"].to(device, non_blocking=True), dtype, device)
    store = DTYPES[dtype]
    feats = {}
    for n, f in zip(level_names, output.feats):
        codec = (codecs or {}).get(n, dtype)
        packed = quantize(f, codec, store) if codec in QUANT_LEVELS else None
        if bases and n in bases:
            feats[n] = bases[n].project(f).to(store, memory_format=torch.contiguous_format)
        elif packed is not None:
            feats.update({n + suffix: t for suffix, t in packed.items()})
        else:  # a float codec, or a quantized one refused on non-finite values (the writer then names the level)
            feats[n] = f.to(DTYPES.get(codec, store), memory_format=torch.contiguous_format)
    if output.prefix is not None:
        feats.update({prefix_name(n): p.to(store, memory_format=torch.contiguous_format)
                      for n, p in zip(level_names, output.prefix)})
    host, ready = _to_host(feats, copy_stream)
    return PendingBatch(batch["key"], index, host, ready, batch["png"], batch["gt"], batch["meta"])


def _to_host(tensors: dict[str, torch.Tensor], copy_stream) -> tuple[dict[str, torch.Tensor], object]:
    """Copy device tensors into pinned host memory on a side stream; returns them with an event to wait on."""
    if copy_stream is None:
        return tensors, None
    copy_stream.wait_stream(torch.cuda.current_stream(copy_stream.device))
    host = {}
    with torch.cuda.stream(copy_stream):
        for name, t in tensors.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name].copy_(t, non_blocking=True)
            t.record_stream(copy_stream)  # the caching allocator keeps t until the copy is done
        ready = torch.cuda.Event()
        ready.record(copy_stream)
    return host, ready


def _finalize(out: Path, header: dict, n_shards: int, rank: int, world: int, names: dict[int, str]) -> dict | None:
    """Write the manifest once every shard's record exists (rank 0 after a barrier under torch.distributed).

    ``names`` maps shard index → file name where it is known (a repair keeps the manifest's names).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank != 0:
            torch.distributed.barrier()
            return read_json(out / MANIFEST, MANIFEST)
    records = []
    for i in range(n_shards):
        path = out / names[i] if i in names else existing_shard(out, i)
        path = path if path is not None and path.is_file() else None
        try:
            record = read_json(sidecar_path(out, path.name), "shard record") if path is not None else None
        except CacheError:
            record = None
        if record is None or record.get("cache_key") != header["cache_key"]:
            return None  # another rank is still writing; the last one to finish writes the manifest
        records.append(record)
    manifest = build_manifest(header, records)
    write_json_atomic(out / MANIFEST, manifest)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return manifest
