"""Feature-space dihedral augmentation and per-sample training targets for the cache reader.

A dihedral variant ``v`` in 0..7 is ``flip = v >= 4`` (mirror the column axis) followed by ``k = v % 4``
counter-clockwise quarter turns (``torch.rot90(x, k, dims=(-2, -1))``). It acts on the last two axes, so the
same variant applies unchanged to a level (N, C, h, w), an image (N, 3, T, T) and a map (N, T, T). Tiles are
square and every level of an encoder run at a square input covers the tile exactly, so transforming a
level's grid equals transforming the image it was computed from, cell for cell.
"""

from __future__ import annotations

import numpy as np
import torch

N_DIHEDRAL = 8
HEADS = ("cisca", "hovernet", "semantic")


def dihedral(x: torch.Tensor, v: int) -> torch.Tensor:
    """Variant ``v`` (0..7) of ``x`` over its last two axes (row, col); 0 is the identity."""
    if v >= 4:
        x = x.flip(-1)
    return torch.rot90(x, v % 4, dims=(-2, -1)) if v % 4 else x


def dihedral_np(a: np.ndarray, v: int) -> np.ndarray:
    """numpy twin of :func:`dihedral` (returns a contiguous copy)."""
    if v >= 4:
        a = np.flip(a, -1)
    return np.ascontiguousarray(np.rot90(a, v % 4, axes=(-2, -1)))


def allowed_variants(grids: list[tuple[int, int]]) -> list[int]:
    """Variants that keep every grid's shape: all 8 when every grid is square, else the 4 without a quarter turn.

    A quarter turn of an (h, w) grid with h != w gives (w, h), which cannot be batched with unrotated samples.
    """
    if all(h == w for h, w in grids):
        return list(range(N_DIHEDRAL))
    return [0, 2, 4, 6]


