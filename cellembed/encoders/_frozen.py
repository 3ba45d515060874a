"""`FrozenEncoder`: uint8 tiles in, multi-depth feature grids out, one backbone pass."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import EncoderOutput, EncoderSpec, LevelInfo, jsonable


def make_levels(spec: EncoderSpec, blocks: tuple[int, ...], input_hw: tuple[int, int],
                tile_size: int) -> list[LevelInfo]:
    """Channels, grid and stride of every selected block at the given input size."""
    levels = []
    for b in blocks:
        if spec.is_vit:
            channels, reduction = spec.embed_dim, spec.patch_size
            grid = (input_hw[0] // reduction, input_hw[1] // reduction)
        else:
            s = spec.stage_ends.index(b)
            channels, reduction = spec.stage_channels[s], spec.stage_strides[s]
            grid = (math.ceil(input_hw[0] / reduction), math.ceil(input_hw[1] / reduction))
        levels.append(LevelInfo(f"block_{b}", b, channels, grid, tile_size / grid[1]))
    return levels


class FrozenEncoder(nn.Module):
    """A frozen backbone plus its preprocessing; build it with `build_encoder`.

    Attributes:
        spec: the preset.
        blocks: selected 0-based block indices (sorted).
        input_policy: "resize" or "native-grid".
        tile_size: side of the tiles `forward` accepts.
        input_hw: (H, W) the backbone actually sees.
        weights_id: identity of the weights ("random:seed=0", "file:sha256=...", "hub:<repo>@<rev>", ...).
        levels: one `LevelInfo` per selected block.
        num_prefix_tokens: CLS + register tokens (0 for hierarchical models).
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec, blocks: tuple[int, ...], input_policy: str,
                 tile_size: int, input_hw: tuple[int, int], weights_id: str):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.blocks = tuple(blocks)
        self.input_policy = input_policy
        self.tile_size = tile_size
        self.input_hw = tuple(input_hw)
        self.weights_id = weights_id
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.levels = make_levels(spec, self.blocks, self.input_hw, tile_size)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self._stage_indices = [spec.stage_offset + spec.stage_ends.index(b) for b in self.blocks] \
            if not spec.is_vit else list(self.blocks)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        """Stays in eval mode whatever is asked: the encoder is frozen (dropout, BN statistics)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """Encode a batch of tiles.

        Args:
            images: (N, 3, tile_size, tile_size) uint8 RGB on the module's device.

        Returns:
            EncoderOutput: feats, one (N, C, h, w) tensor per level (dtype of the backbone's parameters);
            prefix, one (N, P, C) tensor per level for ViTs (CLS then registers), else None.
        """
        self._check_input(images)
        with torch.no_grad():
            x = self.preprocess(images)
            feats, prefix = self._run(x)
        self._check_output(feats)
        return EncoderOutput(feats, prefix)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, T, T) -> normalised (N, 3, *input_hw) in the backbone's parameter dtype."""
        x = images.float() / 255.0
        if tuple(x.shape[-2:]) != self.input_hw:
            mode = self.spec.interpolation
            x = F.interpolate(x, size=self.input_hw, mode=mode, align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        x = (x - self.mean) / self.std
        return x.to(next(self.backbone.parameters()).dtype)

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if self.spec.family == "hf-vit":
            return self.backbone.forward_intermediates(x, list(self.blocks))
        if self.spec.family == "vit":
            out = self.backbone.forward_intermediates(
                x, indices=list(self.blocks), return_prefix_tokens=True, norm=False, stop_early=True,
                output_fmt="NCHW", intermediates_only=True)
            if not self.num_prefix_tokens:
                return list(out), None
            return [f for f, _ in out], [p for _, p in out]
        feats = self.backbone.forward_intermediates(
            x, indices=self._stage_indices, stop_early=True, intermediates_only=True,
            **self.spec.intermediates_kwargs)
        return list(feats), None

    def _check_input(self, images: torch.Tensor) -> None:
        t = self.tile_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, t, t):
            raise ValueError(f"{self.spec.name} expects (N, 3, {t}, {t}) uint8 images, got "
                             f"{tuple(images.shape)} {images.dtype}")

    def _check_output(self, feats: list[torch.Tensor]) -> None:
        for f, lvl in zip(feats, self.levels):
            if f.shape[1] != lvl.channels or tuple(f.shape[2:]) != lvl.grid:
                raise RuntimeError(f"{self.spec.name} {lvl.name}: got {tuple(f.shape[1:])}, expected "
                                   f"({lvl.channels}, {lvl.grid[0]}, {lvl.grid[1]})")

    def describe(self) -> dict[str, Any]:
        """JSON-able record of everything that changes the output bytes (for the cache manifest / key).

        Device, autocast dtype and the torch version are not recorded here; the extractor records them.
        """
        import timm

        spec = self.spec
        out = {
            "encoder": spec.name, "family": spec.family, "source": spec.source, "arch": spec.arch,
            "build_kwargs": jsonable(dict(sorted(spec.build_kwargs.items()))),
            "blocks": list(self.blocks), "input_policy": self.input_policy, "tile_size": self.tile_size,
            "input_hw": list(self.input_hw), "patch_size": spec.patch_size,
            "num_prefix_tokens": self.num_prefix_tokens, "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation, "weights_id": self.weights_id,
            "levels": [{**lvl._asdict(), "grid": list(lvl.grid)} for lvl in self.levels],
            "param_dtype": str(next(self.backbone.parameters()).dtype).removeprefix("torch."),
            "timm_version": timm.__version__,
        }
        if spec.family == "hf-vit":
            import transformers

            out["transformers_version"] = transformers.__version__
        return out

