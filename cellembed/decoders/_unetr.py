"""UNETR-style multi-level decoder of "Mind the Gap" (DESIGN.md §6).

Four decoder levels with (32, 64, 128, 256) channels at reductions (2, 4, 8, 16) of the tile. Each
cached level is projected by a 1×1 conv block (conv, BatchNorm, ReLU) to its decoder level's width and
bilinearly resized to that level's grid. From the deepest level up: ×2 upsample (2×2 transposed conv
to the next width), concatenate the level's skip, 3×3 conv + ReLU. A last ×2 upsample reaches full
resolution, where the head's 1×1 convolutions predict the maps.

Two full-resolution designs (``refine``):

* ``refine=True`` (the default): every fuse conv is conv + BatchNorm + ReLU; with ``image_skip`` an image
  branch (CellViT's decoder0, HoVer-Net-style high-resolution path) runs a 3×3 conv block on the raw tile at
  full resolution and a stride-2 conv block from it at half resolution, the latter concatenated into the
  reduction-2 fuse; at full resolution the upsampled decoder features (``full_channels`` wide) are
  concatenated with the image features and refined by two 3×3 conv blocks before the heads. Nuclei are
  10–20 px wide at 40x, so boundaries between touching nuclei, and the sharp +1 → −1 steps of the
  directional maps that CISCA's post-processing cuts along, need this full-resolution information: on
  CoNSeP (EfficientNet-Lite0, 10 epochs, one seed) it moved test PQ from 0.200 to 0.307
  (``benchmarks/results/ablation_consep_cpu.md``, step 2).
* ``refine=False``: Mind the Gap's narrow design, one 3×3 conv + ReLU at 16 channels at full resolution
  (after an optional single 3×3 conv image skip), no BatchNorm in the fuse convs; kept for the ablation and
  for reading older runs. Full-resolution work is the whole cost of a cached epoch (DESIGN.md §6 speed
  note); ``benchmarks/cache_vs_live.py`` measures both.

Type map (``type_branch``, on by default): the categorical map that is read per instance (cisca "types",
hovernet "nc") comes from its own branch on the reduction-2 features (3×3 conv block + 1×1 conv, bilinearly
resized to full resolution) instead of sharing the 16 full-resolution channels with the 3-class and
directional maps. Post-processing sums type probabilities over each instance, so the map needs context more
than pixel precision. On the synthetic demo (``cellembed demo``) the shared design predicted every nucleus
as one class (test mPQ+ 0.117, PQ 0.720); with the branch, mPQ+ 0.617 at PQ 0.722 (same data, 20 epochs).
Runs recorded before the option existed load without it.

Mapping k cached levels onto the four decoder levels (``assign_slots``): cached levels are ranked from
shallow to deep by (stride, block, position). With k <= 4 they fill the *deepest* k decoder levels in
order, so the deepest cached level always feeds reduction 16 (k = 4: one each; ViT blocks (3, 6, 9, 12)
→ reductions (2, 4, 8, 16); ConvNeXt stages at strides 4..32 → 2..16); decoder levels left without a
cached level are plain upsampling steps (no concatenation). With k > 4, rank r goes to level
floor(4r / k), and the projections that share a level are summed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import DECODERS, Decoder, image_to_float
from ._heads import OutputConvs

CHANNELS = (32, 64, 128, 256)
REDUCTIONS = (2, 4, 8, 16)
FULL_CHANNELS = 16
"""Width of the full-resolution conv of the narrow (``refine=False``) design."""
REFINE_CHANNELS = 16
"""Default width of the full-resolution refinement (``refine=True``)."""
REFINE_DEPTH = 2
"""3×3 conv blocks at full resolution in the refinement."""
QUARTER_CHANNELS = 32
"""Width of the image branch's 1/4-resolution block (``image_levels=3``)."""
TYPE_KEYS = ("types", "nc")
"""Maps that ``type_branch`` predicts at half resolution (read per instance by soft voting, so they need
context more than pixel precision)."""


