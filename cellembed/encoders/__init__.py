"""Frozen vision encoders: presets, weights, block selection, one-pass multi-depth features.

>>> from cellembed.encoders import build_encoder
>>> enc = build_encoder("test_vit", weights="random", tile_size=64)
>>> import torch
>>> out = enc(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
>>> [tuple(f.shape) for f in out.feats]
[(2, 64, 10, 10), (2, 64, 10, 10), (2, 64, 10, 10)]
"""

from ._build import INPUT_POLICIES, build_encoder
from ._frozen import FrozenEncoder
from ._spec import EncoderOutput, EncoderSpec, GatedModelError, LevelInfo, resolve_blocks
from ._specs import ENCODERS, get_spec, list_specs

__all__ = [
    "ENCODERS", "EncoderOutput", "EncoderSpec", "FrozenEncoder", "GatedModelError", "INPUT_POLICIES",
    "LevelInfo", "build_encoder", "get_spec", "list_specs", "resolve_blocks",
]
