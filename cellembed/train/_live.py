"""The live source of ``fit-decoder``: tiles decoded and augmented in DataLoader workers, the encoder in the loop.

A :class:`LiveLoader` serves the same :class:`cellembed.cache.Batch` as the cache loader, so the training loop
does not know which source it reads. Dataset, split, encoder, blocks, weights, input policy and dtype mean what
they mean to ``cellembed extract``: an un-augmented tile gets the features the cache would hold for it (the
encoder's output rounded through ``dtype`` as the cache stores it, then served as float32).

An epoch's order and every tile's augmentation are pure functions of ``(seed, epoch)`` and the tile's index in
its dataset, never of the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cellembed.cache._augment import HEADS, finish_targets, sample_targets, stack_targets
from cellembed.cache._extract import (DTYPES, _check_tile, _compute_mode, _ignore_sigint, _keys_hash, _pick_device,
                                      _tile_size)
from cellembed.cache._loader import Batch
from cellembed.cache._manifest import FORMAT_VERSION
from cellembed.data._augment import AUGMENTS, AugmentConfig, augment_tile, dihedral_tile, tile_rng


def make_live_loader(dataset: str, root: str | Path | None, encoder, *, split: str = "train",
                     folds: str | Path | None = None, scheme: str | None = None, blocks: str = "default",
                     weights: str = "hub", input_policy: str = "auto", dtype: str = "fp16",
                     dataset_options: dict | None = None, batch_size: int, augment: str | AugmentConfig = "full",
                     head: str = "cisca", magnification: str = "40x", shuffle: bool = True, seed: int = 0,
                     num_workers: int = 2, device: str | torch.device = "auto", levels: list[str] | None = None,
                     drop_last: bool = False) -> LiveLoader:
    """A per-epoch iterable of :class:`cellembed.cache.Batch`, the frozen encoder run on every batch.

    Args:
        dataset, root, split, folds, scheme, dataset_options: the tiles, as for ``extract`` (``open_dataset`` then
            ``resolve_split``).
        encoder: a preset name (built with ``blocks``, ``weights``, ``input_policy``), or a built
            ``FrozenEncoder`` to share one between a training and a validation loader (those three are then
            ignored; its ``tile_size`` must match the tiles).
        dtype: "fp16", "bf16" or "fp32": features are rounded through it as the cache stores them; with a CUDA
            device anything but "fp32" runs the encoder under bf16 autocast, as ``extract`` does.
        batch_size: tiles per batch (the last batch of an epoch may be smaller unless ``drop_last``).
        augment: "none", "dihedral" (one of 8 flips/quarter turns per tile), "full" (CISCA's pipeline,
            ``cellembed.data._augment``), or an ``AugmentConfig``.
        head: "cisca", "hovernet" or "semantic": which targets to compute (after augmentation).
        magnification: "20x" or "40x", for CISCA's targets.
        shuffle: a new tile order every epoch (``False``: split order).
        seed: same seed and epoch → same batches.
        num_workers: processes that decode, augment and compute targets (0: in the main process).
        device: "auto", "cpu", "cuda" or "cuda:N": where the encoder runs and batches go.
        levels: subset of the encoder's level names to serve (default: all), in encoder order.
        drop_last: drop an epoch's incomplete last batch.
    """
    from cellembed.data import open_dataset, resolve_split
    from cellembed.encoders import FrozenEncoder, build_encoder

    _check_options(dtype, augment, head, magnification, batch_size, num_workers)
    if folds and split == "all":
        raise ValueError("folds only selects tiles together with split train|val|test")
    device = _pick_device(str(device))
    source = open_dataset(dataset, root, **(dataset_options or {}))
    selection = resolve_split(source, split, folds=folds, scheme=scheme)
    if not selection.indices:
        raise ValueError(f"split {split!r} of {dataset} is empty ({selection.scheme}); pick another split")
    tile_size = _tile_size(source, selection.indices[0])
    if isinstance(encoder, FrozenEncoder):
        if encoder.tile_size != tile_size:
            raise ValueError(f"the encoder takes {encoder.tile_size}² tiles but {dataset} has {tile_size}² tiles")
        encoder = encoder.to(device)
    else:
        encoder = build_encoder(encoder, blocks=blocks, weights=weights, input_policy=input_policy,
                                tile_size=tile_size, device=device)
    return LiveLoader(source, selection, encoder, tile_size, device=device, dtype=dtype, batch_size=batch_size,
                      augment=augment, head=head, magnification=magnification, shuffle=shuffle, seed=seed,
                      num_workers=num_workers, levels=levels, drop_last=drop_last)


def _check_options(dtype, augment, head, magnification, batch_size, num_workers) -> None:
    checks = (("dtype", dtype, tuple(DTYPES)), ("head", head, HEADS), ("magnification", magnification, ("20x", "40x")))
    if not isinstance(augment, AugmentConfig):
        checks += (("augment", augment, AUGMENTS),)
    for name, value, valid in checks:
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError("batch_size must be >= 1 and num_workers >= 0")


class LiveLoader:
    """Batches of freshly encoded (and augmented) tiles, one pass per epoch. Build with :func:`make_live_loader`.

    Attributes:
        encoder: the frozen encoder (pass it to a second loader to share it).
        source, selection: the dataset and the split's tiles.
        keys: the split's tile keys, in split order.
        tile_size: side of the tiles.
        class_names: the dataset's type names, "background" first.
        levels: the served levels as a cache manifest lists them (``name``, ``block``, ``channels``, ``grid``,
            ``stride``).
        level_names: their names.
        identity: what ``extract`` would write as the manifest's ``identity`` for the same options (without
            ``shard_size``), e.g. for ``check_compatible(test_cache, {"encoder": loader.identity["encoder"]})``.
        n_samples: tiles per epoch before batching.
        device: where the encoder runs and batches go.
    """

    def __init__(self, source, selection, encoder, tile_size: int, *, device: torch.device, **o):
        self.source, self.selection, self.encoder, self.tile_size = source, selection, encoder, tile_size
        self.device, self.o = device, o
        self.indices = list(selection.indices)
        self.keys = [source.keys[i] for i in self.indices]
        self.class_names = list(source.class_names)
        all_levels = [{"name": lv.name, "block": lv.block, "channels": lv.channels, "grid": list(lv.grid),
                       "stride": lv.stride} for lv in encoder.levels]
        unknown = [n for n in (o["levels"] or []) if n not in [lv["name"] for lv in all_levels]]
        if unknown:
            names = [lv["name"] for lv in all_levels]
            raise ValueError(f"levels {unknown} are not computed; the encoder gives {names}")
        self.level_idx = [i for i, lv in enumerate(all_levels) if o["levels"] is None or lv["name"] in o["levels"]]
        self.levels = [all_levels[i] for i in self.level_idx]
        self.level_names = [lv["name"] for lv in self.levels]
        self.identity = self._identity()
        self.n_samples = len(self.indices)
        self.plan = EpochPlan(self.indices, o["batch_size"], o["shuffle"], o["seed"], o["drop_last"])
        self._data = _data_loader(self)

    def _identity(self) -> dict:
        return {"format_version": FORMAT_VERSION, "encoder": self.encoder.describe(), "dtype": self.o["dtype"],
                "compute": _compute_mode(self.device, self.o["dtype"]), "dataset": self.source.describe(),
                "split": {"split": self.selection.split, "scheme": self.selection.scheme,
                          "detail": self.selection.detail},
                "tiles": {"n": len(self.keys), "sha256": _keys_hash(self.keys), "size": self.tile_size}}

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation draws the next iteration uses."""
        self.plan.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        for c in self._data:
            yield self._finish(c)

    @torch.no_grad()
    def _finish(self, c: dict) -> Batch:
        images = c["image"].to(self.device, non_blocking=True)
        feats = encode_levels(self.encoder, images, self.o["dtype"], self.device, self.level_idx)
        _check_finite(feats, c["keys"], self.level_names, self.o["dtype"])
        targets = finish_targets({**c["targets"], "type_map": c["type_map"]}, self.device)
        targets["inst_map"] = c["inst_map"].to(self.device, non_blocking=True)
        return Batch(feats, images, targets, c["keys"])


