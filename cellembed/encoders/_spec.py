"""Public value types of `cellembed.encoders`: the preset spec, level metadata, outputs, errors.

An :class:`EncoderSpec` carries everything needed to build one preset (architecture, weight source,
normalisation, block presets), so callers pass a name and never mean/std themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, NamedTuple, Sequence

import torch

FAMILIES = ("vit", "hierarchical", "efficientnet", "hf-vit")
WEIGHT_SOURCES = ("hub", "random", "file", "packaged")


class GatedModelError(RuntimeError):
    """The hub refused the weights (gated repo, 401/403) or they are not reachable offline."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build one frozen-encoder preset.

    Attributes:
        name: preset name, the registry key ("vit_l_21k").
        family: "vit" (timm VisionTransformer), "hierarchical" (timm ConvNeXt / SwinV2 / MaxViT),
            "efficientnet" (timm EfficientNet, features at stage ends) or "hf-vit" (HF transformers).
        source: where pretrained weights come from: a timm tag ("convnext_base.fb_in22k") or "hf-hub:owner/repo".
        arch: the architecture built offline (timm model name, or transformers class for "hf-vit").
        patch_size: ViT patch size actually used (None for hierarchical models).
        embed_dim: ViT width, or channels of the last stage.
        depth: number of blocks (flattened over stages for hierarchical models).
        num_prefix_tokens: tokens before the patch grid (CLS + registers); 0 for CNN-like models.
        num_registers: register tokens among the prefix tokens.
        input_size: native (pretraining / evaluation) input side in pixels.
        mean, std: per-channel normalisation of [0, 1] RGB, applied by the encoder itself.
        interpolation: "bilinear" or "bicubic", used to resize tiles to the input size.
        block_presets: named 0-based block selections ("shallow", "deep", "mixed", "stages").
        default_blocks: key of `block_presets` used when blocks="default".
        licence: licence of the weights.
        gated: whether the hub requires an accepted licence and a token.
        url: model card.
        build_kwargs: keyword arguments of the architecture constructor (timm `create_model` or the
            transformers config); may hold classes (SwiGLUPacked) that `describe()` renders by name.
        notes: provenance and caveats.
        stage_ends: hierarchical only: flattened index of the last block of each stage.
        stage_channels, stage_strides: hierarchical only: channels and stride (input px per cell) per stage.
        stage_offset: hierarchical only: `forward_intermediates` index of stage 0 (1 where the stem is index 0).
        intermediates_kwargs: extra keyword arguments of `forward_intermediates` / `prune_intermediate_layers`.
        size_multiple: the input side must be a multiple of this (patch size, or the total stride).
        fixed_input_size: the architecture only runs at `input_size` (MaxViT partitions).
        hub_file: weights file inside the hub repo when the repo is not a timm model repo.
        state_dict_prefix: prefix of the backbone's keys inside that file ("visual.trunk.").
        weight_sources: the accepted values of `build_encoder(weights=...)` besides a file path.
        unavailable: non-empty when the preset cannot be built here; the reason.
    """

    name: str
    family: str
    source: str
    arch: str
    patch_size: int | None
    embed_dim: int
    depth: int
    num_prefix_tokens: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    block_presets: Mapping[str, tuple[int, ...]]
    default_blocks: str
    licence: str
    gated: bool
    url: str
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""
    num_registers: int = 0
    stage_ends: tuple[int, ...] = ()
    stage_channels: tuple[int, ...] = ()
    stage_strides: tuple[int, ...] = ()
    stage_offset: int = 0
    intermediates_kwargs: Mapping[str, Any] = field(default_factory=dict)
    size_multiple: int = 32
    fixed_input_size: bool = False
    hub_file: str | None = None
    state_dict_prefix: str = ""
    weight_sources: tuple[str, ...] = ("hub", "random", "file")
    unavailable: str = ""

    def __post_init__(self):
        for name in ("build_kwargs", "block_presets", "intermediates_kwargs"):  # private copies
            object.__setattr__(self, name, dict(getattr(self, name)))
        problems = _spec_problems(self)
        if problems:
            raise ValueError(f"invalid encoder spec {self.name!r}: " + "; ".join(problems))

    def __hash__(self) -> int:
        return hash(self.name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy of every field (classes in `build_kwargs` become dotted names)."""
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}

    @property
    def is_vit(self) -> bool:
        """True for token-grid encoders (timm or HF ViTs)."""
        return self.family in ("vit", "hf-vit")

    @property
    def grid_size(self) -> int:
        """Side of the token / feature grid at `input_size` (last stage for hierarchical models)."""
        if self.is_vit:
            return self.input_size // self.patch_size
        return -(-self.input_size // self.stage_strides[-1])


def _spec_problems(spec: EncoderSpec) -> list[str]:
    out = []
    if spec.family not in FAMILIES:
        out.append(f"family must be one of {FAMILIES}")
    if len(spec.mean) != 3 or len(spec.std) != 3:
        out.append("mean and std need 3 values")
    if spec.interpolation not in ("bilinear", "bicubic"):
        out.append("interpolation must be 'bilinear' or 'bicubic'")
    if spec.default_blocks not in spec.block_presets:
        out.append(f"default_blocks {spec.default_blocks!r} is not a preset")
    for key, idx in spec.block_presets.items():
        if list(idx) != sorted(set(idx)) or not idx or idx[0] < 0 or idx[-1] >= spec.depth:
            out.append(f"preset {key}={idx} must be sorted, unique and within 0..{spec.depth - 1}")
        if spec.stage_ends and not set(idx) <= set(spec.stage_ends):
            out.append(f"preset {key}={idx} has indices that are not stage ends {spec.stage_ends}")
    if spec.is_vit and (not spec.patch_size or spec.input_size % spec.patch_size):
        out.append("ViT input_size must be a multiple of patch_size")
    if not spec.is_vit and not (len(spec.stage_ends) == len(spec.stage_channels) == len(spec.stage_strides) > 0):
        out.append("hierarchical specs need stage_ends, stage_channels and stage_strides of equal length")
    if not set(spec.weight_sources) <= set(WEIGHT_SOURCES):
        out.append(f"weight_sources must be within {WEIGHT_SOURCES}")
    if spec.gated and not spec.url:
        out.append("gated presets need a model-card url")
    return out


def jsonable(value: Any) -> Any:
    """Plain JSON types for spec values: tuples become lists, classes their dotted names."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


class LevelInfo(NamedTuple):
    """One cached feature level.

    Attributes:
        name: "block_{i}", the tensor name in the cache.
        block: 0-based block index (flattened over stages for hierarchical models).
        channels: C of the (N, C, h, w) feature map.
        grid: (h, w) of the feature map.
        stride: tile pixels per grid cell (tile_size / w); fractional when the tile was resized.
    """

    name: str
    block: int
    channels: int
    grid: tuple[int, int]
    stride: float


class EncoderOutput(NamedTuple):
    """What `FrozenEncoder.forward` returns.

    Attributes:
        feats: one (N, C, h, w) tensor per selected block, in block order, prefix tokens removed.
        prefix: ViTs: one (N, P, C) tensor per block holding CLS then register tokens; None otherwise.
    """

    feats: list[torch.Tensor]
    prefix: list[torch.Tensor] | None


def resolve_blocks(spec: EncoderSpec, blocks: str | Sequence[int] = "default") -> tuple[int, ...]:
    """Turn a block selection into sorted 0-based block indices.

    Args:
        spec: the encoder preset.
        blocks: "default", a preset name ("shallow", "deep", "mixed", "stages"), "all" (every block; every stage
            end for hierarchical models), "last" (the last block: depth - 1, or the last stage end), a comma list
            "2,5,10,20" or a sequence of ints.

    Returns:
        Sorted, unique indices within 0..depth-1 (stage ends only, for hierarchical models).

    Raises:
        ValueError: unknown preset, malformed list, duplicate or out-of-range index, or an index of a
            hierarchical model that is not the last block of a stage.
    """
    if isinstance(blocks, str):
        key = spec.default_blocks if blocks == "default" else blocks.strip()
        if key == "all":  # every block (ViTs) or every stage end (hierarchical models): level subsets at fit time
            return tuple(spec.stage_ends) if spec.stage_ends else tuple(range(spec.depth))
        if key == "last" and "last" not in spec.block_presets:  # the FM benchmark's last-layer features
            return (spec.stage_ends[-1] if spec.stage_ends else spec.depth - 1,)
        if key in spec.block_presets:
            return tuple(spec.block_presets[key])
        if not re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*)*,?\s*", key):
            raise ValueError(f"unknown block preset {blocks!r} for {spec.name}; {_preset_help(spec)}")
        blocks = [int(s) for s in key.split(",") if s.strip()]
    idx = [int(i) for i in blocks]
    if not idx:
        raise ValueError(f"no blocks selected for {spec.name}; {_preset_help(spec)}")
    if len(set(idx)) != len(idx):
        raise ValueError(f"duplicate block indices {idx} for {spec.name}")
    bad = [i for i in idx if not 0 <= i < spec.depth]
    if bad:
        raise ValueError(f"block indices {bad} out of range 0..{spec.depth - 1} for {spec.name} "
                         f"({spec.depth} blocks); {_preset_help(spec)}")
    if spec.stage_ends:
        bad = [i for i in idx if i not in spec.stage_ends]
        if bad:
            raise ValueError(f"blocks {bad} of {spec.name} are not the last block of a stage; "
                             f"stage ends are {list(spec.stage_ends)}")
    return tuple(sorted(idx))


def _preset_help(spec: EncoderSpec) -> str:
    names = ", ".join(f"{k}={list(v)}" for k, v in spec.block_presets.items())
    return f"presets: {names}; all; last; or indices like '2,5,10,20'"
