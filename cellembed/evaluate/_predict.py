"""Decoder outputs to scored instances: shared by validation during training, ``score`` and ``tune``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

INSTANCE_HEADS = ("cisca", "hovernet")


@dataclass(frozen=True)
class Postprocess:
    """How a run turns its decoder's maps into instances; saved with the run in ``config.json``.

    Attributes:
        head: "cisca", "hovernet" or "semantic" (no instances: pixel classes only).
        preset: cisca: a ``CISCA_PRESETS`` name ("40x", "20x", "pannuke", "conic", ...); hovernet: "40x"
            or "20x" (at 20x, processed at x2 then resized back).
        min_area: final minimum instance area in pixels; None keeps the preset's (cisca) or the published
            filters only (hovernet). ``cellembed tune`` picks it on a validation cache.
    """

    head: str = "cisca"
    preset: str = "40x"
    min_area: int | None = None

    def __post_init__(self) -> None:
        from cellembed.postprocess import CISCA_PRESETS, HOVER_PRESETS

        presets = {"cisca": CISCA_PRESETS, "hovernet": HOVER_PRESETS}.get(self.head)
        if presets is not None and self.preset not in presets:
            raise ValueError(f"unknown {self.head} post-processing preset {self.preset!r}; valid: "
                             f"{', '.join(presets)}")
        if self.min_area is not None and self.min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def effective_min_area(self) -> int:
        """The area filter in force (cisca: the preset's unless overridden; hovernet: 0 unless set)."""
        if self.min_area is not None:
            return self.min_area
        if self.head == "cisca":
            from cellembed.postprocess import CISCA_PRESETS

            return CISCA_PRESETS[self.preset].min_area
        return 0

    def instances(self, maps: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(inst_map int32, type_map uint8) of one tile from its activated maps (each (k, T, T) float32)."""
        from cellembed.postprocess import (
            CISCA_PRESETS,
            cisca_instances,
            hover_instances,
        )

        if self.head == "cisca":
            params = CISCA_PRESETS[self.preset]
            if self.min_area is not None:
                params = replace(params, min_area=self.min_area)
            return cisca_instances(maps["classes"], maps["directions"], maps.get("types"), params)
        if self.head == "hovernet":
            inst, types = hover_instances(maps["np"][1], maps["hv"], maps.get("nc"), magnification=self.preset)
            if self.min_area:
                inst, types = _drop_small(inst, types, self.min_area)
            return inst, types
        raise ValueError("the semantic head has no instances")


def _drop_small(inst: np.ndarray, types: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    from cellembed.postprocess._ops import remove_small

    kept = remove_small(inst, min_area)
    return kept, np.where(kept > 0, types, 0).astype(types.dtype)


def default_postprocess(head: str, manifest: dict, magnification: str) -> Postprocess:
    """The post-processing CISCA used for the cache's dataset (its minimum area), else the magnification's."""
    if head not in INSTANCE_HEADS:
        return Postprocess(head=head, preset=magnification)
    dataset = manifest.get("identity", {}).get("dataset", {}).get("dataset")
    if head == "cisca":
        by_dataset = {"pannuke": "pannuke", "conic": "conic", "cytodark0": f"cytodark0_{magnification}"}
        return Postprocess(head, by_dataset.get(dataset, magnification))
    return Postprocess(head, magnification)


@torch.no_grad()
def decoder_maps(model: torch.nn.Module, batch, device: torch.device, tta: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the decoder on a batch: (raw outputs as float32 tensors, activated maps as (B, k, T, T) numpy).

    ``tta``: test-time augmentation over the dihedral group: the decoder runs on the eight flips / quarter
    turns of the cached levels and the image (the four without a quarter turn when a level's grid is not
    square), each prediction's activated maps are brought back to the tile's frame (directional maps with
    their channels and signs, ``undo_dihedral_maps``) and averaged. The raw outputs returned are the
    identity variant's. Not part of the CISCA / Mind the Gap protocol (CISCA.md §3: no TTA); off by default.
    """
    from cellembed.cache._augment import allowed_variants, dihedral, undo_dihedral_maps
    from cellembed.decoders import activate

    image = batch.image if model.image_skip else None
    variants = allowed_variants([tuple(f.shape[-2:]) for f in batch.feats]) if tta else [0]
    raw, total = None, None
    for v in variants:
        feats = [dihedral(f, v) for f in batch.feats]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model(feats, None if image is None else dihedral(image, v))
        outputs = {k: x.float() for k, x in outputs.items()}
        raw = outputs if raw is None else raw
        maps = undo_dihedral_maps(activate(model.head, outputs), v)
        total = maps if total is None else {k: total[k] + x for k, x in maps.items()}
    maps = {k: (x / len(variants)).cpu().numpy() for k, x in total.items()}
    return raw, maps


def batch_instances(maps: dict[str, np.ndarray], post: Postprocess, workers: int | None = None) -> np.ndarray:
    """(B, T, T, 2) int32 (instance, type) predictions of a batch of activated maps; the tiles are
    post-processed on ``workers`` threads (default one per core, ``postprocess.map_tiles``)."""
    from cellembed.postprocess import map_tiles

    n = next(iter(maps.values())).shape[0]
    tiles = map_tiles(lambda i: post.instances({k: v[i] for k, v in maps.items()}), range(n), workers)
    out = np.zeros((n, *tiles[0][0].shape, 2), np.int32)
    for i, (inst, types) in enumerate(tiles):
        out[i, ..., 0], out[i, ..., 1] = inst, types
    return out


def true_maps(batch) -> np.ndarray:
    """(B, T, T, 2) int32 ground truth (instance, type) of a batch (as served, i.e. after any augmentation)."""
    inst = batch.targets["inst_map"].cpu().numpy().astype(np.int32)
    types = batch.targets["type_map"].cpu().numpy().astype(np.int32)
    return np.stack([inst, types], -1)


def semantic_counts(maps: dict[str, np.ndarray], batch, num_classes: int) -> np.ndarray:
    """(K, 3) pixel counts (intersection, predicted, true) per class of a semantic batch."""
    pred = maps["semantic"].argmax(1)
    true = batch.targets["semantic"].cpu().numpy()
    out = np.zeros((num_classes, 3), np.int64)
    for c in range(num_classes):
        p, t = pred == c, true == c
        out[c] = (p & t).sum(), p.sum(), t.sum()
    return out


def semantic_summary(counts: np.ndarray) -> dict:
    """Mean IoU and mean Dice over the classes present in the ground truth or the prediction."""
    inter, pred, true = counts[:, 0].astype(float), counts[:, 1].astype(float), counts[:, 2].astype(float)
    seen = (pred + true) > 0
    iou = inter[seen] / (pred + true - inter)[seen]
    dice = 2 * inter[seen] / (pred + true)[seen]
    return {"miou": float(iou.mean()) if seen.any() else None, "mdice": float(dice.mean()) if seen.any() else None}


def iter_predictions(model, loader, device, post: Postprocess) -> Iterator[tuple[object, dict, np.ndarray]]:
    """(batch, raw outputs, (B, T, T, 2) predictions) for every batch of ``loader``, model in eval mode."""
    model.eval()
    for batch in loader:
        outputs, maps = decoder_maps(model, batch, device)
        yield batch, outputs, maps, batch_instances(maps, post)
