"""The decoder contract: cached feature levels (+ optional raw image) in, full-resolution maps out."""

from __future__ import annotations

import torch
from torch import nn

from cellembed._registry import Registry

from ._heads import head_maps

DECODERS: Registry[type] = Registry("decoder")


def check_levels(levels: list[dict]) -> list[dict]:
    """Validate a manifest's level list; returns plain copies.

    Args:
        levels: ``[{"name", "block", "channels", "grid": [h, w], "stride"}, ...]``; ``channels`` and
            ``grid`` are required, the rest optional.
    """
    if not levels:
        raise ValueError("a decoder needs at least one cached level; got an empty level list")
    out = []
    for i, lv in enumerate(levels):
        if "channels" not in lv or "grid" not in lv:
            raise ValueError(f"level {i} ({lv.get('name', '?')}) lacks 'channels' or 'grid': {lv}")
        grid = [int(g) for g in lv["grid"]]
        if len(grid) != 2 or min(grid) < 1 or int(lv["channels"]) < 1:
            raise ValueError(f"level {i} ({lv.get('name', '?')}): bad channels/grid {lv['channels']}/{lv['grid']}")
        out.append({**lv, "channels": int(lv["channels"]), "grid": grid})
    return out


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, T) uint8 0..255 (or float already in [0, 1]) → float in [-1, 1]."""
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    return x * 2.0 - 1.0


class Decoder(nn.Module):
    """Base class: holds the level list, tile size and head; checks inputs; counts parameters.

    Args:
        levels: cached levels as in the manifest, in the order ``feats`` will arrive.
        tile_size: side T of the (square) tile the maps are predicted for.
        head: a name in ``HEADS``.
        num_classes: number of classes C (see ``head_maps``).
        image_skip: whether ``forward`` takes the raw tile as a skip connection.

    Subclasses implement ``_decode(feats, image) -> dict`` returning (N, k, T, T) maps.
    """

    name = "?"

    def __init__(self, levels: list[dict], tile_size: int, head: str, num_classes: int, image_skip: bool = False):
        super().__init__()
        if int(tile_size) < 2:
            raise ValueError(f"tile_size must be >= 2, got {tile_size}")
        self.levels = check_levels(levels)
        self.tile_size = int(tile_size)
        self.head = head
        self.num_classes = int(num_classes)
        self.image_skip = bool(image_skip)
        self.maps = head_maps(head, num_classes)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Predict full-resolution maps.

        Args:
            feats: one (N, C_i, h_i, w_i) tensor per level, in ``levels`` order.
            image: (N, 3, T, T) uint8 tile, required when ``image_skip``, ignored otherwise.

        Returns:
            {key: (N, k, T, T)} raw outputs (logits / linear maps), keys as in ``self.maps``.
        """
        self._check_inputs(feats, image)
        # channels-last activations: oneDNN (CPU) and cuDNN (GPU) run these convolutions faster, most of all
        # under bf16 autocast (measured in benchmarks/cache_vs_live.py); the outputs are plain NCHW again
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        if self.image_skip:
            image = image.contiguous(memory_format=torch.channels_last)
        return self._decode(feats, image if self.image_skip else None)

    def _decode(self, feats: list[torch.Tensor], image: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _check_inputs(self, feats, image) -> None:
        if len(feats) != len(self.levels):
            raise ValueError(f"{self.name} decoder built for {len(self.levels)} levels got {len(feats)} feature maps")
        for f, lv in zip(feats, self.levels):
            if f.ndim != 4 or f.shape[1] != lv["channels"] or f.shape[0] != feats[0].shape[0]:
                raise ValueError(f"level {lv.get('name', '?')}: expected (N, {lv['channels']}, h, w), got "
                                 f"{tuple(f.shape)}")
        if self.image_skip:
            t = self.tile_size
            if image is None:
                raise ValueError(f"{self.name} decoder was built with image_skip=True; pass the (N, 3, T, T) tile")
            if tuple(image.shape) != (feats[0].shape[0], 3, t, t):
                raise ValueError(f"image must be (N, 3, {t}, {t}) NCHW, got {tuple(image.shape)}")

    def num_trainable_parameters(self) -> int:
        """Number of parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def config(self) -> dict:
        """Arguments that rebuild this decoder with ``build_decoder(**config)``."""
        return {"name": self.name, "levels": self.levels, "tile_size": self.tile_size, "head": self.head,
                "num_classes": self.num_classes, "image_skip": self.image_skip}
