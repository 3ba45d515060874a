"""Segmentation decoders trained on cached frozen-encoder features (DESIGN.md §6).

    >>> import torch
    >>> from cellembed.decoders import build_decoder
    >>> levels = [{"name": f"block_{b}", "block": b, "channels": 64, "grid": [4, 4], "stride": 16.0}
    ...           for b in (3, 6, 9, 12)]
    >>> dec = build_decoder("unetr", levels, tile_size=64, head="cisca", num_classes=5)
    >>> out = dec([torch.randn(2, 64, 4, 4) for _ in levels])
    >>> {k: tuple(v.shape) for k, v in out.items()}
    {'classes': (2, 3, 64, 64), 'directions': (2, 4, 64, 64), 'types': (2, 6, 64, 64)}

Decoders (``DECODERS``): ``unetr`` (Mind the Gap, multi-level, optional raw-image skip) and ``light``
(the FM benchmark's single-scale decoder, about 2.6 M parameters). Heads (``HEADS``): ``cisca``,
``hovernet``, ``semantic``. Outputs are raw: logits for categorical maps, linear values for regression
maps; ``activate`` applies the softmaxes.
"""

from __future__ import annotations

from ._base import DECODERS, Decoder
from ._heads import HEADS, OutputMap, activate, head_maps
from ._light import LightDecoder
from ._unetr import UnetrDecoder, assign_slots

__all__ = [
    "DECODERS",
    "HEADS",
    "Decoder",
    "LightDecoder",
    "OutputMap",
    "UnetrDecoder",
    "activate",
    "assign_slots",
    "build_decoder",
    "head_maps",
]


def build_decoder(name: str, levels: list[dict], tile_size: int, head: str, num_classes: int,
                  image_skip: bool = False, **options) -> Decoder:
    """Build a registered decoder.

    Args:
        name: a name in ``DECODERS`` ("unetr", "light").
        levels: the cache manifest's levels, ``[{"name", "block", "channels", "grid": [h, w], "stride"}]``,
            in the order the feature maps will be passed to ``forward``.
        tile_size: tile side T; outputs are (N, k, T, T).
        head: a name in ``HEADS`` ("cisca", "hovernet", "semantic").
        num_classes: number of classes C (cisca: types head only when C > 1).
        image_skip: feed the raw (N, 3, T, T) uint8 tile to the decoder (unetr only).
        **options: decoder-specific options (light: ``num_upsamples``, ``width``).

    Returns:
        The decoder (``Decoder``), in training mode, on the CPU.
    """
    return DECODERS.get(name)(levels, tile_size, head, num_classes, image_skip=image_skip, **options)
