"""Output heads: which maps a decoder predicts, and the 1×1 convolutions that predict them.

A head is a registry entry (``HEADS``) naming the output maps, their channel counts and whether each
is categorical (logits, softmax over channels) or a linear regression map. Decoders produce *raw*
outputs: logits for categorical maps, linear values for regression maps; ``activate`` turns them into
what post-processing expects (softmax probabilities, linear maps unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cellembed._registry import Registry


class OutputMap(NamedTuple):
    """One predicted map.

    Attributes:
        key: name in the decoder's output dict ("classes", "directions", ...).
        channels: number of channels k of the (N, k, T, T) output.
        categorical: True for logits (softmax over channels), False for linear maps.
    """

    key: str
    channels: int
    categorical: bool


HeadFn = Callable[[int], "tuple[OutputMap, ...]"]
HEADS: Registry[HeadFn] = Registry("head")


@HEADS("cisca")
def _cisca(num_classes: int) -> tuple[OutputMap, ...]:
    """CISCA.md §2.1: 3-class map (boundary, body, background), 4 directional maps (h, v, tl, bl),
    and C + 1 type logits (channel 0 = background) when there is more than one class."""
    maps = (OutputMap("classes", 3, True), OutputMap("directions", 4, False))
    if num_classes > 1:
        maps += (OutputMap("types", num_classes + 1, True),)
    return maps


@HEADS("hovernet")
def _hovernet(num_classes: int) -> tuple[OutputMap, ...]:
    """HoVer-Net: NP (2 logits), HV (x then y offset maps), NC (C + 1 logits, 0 = background)."""
    return (OutputMap("np", 2, True), OutputMap("hv", 2, False), OutputMap("nc", num_classes + 1, True))


@HEADS("semantic")
def _semantic(num_classes: int) -> tuple[OutputMap, ...]:
    """Semantic (tissue) segmentation: C logits, one per class (class 0 included if the data has one)."""
    return (OutputMap("semantic", num_classes, True),)


def head_maps(head: str, num_classes: int) -> tuple[OutputMap, ...]:
    """The output maps of ``head`` for ``num_classes`` classes.

    Args:
        head: a name in ``HEADS`` ("cisca", "hovernet", "semantic").
        num_classes: number of foreground classes C (>= 1); for "semantic", the number of classes.

    Returns:
        The maps, in output order.
    """
    fn = HEADS.get(head)
    if int(num_classes) < 1:
        raise ValueError(f"head {head!r}: num_classes must be >= 1, got {num_classes}")
    return fn(int(num_classes))


class OutputConvs(nn.Module):
    """One 1×1 convolution per output map, all reading the same feature map.

    The convolutions are run as one (their weights concatenated), which reads the full-resolution feature
    map once instead of once per map: on 2 CPU threads the backward of three thin 1×1 convolutions at 256²
    cost more than the 3×3 convolution before them (``benchmarks/cache_vs_live.py``). Parameters stay one
    ``nn.Conv2d`` per map, so state dicts are unchanged.

    Args:
        in_channels: channels of the shared feature map.
        maps: the head's output maps (``head_maps``).
    """

    def __init__(self, in_channels: int, maps: tuple[OutputMap, ...]):
        super().__init__()
        self.convs = nn.ModuleDict({m.key: nn.Conv2d(in_channels, m.channels, 1) for m in maps})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, in_channels, H, W) → {key: (N, k, H, W)}, each output a contiguous NCHW tensor."""
        convs = list(self.convs.values())
        weight = torch.cat([c.weight for c in convs]) if len(convs) > 1 else convs[0].weight
        bias = torch.cat([c.bias for c in convs]) if len(convs) > 1 else convs[0].bias
        y = F.conv2d(x, weight, bias)
        parts = y.split([c.out_channels for c in convs], dim=1)
        return {key: part.contiguous() for key, part in zip(self.convs, parts)}


def activate(head: str, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw decoder outputs → probabilities (softmax over channels) and linear maps.

    Args:
        head: the head that produced ``outputs``.
        outputs: {key: (N, k, H, W)} raw outputs.

    Returns:
        The same keys; categorical maps softmaxed over dim 1, regression maps unchanged.
    """
    categorical = {m.key: m.categorical for m in HEADS.get(head)(2)}
    return {k: v.softmax(1) if categorical.get(k, False) else v for k, v in outputs.items()}