@torch.inference_mode()
def _encode(encoder, images: torch.Tensor, dtype: str, device: torch.device) -> list[torch.Tensor]:
    """The encoder's levels for a uint8 batch, computed as ``extract`` does (bf16 autocast on CUDA unless fp32)."""
    autocast = _compute_mode(device, dtype) == "bf16-autocast"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return list(encoder(images).feats)


def encode_levels(encoder, images: torch.Tensor, dtype: str, device: torch.device,
                  level_idx: list[int]) -> list[torch.Tensor]:
    """The chosen levels of ``_encode`` as float32, rounded through ``dtype`` as the cache stores them, and
    copied out of inference mode so that a decoder can backpropagate through them."""
    store = DTYPES[dtype]
    feats = _encode(encoder, images, dtype, device)
    return [feats[i].to(store).to(torch.float32, copy=True) for i in level_idx]


def _check_finite(feats: list[torch.Tensor], keys: list[str], level_names: list[str], dtype: str) -> None:
    for name, f in zip(level_names, feats):
        finite = torch.isfinite(f).flatten(1).all(1)
        if not bool(finite.all()):
            bad = [k for k, ok in zip(keys, finite.tolist()) if not ok][:3]
            hint = " (values exceed the fp16 range: use dtype bf16)" if dtype == "fp16" else ""
            raise FloatingPointError(f"non-finite features at {name} for tiles {bad}{hint}")