def _stride(level: dict, tile_size: int) -> float:
    return float(level.get("stride") or tile_size / max(level["grid"]))


def assign_slots(levels: list[dict], tile_size: int) -> list[int]:
    """Decoder level (0..3, i.e. reduction 2..16) fed by each cached level, in ``levels`` order.

    Args:
        levels: cached levels (need "grid"; "stride" and "block" used when present).
        tile_size: tile side T.

    Returns:
        One slot per level; the deepest level gets 3.
    """
    k, n = len(levels), len(CHANNELS)
    rank = sorted(range(k), key=lambda i: (_stride(levels[i], tile_size), levels[i].get("block", i), i))
    slots = [0] * k
    for r, i in enumerate(rank):
        slots[i] = n - k + r if k <= n else r * n // k
    return slots


def _conv3x3_relu(c_in: int, c_out: int, norm: bool = False, stride: int = 1) -> nn.Sequential:
    if not norm:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def _project(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize (N, C, h, w) to ``size`` unless it already has it."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@DECODERS("unetr")
class UnetrDecoder(Decoder):
    """Mind the Gap's UNETR-style decoder; see the module docstring for the architecture.

    Args: as ``Decoder``.
    """

    name = "unetr"

    def __init__(self, levels: list[dict], tile_size: int, head: str, num_classes: int, image_skip: bool = False,
                 refine: bool = True, full_channels: int | None = None, image_levels: int = 2,
                 type_branch: bool = True, level_depth: int = 1, split_trunks: bool = False):
        super().__init__(levels, tile_size, head, num_classes, image_skip)
        self.refine = bool(refine)
        self.full_channels = int(full_channels or (REFINE_CHANNELS if self.refine else FULL_CHANNELS))
        if self.full_channels < 1:
            raise ValueError(f"full_channels must be >= 1, got {full_channels}")
        if int(image_levels) not in (2, 3):
            raise ValueError(f"image_levels must be 2 (full and 1/2 resolution) or 3 (also 1/4), got {image_levels}")
        self.image_levels = int(image_levels)
        if int(level_depth) < 1:
            raise ValueError(f"level_depth must be >= 1, got {level_depth}")
        self.level_depth = int(level_depth)
        self.slots = assign_slots(self.levels, self.tile_size)
        base = math.ceil(self.tile_size / REDUCTIONS[-1])
        # Each level's grid doubles the one below it, so the transposed convs never need a resize.
        self.grids = [(base * 2 ** (3 - j),) * 2 for j in range(4)]
        self.proj = nn.ModuleList(_project(lv["channels"], CHANNELS[s]) for lv, s in zip(self.levels, self.slots))
        fed = set(self.slots)
        norm, f = self.refine, self.full_channels
        half_image = self.image_skip and self.refine
        self.up = nn.ModuleList(nn.ConvTranspose2d(CHANNELS[j + 1], CHANNELS[j], 2, stride=2) for j in range(3))
        quarter = QUARTER_CHANNELS if half_image and self.image_levels == 3 else 0
        extra = (f if half_image else 0, quarter, 0)
        more = self.level_depth - 1
        fuse = [_conv3x3_relu(CHANNELS[j] * (2 if j in fed else 1) + extra[j], CHANNELS[j], norm) for j in range(3)]
        if more:  # level_depth 1 keeps the original parameter names, so older runs load
            fuse = [nn.Sequential(first, *(_conv3x3_relu(CHANNELS[j], CHANNELS[j], norm) for _ in range(more)))
                    for j, first in enumerate(fuse)]
        self.fuse = nn.ModuleList(fuse)
        # the deepest level has no fuse conv of its own: with level_depth > 1 it gets level_depth - 1 blocks
        self.bottom = nn.Sequential(*(_conv3x3_relu(CHANNELS[3], CHANNELS[3], norm) for _ in range(more)))
        self.up_full = nn.ConvTranspose2d(CHANNELS[0], f, 2, stride=2)
        self.image_conv = _conv3x3_relu(3, f, norm) if self.image_skip else None
        self.image_half = _conv3x3_relu(f, f, norm, stride=2) if half_image else None
        self.image_quarter = (nn.Sequential(_conv3x3_relu(f, quarter, True, stride=2),
                                            _conv3x3_relu(quarter, quarter, True)) if quarter else None)
        full_in = f * (2 if self.image_skip else 1)
        refine_stack = lambda: nn.Sequential(*(_conv3x3_relu(full_in if i == 0 else f, f, True)
                                                 for i in range(REFINE_DEPTH)))
        self.split_trunks = bool(split_trunks) and self.refine
        if self.split_trunks:
            self.full = None  # one refinement stack per full-resolution map, CISCA-style separate heads
        elif self.refine:
            self.full = refine_stack()
        else:
            self.full = _conv3x3_relu(full_in, f)
        # the categorical map read per instance (cisca "types", hovernet "nc") from its own half-resolution branch
        typed = [m for m in self.maps if m.key in TYPE_KEYS] if type_branch else []
        self.type_branch = bool(typed)
        self.type_key = typed[0].key if typed else None
        if typed:
            self.types = nn.Sequential(_conv3x3_relu(CHANNELS[0], CHANNELS[0], True),
                                       nn.Conv2d(CHANNELS[0], typed[0].channels, 1))
        full_maps = tuple(m for m in self.maps if m.key != self.type_key)
        if self.split_trunks:
            self.trunks = nn.ModuleDict({m.key: refine_stack() for m in full_maps})
            self.outs = nn.ModuleDict({m.key: OutputConvs(f, (m,)) for m in full_maps})
        else:
            self.out = OutputConvs(f, full_maps)

    def config(self) -> dict:
        """As ``Decoder.config``, plus ``refine``, ``full_channels``, ``image_levels``, ``type_branch``,
        ``level_depth`` and ``split_trunks``."""
        return {**super().config(), "refine": self.refine, "full_channels": self.full_channels,
                "image_levels": self.image_levels, "type_branch": self.type_branch, "level_depth": self.level_depth,
                "split_trunks": self.split_trunks}

    def _skips(self, feats: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Project and resize every cached level onto its decoder level; sum those sharing a level."""
        skips: list[torch.Tensor | None] = [None] * len(CHANNELS)
        for f, proj, s in zip(feats, self.proj, self.slots):
            y = _fit(proj(f), self.grids[s])
            skips[s] = y if skips[s] is None else skips[s] + y
        return skips

    def _decode(self, feats: list[torch.Tensor], image: torch.Tensor | None) -> dict[str, torch.Tensor]:
        skips = self._skips(feats)
        img = self.image_conv(image_to_float(image)) if self.image_conv is not None else None
        if self.image_half is not None:
            half = self.image_half(img)
            if self.image_quarter is not None:
                q = _fit(self.image_quarter(half), self.grids[1])
                skips[1] = q if skips[1] is None else torch.cat([skips[1], q], dim=1)
            half = _fit(half, self.grids[0])
            skips[0] = half if skips[0] is None else torch.cat([skips[0], half], dim=1)
        x = self.bottom(skips[-1])
        for j in (2, 1, 0):
            x = self.up[j](x)
            if skips[j] is not None:
                x = torch.cat([x, skips[j]], dim=1)
            x = self.fuse[j](x)
        types = _fit(self.types(x), (self.tile_size, self.tile_size)) if self.type_branch else None
        x = _fit(self.up_full(x), (self.tile_size, self.tile_size))
        if img is not None:
            x = torch.cat([x, img], dim=1)
        if self.split_trunks:
            out = {k: v for key, trunk in self.trunks.items() for k, v in self.outs[key](trunk(x)).items()}
        else:
            out = self.out(self.full(x))
        if types is not None:
            out = {m.key: types if m.key == self.type_key else out[m.key] for m in self.maps}
        return out
