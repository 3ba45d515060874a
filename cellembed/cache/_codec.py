"""One tile ↔ one WebDataset sample: safetensors for arrays, PNG for the image, JSON for meta. No pickle."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FEATS = "feats.safetensors"
GT = "gt.safetensors"
IMAGE = "image.png"
META = "meta.json"
MEMBERS = (FEATS, GT, IMAGE, META)


class Sample(NamedTuple):
    """A decoded cache sample.

    Attributes:
        key: the tile key.
        feats: one (C, h, w) tensor per cached level, in manifest level order.
        prefix: one (P, C) tensor of prefix tokens (CLS + registers) per level, or None.
        image: (H, W, 3) uint8 RGB.
        inst_map: (H, W) int32, 0 = background.
        type_map: (H, W) uint8, 0 = background.
        meta: the tile's JSON meta (tissue, group, ...).
    """

    key: str
    feats: list[torch.Tensor]
    prefix: list[torch.Tensor] | None
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray
    meta: dict


def sample_key(key: str) -> str:
    """The WebDataset ``__key__`` of a tile: dots split keys from extensions, so they are escaped."""
    return key.replace("%", "%25").replace(".", "%2E")


def prefix_name(level_name: str) -> str:
    """The safetensors name of a level's prefix tokens: ``"block_5"`` → ``"prefix_5"``."""
    return "prefix_" + level_name.split("_", 1)[1]


def encode_image(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB → PNG bytes: every row "Up"-filtered, deflated with zlib level 1 and the RLE strategy.

    A plain PNG that any reader decodes; about 2.4x faster to write than Pillow's level 1 (1.7 vs 4.1 ms for a
    256² H&E tile) for ~10% more bytes, and deterministic for a given zlib.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w, _ = image.shape
    rows = np.ascontiguousarray(image).reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 2  # filter type Up: each byte minus the byte above (the first row has a zero row above)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = deflate.compress(raw) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, adaptive filters, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def encode_gt(inst_map: np.ndarray, type_map: np.ndarray) -> bytes:
    return st_save({"inst_map": torch.from_numpy(np.ascontiguousarray(inst_map, dtype=np.int32)),
                    "type_map": torch.from_numpy(np.ascontiguousarray(type_map, dtype=np.uint8))})


def encode_feats(feats: dict[str, torch.Tensor]) -> bytes:
    """feats: name → contiguous CPU tensor, e.g. ``{"block_5": (C, h, w), "prefix_5": (P, C)}``."""
    return st_save({k: v.contiguous() for k, v in feats.items()})


def encode_meta(key: str, index: int, meta: dict) -> bytes:
    return json.dumps({"key": key, "index": index, "meta": meta}, sort_keys=True).encode()


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Append one file with fixed ownership and mtime so that shard bytes are reproducible."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "cellembed"
    tar.addfile(info, io.BytesIO(payload))


def decode_sample(parts: dict[str, bytes], level_names: list[str], source: str = "") -> Sample:
    """Decode the members of one sample (member suffix → bytes) into a :class:`Sample`.

    Raises:
        ValueError: a member is missing or undecodable; the message names ``source`` (the shard).
    """
    missing = [m for m in MEMBERS if m not in parts]
    if missing:
        raise ValueError(f"{source}: sample is missing {missing}; the shard is corrupt, rerun extract to rebuild it")
    meta = json.loads(parts[META])
    feats = st_load(parts[FEATS])
    gt = st_load(parts[GT])
    try:
        levels = [feats[n] for n in level_names]
    except KeyError as err:
        raise ValueError(f"{source}: sample {meta['key']!r} lacks level {err}; cache does not match its manifest") from None
    has_prefix = bool(level_names) and prefix_name(level_names[0]) in feats
    prefix = [feats[prefix_name(n)] for n in level_names] if has_prefix else None
    image = np.asarray(Image.open(io.BytesIO(parts[IMAGE])).convert("RGB"))
    return Sample(meta["key"], levels, prefix, image, gt["inst_map"].numpy(), gt["type_map"].numpy(), meta["meta"])
