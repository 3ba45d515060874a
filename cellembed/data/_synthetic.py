"""Seeded H&E-like tiles with touching nuclei of several types (tests, demo, benchmarks).

Each tile is a pure function of ``(seed, index, size, n_types)``. Nuclei are laid out in
clusters whose members are placed against a previous member, so many nuclei touch (share a
boundary), which is what boundary-aware targets need. The image is rendered with
Beer–Lambert optical densities of a hematoxylin and an eosin stain vector (jittered per tile):
a textured pink stroma with pale lumina, and nuclei whose size, shape, darkness and chromatin
texture depend on their type.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage
from skimage import draw, measure

from ._base import DATASETS, Tile, TileSource, finish_tile
from ._folder import write_folder_dataset

GENERATOR_VERSION = 1
"""Bump when the pixels or labels produced for a given (seed, index) change."""


class NucleusType(NamedTuple):
    """Appearance of one synthetic nucleus type (lengths in pixels of a 256² tile)."""

    name: str
    radius: tuple[float, float]   # semi-major axis range
    aspect: tuple[float, float]   # minor / major axis ratio range
    wobble: float                 # boundary irregularity, fraction of the radius
    stain: tuple[float, float]    # hematoxylin optical density range (darkness)
    grain: float                  # fine chromatin texture amplitude
    blotch: float                 # coarse (vesicular) texture amplitude
    rim: float                    # extra density on the nuclear membrane
    lobes: int                    # 1, or the number of lobes (neutrophil-like)
    cluster: tuple[int, int]      # nuclei per cluster


NUCLEUS_TYPES = (
    NucleusType("epithelial", (8.0, 11.0), (0.65, 0.95), 0.06, (0.65, 0.9), 0.12, 0.45, 0.5, 1, (4, 10)),
    NucleusType("lymphocyte", (3.5, 5.0), (0.85, 1.0), 0.03, (1.5, 1.9), 0.06, 0.05, 0.1, 1, (3, 9)),
    NucleusType("spindle", (8.0, 13.0), (0.22, 0.35), 0.04, (0.9, 1.2), 0.2, 0.1, 0.2, 1, (2, 6)),
    NucleusType("plasma", (5.0, 6.5), (0.7, 0.85), 0.05, (1.1, 1.4), 0.3, 0.3, 0.4, 1, (2, 5)),
    NucleusType("neutrophil", (6.0, 7.0), (0.8, 1.0), 0.0, (1.3, 1.6), 0.05, 0.0, 0.0, 3, (1, 3)),
    NucleusType("apoptotic", (3.0, 4.5), (0.8, 1.0), 0.15, (2.0, 2.3), 0.0, 0.0, 0.0, 1, (1, 2)),
)
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])
_MIN_PIXELS = 12          # drop slivers smaller than this after overlaps and border cuts
_MAX_NUCLEI = 256


def synthetic_class_names(n_types: int) -> tuple[str, ...]:
    """``("background", <first n_types nucleus type names>)``."""
    _check_n_types(n_types)
    return ("background",) + tuple(t.name for t in NUCLEUS_TYPES[:n_types])


def make_synthetic_tile(seed: int, index: int, size: int = 256, n_types: int = 4) -> Tile:
    """Generate one H&E-like tile, deterministically from ``(seed, index)``.

    Args:
        seed: non-negative dataset seed.
        index: non-negative tile index.
        size: tile side in pixels (>= 32); nucleus sizes do not scale, their number does.
        n_types: number of nucleus types, 1..6 (epithelial, lymphocyte, spindle, plasma,
            neutrophil, apoptotic).

    Returns:
        Tile with key ``synth_<seed>_<index:05d>``; image (size, size, 3) uint8, inst_map
        int32 (about 20–60 nuclei per 256², many touching), type_map uint8 in 0..n_types,
        meta ``{"group": "synth_<index // 4>", "stratum": "s<(index // 4) % 3>", "seed", "index"}``.
    """
    _check_n_types(n_types)
    if seed < 0 or index < 0 or size < 32:
        raise ValueError(f"synthetic: need seed >= 0, index >= 0, size >= 32; got {seed}, {index}, {size}")
    rng = np.random.default_rng([int(seed), int(index), int(size), int(n_types)])
    nuclei = _layout(rng, size, n_types)
    inst, types = _paint(rng, nuclei, size)
    image = _render(rng, inst, types, nuclei)
    key = f"synth_{seed}_{index:05d}"
    return finish_tile(key, image, inst, types, synthetic_meta(seed, index), n_types + 1, key)


def synthetic_meta(seed: int, index: int) -> dict:
    """Metadata of synthetic tile ``index``: 4 tiles per fake source image, 3 strata."""
    return {"group": f"synth_{index // 4}", "stratum": f"s{(index // 4) % 3}", "seed": seed, "index": index}


def _check_n_types(n_types: int) -> None:
    if not 1 <= n_types <= len(NUCLEUS_TYPES):
        raise ValueError(f"synthetic: n_types must be in 1..{len(NUCLEUS_TYPES)}, got {n_types}")


def _radius_towards(a, b, angle, theta):
    """Radius of an ellipse (semi-axes a, b, major axis at ``angle``) in direction ``theta``."""
    phi = theta - angle
    return a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)


def _layout(rng: np.random.Generator, size: int, n_types: int) -> np.ndarray:
    """Place nuclei in touching clusters.

    Returns:
        (K, 6) float64 rows (cy, cx, a, b, angle, type index 0..n_types-1).
    """
    target = min(_MAX_NUCLEI, max(1, round(rng.integers(20, 61) * (size / 256) ** 2)))
    weights = rng.dirichlet(np.full(n_types, 1.5))
    nuclei = np.zeros((0, 6))
    for _ in range(4 * target):
        if len(nuclei) >= target:
            break
        nuclei = _grow_cluster(rng, nuclei, int(rng.choice(n_types, p=weights)), size, target)
    return nuclei


def _grow_cluster(rng: np.random.Generator, nuclei: np.ndarray, t: int, size: int, target: int) -> np.ndarray:
    """Add one cluster of type ``t``: each new member is pushed against an earlier member."""
    prof = NUCLEUS_TYPES[t]
    n_members = int(rng.integers(prof.cluster[0], prof.cluster[1] + 1))
    orient = rng.uniform(0, np.pi)
    members: list[np.ndarray] = []
    for _ in range(4 * n_members):
        if len(members) >= n_members or len(nuclei) >= target:
            break
        a = rng.uniform(*prof.radius)
        b = a * rng.uniform(*prof.aspect)
        angle = orient + rng.normal(0, 0.25) if prof.aspect[1] < 0.5 else rng.uniform(0, np.pi)
        if members:
            p = members[int(rng.integers(len(members)))]
            theta = _push_direction(rng, prof, orient)
            gap = _radius_towards(p[2], p[3], p[4], theta) + _radius_towards(a, b, angle, theta + np.pi)
            d = gap * rng.uniform(0.85, 0.97)
            cy, cx = p[0] + d * np.sin(theta), p[1] + d * np.cos(theta)
        else:
            cy, cx = rng.uniform(0, size, 2)
        cand = np.array([cy, cx, a, b, angle, t])
        if _fits(cand, nuclei, size):
            nuclei = np.vstack([nuclei, cand])
            members.append(cand)
    return nuclei


def _push_direction(rng: np.random.Generator, prof: NucleusType, orient: float) -> float:
    """Direction from a cluster member to the next: elongated nuclei mostly line up side by side."""
    if prof.aspect[1] >= 0.5 or rng.random() < 0.25:
        return rng.uniform(0, 2 * np.pi)
    return orient + np.pi / 2 + np.pi * rng.integers(2) + rng.normal(0, 0.2)


def _fits(cand: np.ndarray, nuclei: np.ndarray, size: int) -> bool:
    """Inside the tile and not overlapping any nucleus by more than a sliver."""
    if not (0 <= cand[0] < size and 0 <= cand[1] < size):
        return False
    if not len(nuclei):
        return True
    dy, dx = nuclei[:, 0] - cand[0], nuclei[:, 1] - cand[1]
    theta = np.arctan2(dy, dx)
    reach = _radius_towards(cand[2], cand[3], cand[4], theta)
    reach = reach + _radius_towards(nuclei[:, 2], nuclei[:, 3], nuclei[:, 4], theta + np.pi)
    return bool(np.all(np.hypot(dy, dx) >= 0.82 * reach))


def _nucleus_pixels(rng: np.random.Generator, nuc: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of one nucleus: a wobbly ellipse polygon, or several round lobes."""
    cy, cx, a, b, angle, t = nuc
    prof = NUCLEUS_TYPES[int(t)]
    if prof.lobes > 1:
        rows, cols = [], []
        for j in range(prof.lobes):
            phi = angle + 2 * np.pi * j / prof.lobes
            rr, cc = draw.disk((cy + 0.5 * a * np.sin(phi), cx + 0.5 * a * np.cos(phi)), 0.5 * a, shape=(size, size))
            rows.append(rr)
            cols.append(cc)
        return np.concatenate(rows), np.concatenate(cols)
    th = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    harmonics = np.cos(np.outer(th, [2, 3, 4]) + rng.uniform(0, 2 * np.pi, 3)) @ rng.normal(0, 1, 3)
    r = _radius_towards(a, b, 0.0, th) * (1 + prof.wobble * harmonics / np.sqrt(3))
    return draw.polygon(cy + r * np.sin(th + angle), cx + r * np.cos(th + angle), shape=(size, size))