def dihedral_batch(x: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
    """Apply ``variants[i]`` to ``x[i]`` for a batch (B, ..., h, w); one kernel per distinct variant.

    Args:
        x: (B, ..., h, w) any dtype, any device; h == w unless every variant keeps the shape.
        variants: (B,) int64 on CPU.
    """
    if not bool(variants.any()):
        return x
    out = torch.empty_like(x)
    for v in variants.unique().tolist():
        idx = (variants == v).nonzero().flatten().to(x.device)
        out[idx] = dihedral(x.index_select(0, idx), v)
    return out


def sample_targets(inst_map: np.ndarray, type_map: np.ndarray, head: str, magnification: str) -> dict[str, torch.Tensor]:
    """The training targets of one (already augmented) sample, in compact dtypes (see :func:`finish_targets`).

    Args:
        inst_map: (T, T) int32 instance map, 0 = background.
        type_map: (T, T) uint8 type map, 0 = background.
        head: "cisca" | "hovernet" | "semantic".
        magnification: "20x" | "40x" (cisca only).

    Returns:
        cisca: classes (T, T) uint8, directions (4, T, T) float32, types (T, T) uint8, weights (T, T) float32;
        hovernet: np (T, T) uint8, hv (2, T, T) float32, nc (T, T) uint8; semantic: semantic (T, T) uint8.
    """
    if head == "cisca":
        from cellembed.targets import cisca_targets

        t = cisca_targets(inst_map, type_map, magnification=magnification)
        out = {"classes": t.classes, "directions": t.directions, "types": t.types, "weights": t.weights}
    elif head == "hovernet":
        from cellembed.targets import hover_targets

        out = hover_targets(inst_map, type_map)._asdict()
    else:
        out = {"semantic": type_map}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


LONG_TARGETS = ("classes", "types", "np", "nc", "semantic", "type_map")


def finish_targets(compact: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move stacked compact targets to ``device`` and widen class maps to int64 there (small transfers)."""
    out = {}
    for name, t in compact.items():
        t = t.to(device, non_blocking=True)
        out[name] = t.long() if name in LONG_TARGETS else t
    return out


def stack_targets(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample target dicts into (B, ...) tensors."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


DIRECTION_MAP = {
    0: ((0, 1), (1, 1), (2, 1), (3, 1)),
    1: ((1, 1), (0, -1), (3, -1), (2, 1)),
    2: ((0, -1), (1, -1), (2, -1), (3, -1)),
    3: ((1, -1), (0, 1), (3, 1), (2, -1)),
    4: ((0, -1), (1, 1), (3, -1), (2, -1)),
    5: ((1, 1), (0, 1), (2, 1), (3, -1)),
    6: ((0, 1), (1, -1), (3, 1), (2, 1)),
    7: ((1, -1), (0, -1), (2, -1), (3, 1)),
}
"""CISCA's directional maps (h, v, tl, bl) under variant ``v``: channel j of the variant's maps is
``sign * dihedral(maps, v)[src]`` for ``(src, sign) = DIRECTION_MAP[v][j]``."""


def dihedral_targets(targets: dict[str, torch.Tensor], v: int) -> dict[str, torch.Tensor]:
    """Variant ``v`` of a sample's CISCA or semantic targets from those of its unaugmented maps.

    Equal to computing the targets on the transformed maps (every CISCA step uses symmetric footprints and
    whole-component rules; the ramps only swap and change sign) when ``dihedral_safe`` holds for the
    sample's instance map; tested on synthetic and CoNSeP tiles for all eight variants.
    """
    out = {k: dihedral(x, v).contiguous() for k, x in targets.items()}
    if "directions" in out:
        d = out["directions"]
        out["directions"] = torch.stack([d[i] if s > 0 else -d[i] for i, s in DIRECTION_MAP[v]])
    return out


def dihedral_inverse(x: torch.Tensor, v: int) -> torch.Tensor:
    """Undo :func:`dihedral`: ``dihedral_inverse(dihedral(x, v), v) == x``."""
    if v % 4:
        x = torch.rot90(x, -(v % 4), dims=(-2, -1))
    return x.flip(-1) if v >= 4 else x


VECTOR_MAPS = {"directions": 4, "hv": 2}
"""Regression maps whose channels are ramps along a direction (CISCA h, v, tl, bl; HoVer-Net x, y): a flip or
quarter turn swaps channels and changes signs (``DIRECTION_MAP``; HoVer-Net's x, y behave as CISCA's h, v)."""


def undo_dihedral_maps(maps: dict[str, torch.Tensor], v: int) -> dict[str, torch.Tensor]:
    """Maps (N, k, T, T) predicted on variant ``v`` of the input, brought back to the input's frame.

    Categorical and scalar maps are un-rotated; directional maps also get their channels and signs back:
    the prediction's channel j estimates ``sign * dihedral(maps, v)[src]`` for ``(src, sign) =
    DIRECTION_MAP[v][j]``, so ``maps[src] = sign * dihedral_inverse(prediction[j], v)``.
    """
    out = {}
    for key, x in maps.items():
        k = VECTOR_MAPS.get(key)
        if k is None or x.shape[1] != k:
            out[key] = dihedral_inverse(x, v)
            continue
        back = [None] * k
        for j, (src, sign) in enumerate(DIRECTION_MAP[v][:k]):
            back[src] = dihedral_inverse(x[:, j] if sign > 0 else -x[:, j], v)
        out[key] = torch.stack(back, 1)
    return out


class TargetMemo:
    """Targets memoised per (sample row, variant) up to a byte budget; beyond it they are recomputed.

    Computing CISCA targets costs ~7 ms per 256² tile on one core, far more than a decoder step on a GPU, so
    RAM and GPU modes compute each sample's targets once (once per variant where a variant cannot be derived
    by flipping, see ``get``). Entries live on ``device`` (GPU mode) or host.
    """

    def __init__(self, head: str, magnification: str, budget_bytes: int, device: torch.device):
        self.head, self.magnification = head, magnification
        self.budget, self.device, self.used = budget_bytes, device, 0
        self.store: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.safe: dict[int, bool] = {}

    def get(self, row: int, v: int, inst_map: np.ndarray, type_map: np.ndarray) -> dict[str, torch.Tensor]:
        """Targets of sample ``row`` under variant ``v``; ``inst_map``/``type_map`` are its unaugmented maps.

        CISCA and semantic targets of a variant are the unaugmented ones flipped/rotated (``dihedral_targets``,
        on the memo's device), so only variant 0 is computed and kept; HoVer-Net's maps (rounded centres) and
        the rare CISCA tile with a diagonal-line instance are computed per variant.
        """
        hit = self.store.get((row, v))
        if hit is not None:
            return hit
        if v and self._transformable(row, inst_map):
            return dihedral_targets(self.get(row, 0, inst_map, type_map), v)
        return self.put(row, v, sample_targets(dihedral_np(inst_map, v), dihedral_np(type_map, v), self.head,
                                               self.magnification))

    def _transformable(self, row: int, inst_map: np.ndarray) -> bool:
        if self.head == "semantic":
            return True
        if self.head != "cisca":
            return False
        if row not in self.safe:
            from cellembed.targets._directions import dihedral_safe

            self.safe[row] = dihedral_safe(np.ascontiguousarray(inst_map, dtype=np.int64))
        return self.safe[row]

    def put(self, row: int, v: int, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep ``targets`` (from :func:`sample_targets`) of (row, v) if the budget allows; returns them on device."""
        size = sum(x.numel() * x.element_size() for x in targets.values())
        targets = {k: x.to(self.device) for k, x in targets.items()}
        if self.used + size <= self.budget:
            self.store[(row, v)] = targets
            self.used += size
        return targets
