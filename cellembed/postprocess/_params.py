"""CISCA post-processing constants (CISCA.md §3): the 20x / 40x sets and per-dataset minimum areas."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CiscaParams:
    """Constants of CISCA's ``postprocess`` (CISCA.md §3 table).

    Attributes:
        magnification: "20x" or "40x" (informative; the constants below carry the difference).
        min_area: final minimum instance area A_min in pixels (``small_objects_threshold``); seeds
            smaller than ``min_area // 4`` are dropped before erosion.
        contour_threshold: threshold th on the directional contour map (``th * th_lambda``).
        skeleton_square: side of the square that dilates the skeleton of the contour map (struct_rad).
        erosion_radius: radius of the disk that erodes the seeds (one iteration).
        min_seed_size: seeds smaller than this are dropped after erosion (min_resid_size).
        opening: footprint of the watershed-mask opening, "square" (3x3) or "cross" (disk(1)).
        mix_weight: distmapweight, the landscape weight of the blurred interior term; 1 - it on the
            body term, as in CISCA's code (0.5, so the two are equal).
        fg_threshold: foreground when P_boundary + P_body >= this.
    """

    magnification: str = "40x"
    min_area: int = 80
    contour_threshold: float = 0.57
    skeleton_square: int = 5
    erosion_radius: int = 2
    min_seed_size: int = 3
    opening: str = "square"
    mix_weight: float = 0.5
    fg_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.opening not in ("square", "cross"):
            raise ValueError(f"opening must be 'square' or 'cross', not {self.opening!r}")
        if self.min_area < 0 or self.min_seed_size < 0 or self.erosion_radius < 0 or self.skeleton_square < 1:
            raise ValueError(f"sizes must be non-negative (skeleton_square >= 1): {self}")

    @property
    def seed_min_area(self) -> int:
        """Seed-stage minimum area, ``int(A_min / 4)``."""
        return int(self.min_area / 4)


_P40 = CiscaParams()
_P20 = CiscaParams(magnification="20x", min_area=24, skeleton_square=3, erosion_radius=1, min_seed_size=2,
                   opening="cross")

CISCA_PRESETS: dict[str, CiscaParams] = {
    "40x": _P40,
    "20x": _P20,
    "pannuke": replace(_P40, min_area=50),
    "monuseg": replace(_P40, min_area=80),
    "cytodark0_40x": replace(_P40, min_area=80),
    "conic": replace(_P20, min_area=26),
    "cytodark0_20x": replace(_P20, min_area=20),
}
"""Named constant sets: "40x"/"20x" carry CISCA's defaults when A_min is unset (80 / 24); the dataset
names carry the A_min that CISCA used (PanNuke 50, MoNuSeg 80, CytoDArk0-40x 80, CoNIC 26,
CytoDArk0-20x 20)."""


@dataclass(frozen=True)
class HoverParams:
    """HoVer-Net ``__proc_np_hv`` constants (METRICS.md §3.1-3.2).

    Attributes:
        ksize: Sobel kernel size (21 at 40x; CellViT's 11 at 20x).
        min_marker: markers smaller than this are dropped (10 at 40x; CellViT's 3 at 20x).
        min_fg: foreground components smaller than this are dropped (10 always).
        np_threshold: foreground when NP >= this.
        energy_threshold: boundary energy at or above this is not marker.
    """

    ksize: int = 21
    min_marker: int = 10
    min_fg: int = 10
    np_threshold: float = 0.5
    energy_threshold: float = 0.4


HOVER_PRESETS: dict[str, HoverParams] = {"40x": HoverParams(), "20x": HoverParams(ksize=11, min_marker=3)}