def _paint(rng: np.random.Generator, nuclei: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise nuclei (later ones overwrite earlier ones) and drop slivers.

    Returns:
        inst: (size, size) int32 ids 1..K (gaps where slivers were dropped), 0 = background.
        types: (size, size) uint8 type ids 1..n_types, 0 = background.
    """
    inst = np.zeros((size, size), np.int32)
    for k, nuc in enumerate(nuclei, start=1):
        rr, cc = _nucleus_pixels(rng, nuc, size)
        inst[rr, cc] = k
    inst = _largest_pieces(inst)
    counts = np.bincount(inst.ravel(), minlength=len(nuclei) + 1)
    keep = np.arange(len(nuclei) + 1, dtype=np.int32)
    keep[counts < _MIN_PIXELS] = 0
    inst = keep[inst]
    type_of = np.concatenate([[0], nuclei[:, 5] + 1]).astype(np.uint8)
    return inst, type_of[inst]


def _largest_pieces(inst: np.ndarray) -> np.ndarray:
    """Keep only the largest 4-connected piece of each id (a later nucleus may cut an earlier one in two)."""
    pieces = measure.label(inst, background=0, connectivity=1)
    id_of_piece = np.zeros(pieces.max() + 1, inst.dtype)
    id_of_piece[pieces.ravel()] = inst.ravel()
    by_size = np.argsort(-np.bincount(pieces.ravel()), kind="stable")
    _, first = np.unique(id_of_piece[by_size], return_index=True)
    keep = np.zeros(len(id_of_piece), bool)
    keep[by_size[first]] = True
    keep[0] = False
    return np.where(keep[pieces], inst, 0)


def _smooth_noise(rng: np.random.Generator, size: int, sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-9)


def _low_freq(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance field varying over about size / cells pixels (Gaussian bumps on a coarse grid)."""
    basis = _bump_basis(size, cells)
    field = basis @ rng.standard_normal((cells + 1, cells + 1)) @ basis.T
    return (field - field.mean()) / (field.std() + 1e-9)


@functools.lru_cache(maxsize=16)
def _bump_basis(size: int, cells: int) -> np.ndarray:
    """(size, cells + 1) weights of Gaussian bumps centred on a regular grid spanning the tile."""
    centres = np.linspace(0, size - 1, cells + 1)
    width = (size - 1) / cells
    return np.exp(-(((np.arange(size)[:, None] - centres[None, :]) / width) ** 2))


def _render(rng: np.random.Generator, inst: np.ndarray, types: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Beer–Lambert H&E rendering of the painted label maps; (H, W, 3) uint8 RGB."""
    size = inst.shape[0]
    fibres = _smooth_noise(rng, size, (1.2, 3.0) if rng.random() < 0.5 else (3.0, 1.2))
    eosin = (0.42 + 0.08 * _low_freq(rng, size, 4) + 0.05 * fibres).astype(np.float32)
    lumen = _low_freq(rng, size, 3)
    eosin *= (1 - 0.9 / (1 + np.exp(-4 * (lumen - 1.2)))).astype(np.float32)
    hema = (0.05 + 0.015 * _low_freq(rng, size, 6)).astype(np.float32)
    nuclear = inst > 0
    hema[nuclear] = _nuclear_density(rng, inst, types, nuclei)[nuclear]
    eosin[nuclear] *= 0.25
    hema, eosin = ndimage.gaussian_filter(hema, 0.7), ndimage.gaussian_filter(eosin, 0.7)
    h_vec, e_vec = (_jitter_vector(rng, v) for v in (_HEMATOXYLIN, _EOSIN))
    od = hema[:, :, None] * h_vec.astype(np.float32) + np.clip(eosin, 0, None)[:, :, None] * e_vec.astype(np.float32)
    rgb = 255.0 * np.exp(-od) + 2.5 * rng.standard_normal(od.shape, dtype=np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _nuclear_density(rng: np.random.Generator, inst: np.ndarray, types: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Hematoxylin density inside nuclei: per-nucleus darkness × type texture + membrane rim."""
    profs = [NUCLEUS_TYPES[int(t)] for t in nuclei[:, 5]]
    darkness = np.array([0.0] + [rng.uniform(*p.stain) for p in profs], np.float32)
    grain = np.array([0.0] + [t.grain for t in NUCLEUS_TYPES], np.float32)
    blotch = np.array([0.0] + [t.blotch for t in NUCLEUS_TYPES], np.float32)
    rim = np.array([0.0] + [t.rim for t in NUCLEUS_TYPES], np.float32)
    fine, coarse = _smooth_noise(rng, inst.shape[0], 0.8), _smooth_noise(rng, inst.shape[0], 2.0)
    edge = np.zeros(inst.shape, bool)
    edge[1:] |= inst[1:] != inst[:-1]
    edge[:-1] |= inst[:-1] != inst[1:]
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edge[:, :-1] |= inst[:, :-1] != inst[:, 1:]
    texture = 1 + grain[types] * fine + blotch[types] * coarse
    return np.clip(darkness[inst] * texture, 0.1, None) + rim[types] * edge


def _jitter_vector(rng: np.random.Generator, vec: np.ndarray) -> np.ndarray:
    jittered = np.clip(vec + rng.normal(0, 0.03, 3), 0.01, None)
    return jittered / np.linalg.norm(jittered)


@DATASETS("synthetic")
class SyntheticSource(TileSource):
    """Tiles generated on access by ``make_synthetic_tile`` (no disk; root is ignored).

    Args:
        root: ignored.
        n_tiles: number of tiles.
        seed: dataset seed.
        size: tile side in pixels.
        n_types: number of nucleus types (1..6).
    """

    name = "synthetic"

    def __init__(self, root: Path | None = None, *, n_tiles: int = 64, seed: int = 0, size: int = 256,
                 n_types: int = 4):
        if n_tiles < 0 or seed < 0 or size < 32:
            raise ValueError(f"synthetic: need n_tiles >= 0, seed >= 0, size >= 32; got {n_tiles}, {seed}, {size}")
        self.seed, self.size, self.n_types = int(seed), int(size), int(n_types)
        keys = [f"synth_{self.seed}_{i:05d}" for i in range(int(n_tiles))]
        super().__init__(None, keys, synthetic_class_names(self.n_types))

    def _load(self, i: int) -> Tile:
        return make_synthetic_tile(self.seed, i, self.size, self.n_types)

    def _meta(self, i: int) -> dict:
        return synthetic_meta(self.seed, i)

    def _options(self) -> dict:
        return {"seed": self.seed, "size": self.size, "n_types": self.n_types, "generator_version": GENERATOR_VERSION}


def write_synthetic_dataset(out: str | Path, n_tiles: int, seed: int, size: int = 256, overwrite: bool = False,
                            progress: Callable[[int], None] | None = None, n_types: int = 4) -> Path:
    """Generate ``n_tiles`` synthetic tiles and write them in the folder format (``write_folder_dataset``).

    Args:
        out: destination folder (refused if it exists and is not empty, unless ``overwrite``).
        n_tiles: number of tiles.
        seed: dataset seed.
        size: tile side in pixels.
        overwrite: replace an existing non-empty ``out``.
        progress: called with the number of tiles written so far.
        n_types: number of nucleus types (1..6).

    Returns:
        ``out`` as a Path; read it back with ``open_dataset("folder", out)``.
    """
    source = SyntheticSource(None, n_tiles=n_tiles, seed=seed, size=size, n_types=n_types)
    return write_folder_dataset(out, iter(source), source.class_names, overwrite=overwrite, progress=progress)
