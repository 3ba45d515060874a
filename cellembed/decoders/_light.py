"""The FM segmentation benchmark's light single-scale decoder (DESIGN.md §6), about 2.6 M parameters.

It reads one level, the deepest cached one (largest stride; ties go to the highest block, then the
last listed): 1×1 conv to D = 256 channels, n × (×2 bilinear upsample, 3×3 conv, ReLU), the head's
1×1 convolutions to logits, bilinear resize to the tile. Parameters: C·256 + n·590k + head, so about
2.6 M for n = 4 whatever the encoder width C (2.46 M at C = 384, 2.76 M at C = 1536).

n (``num_upsamples``): the benchmark uses ⌈log2(H/h)⌉ with H the side of the image the encoder saw.
Here tiles may be resized before the encoder (a 256² tile at 224 for a /16 ViT gives a 14×14 grid), so
T/h = 18.3 and the ceiling would add a fifth block running at 448² (≈4× the compute and +0.6 M
parameters) only to be resized back down. ``num_upsamples`` therefore defaults to round(log2(T/h)),
which equals the benchmark's ⌈log2(H/h)⌉ for patch sizes 8, 14, 16 and 32 at native size and for
modest resizes (|log2(T/H)| < 0.3); pass it explicitly to override.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import DECODERS, Decoder
from ._heads import OutputConvs

WIDTH = 256


def deepest_level(levels: list[dict], tile_size: int) -> int:
    """Index of the level the light decoder reads: largest stride, then highest block, then last."""
    def key(i: int):
        lv = levels[i]
        return (float(lv.get("stride") or tile_size / max(lv["grid"])), lv.get("block", i), i)

    return max(range(len(levels)), key=key)


def default_upsamples(grid: list[int], tile_size: int) -> int:
    """round(log2(T / h)) (>= 0) for a level with grid (h, w); see the module docstring."""
    return max(0, round(math.log2(tile_size / max(grid))))


@DECODERS("light")
class LightDecoder(Decoder):
    """Single-scale decoder; see the module docstring.

    Args:
        levels, tile_size, head, num_classes: as ``Decoder``. All levels must still be passed to
            ``forward``; only the deepest is read.
        image_skip: not supported (the benchmark's decoder has none); True raises.
        num_upsamples: number of ×2 blocks; default ``default_upsamples`` of the deepest level.
        width: the decoder width D.
    """

    name = "light"

    def __init__(self, levels: list[dict], tile_size: int, head: str, num_classes: int, image_skip: bool = False,
                 num_upsamples: int | None = None, width: int = WIDTH):
        if image_skip:
            raise ValueError("the light decoder has no image skip; use decoder 'unetr' for image_skip=True")
        super().__init__(levels, tile_size, head, num_classes, image_skip)
        self.index = deepest_level(self.levels, self.tile_size)
        level = self.levels[self.index]
        n = default_upsamples(level["grid"], self.tile_size) if num_upsamples is None else int(num_upsamples)
        self.num_upsamples = n
        self.proj = nn.Conv2d(level["channels"], width, 1)
        blocks = []
        for _ in range(n):
            blocks += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.out = OutputConvs(width, self.maps)

    def config(self) -> dict:
        """As ``Decoder.config``, plus ``num_upsamples``."""
        return {**super().config(), "num_upsamples": self.num_upsamples}

    def _decode(self, feats: list[torch.Tensor], image: torch.Tensor | None) -> dict[str, torch.Tensor]:
        x = self.blocks(self.proj(feats[self.index]))
        size = (self.tile_size, self.tile_size)
        return {k: v if tuple(v.shape[-2:]) == size else F.interpolate(v, size=size, mode="bilinear",
                                                                         align_corners=False)
                for k, v in self.out(x).items()}