class EpochPlan:
    """The batch sampler: an epoch's batches of ``(epoch, dataset index)`` pairs, for the epoch last set.

    It holds no reference to its loader (a reference cycle through a DataLoader with persistent workers makes
    the garbage collector's shutdown of those workers wait out their join timeouts).
    """

    def __init__(self, indices: list[int], batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        self.indices, self.batch_size, self.shuffle, self.seed, self.epoch = indices, batch_size, shuffle, seed, 0
        n = len(indices)
        self.n_batches = n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Epoch ``epoch``'s batches (what the workers are asked for)."""
        order = self.indices
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch, 0]).permutation(len(order))]
        b = self.batch_size
        return [[(epoch, i) for i in order[s:s + b]] for s in range(0, self.n_batches * b, b)]

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return self.n_batches


class LiveTiles(torch.utils.data.Dataset):
    """Worker side: ``(epoch, dataset index)`` → decoded, augmented tile with its targets (compact dtypes)."""

    def __init__(self, source, tile_size: int, augment: str | AugmentConfig, head: str, magnification: str, seed: int):
        self.source, self.tile_size, self.augment = source, tile_size, augment
        self.head, self.magnification, self.seed = head, magnification, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        tile = self.source[index]
        _check_tile(tile, self.tile_size)
        image, inst_map, type_map = augment_sample(tile.image, tile.inst_map, tile.type_map, self.augment,
                                                   tile_rng(self.seed, epoch, index))
        return {"key": tile.key, "image": torch.from_numpy(image), "inst_map": torch.from_numpy(inst_map),
                "type_map": torch.from_numpy(type_map),
                "targets": sample_targets(inst_map, type_map, self.head, self.magnification)}


def augment_sample(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, mode: str | AugmentConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply the named augmentation ("none", "dihedral", "full") or an ``AugmentConfig``; contiguous outputs."""
    if mode == "dihedral":
        out = dihedral_tile(image, inst_map, type_map, rng)
    elif mode == "none":
        out = (image, inst_map, type_map)
    else:
        out = augment_tile(image, inst_map, type_map, rng, AugmentConfig() if mode == "full" else mode)
    return tuple(np.ascontiguousarray(a) for a in out)


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]).permute(0, 3, 1, 2).contiguous(),
            "inst_map": torch.stack([it["inst_map"] for it in items]),
            "type_map": torch.stack([it["type_map"] for it in items]),
            "targets": stack_targets([it["targets"] for it in items]), "keys": [it["key"] for it in items]}


def _data_loader(loader: LiveLoader) -> torch.utils.data.DataLoader:
    o = loader.o
    tiles = LiveTiles(loader.source, loader.tile_size, o["augment"], o["head"], o["magnification"], o["seed"])
    workers = o["num_workers"]
    return torch.utils.data.DataLoader(
        tiles, batch_sampler=loader.plan, num_workers=workers, collate_fn=_collate,
        pin_memory=loader.device.type == "cuda", persistent_workers=workers > 0, worker_init_fn=_ignore_sigint,
        prefetch_factor=4 if workers > 0 else None)
