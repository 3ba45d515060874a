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


SEMANTIC_IGNORE = 255
"""Ground-truth value of unlabelled pixels (``cellembed.data.IGNORE``): counted in no class."""


def semantic_counts(maps: dict[str, np.ndarray], batch, num_classes: int) -> np.ndarray:
    """(K, 3) pixel counts (intersection, predicted, true) per class of a semantic batch (ignored pixels left out)."""
    return class_pixel_counts(maps["semantic"].argmax(1), batch.targets["semantic"].cpu().numpy(), num_classes)


def class_pixel_counts(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class pixel counts of class maps.

    Args:
        pred: (..., H, W) integer predicted classes 0..K-1.
        true: same shape, ground-truth classes 0..K-1, or ``SEMANTIC_IGNORE`` (those pixels are not counted,
            in the prediction either).
        num_classes: K.

    Returns:
        (K, 3) int64: intersection |P ∩ T|, predicted |P|, true |T| of every class.
    """
    valid = true != SEMANTIC_IGNORE
    p, t = pred[valid].astype(np.int64), true[valid].astype(np.int64)
    out = np.zeros((num_classes, 3), np.int64)
    out[:, 0] = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    out[:, 1] = np.bincount(p, minlength=num_classes)[:num_classes]
    out[:, 2] = np.bincount(t, minlength=num_classes)[:num_classes]
    return out


def semantic_scores(counts: np.ndarray, class_names) -> dict:
    """Dice and IoU per class and their means, from pixel counts pooled over a whole split.

    Dice_c = 2 |P_c ∩ T_c| / (|P_c| + |T_c|) and IoU_c = |P_c ∩ T_c| / |P_c ∪ T_c|, the counts summed over every
    pixel of every image first (not a mean of per-image scores). Every class of ``class_names`` counts, class 0
    too (whether or not it is a background); a class absent from both the ground truth and the prediction has
    no score (None) and is left out of the means. mDice / mIoU = unweighted mean over the scored classes (the FM
    benchmark's "mean over classes"). Ignored pixels (``SEMANTIC_IGNORE``) are in no count.

    Args:
        counts: (K, 3) from :func:`class_pixel_counts` (intersection, predicted, true), summed over the split.
        class_names: the K class names.

    Returns:
        ``{"summary": {"mdice", "miou", "pixel_accuracy"}, "per_class": {"<id>": {"name", "dice", "iou",
        "intersection", "predicted", "true"}}}``.
    """
    counts = np.asarray(counts, np.int64)
    per_class, dice, iou = {}, [], []
    for c, (inter, pred, true) in enumerate(counts.tolist()):
        d = 2 * inter / (pred + true) if pred + true else None
        j = inter / (pred + true - inter) if pred + true else None
        if d is not None:
            dice.append(d)
            iou.append(j)
        per_class[str(c)] = {"name": str(class_names[c]) if c < len(class_names) else str(c), "dice": d, "iou": j,
                             "intersection": inter, "predicted": pred, "true": true}
    total = int(counts[:, 2].sum())
    summary = {"mdice": float(np.mean(dice)) if dice else None, "miou": float(np.mean(iou)) if iou else None,
               "pixel_accuracy": int(counts[:, 0].sum()) / total if total else None}
    return {"summary": summary, "per_class": per_class}


def semantic_summary(counts: np.ndarray) -> dict:
    """Mean IoU and mean Dice over the classes present in the ground truth or the prediction."""
    s = semantic_scores(counts, [str(c) for c in range(len(counts))])["summary"]
    return {"miou": s["miou"], "mdice": s["mdice"]}


def iter_predictions(model, loader, device, post: Postprocess) -> Iterator[tuple[object, dict, np.ndarray]]:
    """(batch, raw outputs, (B, T, T, 2) predictions) for every batch of ``loader``, model in eval mode."""
    model.eval()
    for batch in loader:
        outputs, maps = decoder_maps(model, batch, device)
        yield batch, outputs, maps, batch_instances(maps, post)
