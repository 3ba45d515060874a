"""``cellembed predict``: a trained run on images of any size and on whole slides.

For each input: open it (``_input``), decide the resampling from its pixel size and the run's, optionally find
the tissue on a thumbnail, then for each region of the global tile grid (``_tiling``) read the region's tiles,
run the frozen encoder and the run's decoder on batches of tiles, blend the tiles' maps into the region,
post-process the region with the run's own post-processing, and keep the cells whose centroid lies in the core.
Cells stream to GeoJSON and a CSV cell table (``_export``) and onto a thumbnail overlay; plain images also get
their stitched (H, W, 2) instance / type map, and a set of same-sized images the CoNIC array
``predictions.npy`` (N, H, W, 2).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cellembed.predict._export import Cell, CellWriter, Overlay, polygon
from cellembed.predict._input import MAGNIFICATION_MPP, Input, InputError, open_input, resolve_scale
from cellembed.predict._tiling import Grid, Region, read_padded

ProgressFn = Callable[[int, int], None]  # (tiles done, tiles in all inputs)
RASTER_MAX_PIXELS = 4096 * 4096
"""Plain images up to this size (at the run's resolution) also get their (H, W, 2) instance / type raster."""
TISSUE_THUMB = 2048
"""Longer side of the thumbnail that tissue detection and the overlay are drawn on."""


@dataclass
class PredictConfig:
    """Options of ``cellembed predict`` (see its ``--help``)."""

    run: str
    inputs: list[str]
    out: str
    mpp: str | float | None = None
    target_mpp: float | None = None
    tissue: str = "auto"
    region: int = 2048
    batch_size: int = 16
    device: str = "auto"
    weights: str | None = None
    overwrite: bool = False


@dataclass
class PredictResult:
    out: Path
    images: list[dict]
    seconds: float


def encoder_for_run(record: dict, device: torch.device, weights: str | None = None):
    """The frozen encoder whose features the run was trained on, rebuilt from its recorded identity.

    Raises:
        InputError: the rebuilt weights differ from the run's (or were a file and ``weights`` is not given).
    """
    from cellembed.encoders import build_encoder

    ident = record["identity"]["encoder"]
    wid = ident["weights_id"]
    source, _, rest = wid.partition(":")
    seed = 0
    if weights is None:
        if source == "file":
            raise InputError(f"the run's encoder weights came from a file ({wid}); pass --weights PATH to that file")
        weights = source
        if source == "random":
            seed = int(rest.partition("seed=")[2] or 0)
    enc = build_encoder(ident["encoder"], blocks=list(ident["blocks"]), weights=weights,
                        input_policy=ident["input_policy"], tile_size=record["tile_size"], device=device, seed=seed)
    if enc.weights_id != wid:
        raise InputError(f"encoder weights {enc.weights_id} differ from the run's ({wid}); pass --weights with the "
                         "weights the run was trained on")
    return enc


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: saturation above Otsu's threshold of the image (at least 0.05) or
    darker than 0.8, closed and with specks under 0.1 % of the thumbnail removed."""
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    hsv = rgb2hsv(thumb)
    sat, val = hsv[..., 1], hsv[..., 2]
    t = max(0.05, float(threshold_otsu(sat)) if sat.max() > sat.min() else 0.05)
    mask = (sat > t) | (val < 0.8)
    mask = ndimage.binary_closing(mask, np.ones((5, 5), bool))
    lab, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= max(1, 0.001 * mask.size)
        keep[0] = False
        mask = keep[lab]
    return mask


class Predictor:
    """A run ready to predict: its decoder, the encoder it was trained on, its post-processing."""

    def __init__(self, run_path: str | Path, device: str = "auto", weights: str | None = None,
                 batch_size: int = 16):
        from cellembed.evaluate._run import _device, load_run

        self.device = _device(device)
        self.run = load_run(run_path, self.device)
        if self.run.post.head not in ("cisca", "hovernet"):
            raise InputError(f"{run_path}: a {self.run.post.head!r} run has no instances; predict needs a cisca or "
                             "hovernet run")
        self.record = self.run.record
        self.tile = int(self.record["tile_size"])
        self.encoder = encoder_for_run(self.record, self.device, weights)
        self.dtype = self.record["identity"].get("dtype", "fp32")
        names = [lv.name for lv in self.encoder.levels]
        wanted = [lv["name"] for lv in self.record["levels"]]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise InputError(f"the rebuilt encoder lacks the run's levels {missing}")
        self.level_idx = [names.index(n) for n in wanted]
        self.batch_size = int(batch_size)
        self.class_names = list(self.record["class_names"])

    @property
    def magnification(self) -> str:
        return self.record["config"].get("magnification", "40x")

    @torch.no_grad()
    def maps(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Activated maps {key: (B, k, T, T) float32} of a (B, T, T, 3) uint8 batch of tiles."""
        from cellembed.cache._loader import Batch
        from cellembed.evaluate._predict import decoder_maps
        from cellembed.train._live import encode_levels

        images = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).contiguous().to(self.device)
        feats = encode_levels(self.encoder, images, self.dtype, self.device, self.level_idx)
        _, maps = decoder_maps(self.run.model, Batch(feats, images, {}, []), self.device)
        return maps

    def region_maps(self, inp: Input, grid: Grid, region: Region, scale: float, skip: set | None,
                    on_tiles: Callable[[int], None]) -> dict[str, np.ndarray] | None:
        """Blended maps of a region's extent (cropped to the image); None when all its tiles are skipped."""
        tiles = [t for t in region.tiles if skip is None or t not in skip]
        if not tiles:
            return None
        h, w = region.extent_shape
        pixels = read_padded(lambda a, b, c, d: inp.read(a, b, c, d, scale), region.ey0, region.ey1, region.ex0,
                             region.ex1, grid.height, grid.width)
        acc, weight = None, np.zeros((h, w), np.float32)
        T = self.tile
        for i in range(0, len(tiles), self.batch_size):
            chunk = tiles[i:i + self.batch_size]
            origins = [grid.tile_origin(r, c) for r, c in chunk]
            batch = np.stack([pixels[y - region.ey0:y - region.ey0 + T, x - region.ex0:x - region.ex0 + T]
                              for y, x in origins])
            maps = self.maps(batch)
            if acc is None:
                acc = {k: np.zeros((v.shape[1], h, w), np.float32) for k, v in maps.items()}
            for j, ((r, c), (y, x)) in enumerate(zip(chunk, origins)):
                win = grid.window(r, c)
                ys, xs = slice(y - region.ey0, y - region.ey0 + T), slice(x - region.ex0, x - region.ex0 + T)
                weight[ys, xs] += win
                for k, v in maps.items():
                    acc[k][:, ys, xs] += v[j] * win
            on_tiles(len(chunk))
        covered = weight > 0
        for k, a in acc.items():
            a[:, covered] /= weight[covered]
        _fill_background(acc, ~covered, self.run.post.head)
        ch, cw = min(region.ey1, grid.height) - region.ey0, min(region.ex1, grid.width) - region.ex0
        return {k: np.ascontiguousarray(a[:, :ch, :cw]) for k, a in acc.items()}

    def region_cells(self, maps: dict[str, np.ndarray], region: Region):
        """Post-process a region's maps: returns (instance map, type map, kept), ``kept`` listing the instances
        whose centroid lies in the core as (id, box: slices of the region's maps, mask within the box, centroid
        (y, x) in image pixels, class id, mean probability of that class over the cell, area in pixels)."""
        from scipy import ndimage

        inst, types = self.run.post.instances(maps)
        key = "types" if "types" in maps else ("nc" if "nc" in maps else None)
        kept = []
        for i, box in enumerate(ndimage.find_objects(inst), start=1):
            if box is None:
                continue
            mask = inst[box] == i
            ys, xs = np.nonzero(mask)
            y, x = ys.mean() + box[0].start + region.ey0, xs.mean() + box[1].start + region.ex0
            if not (region.y0 <= y < region.y1 and region.x0 <= x < region.x1):
                continue
            t = int(np.bincount(types[box][mask]).argmax()) if types is not None else 1
            prob = float(maps[key][t][box][mask].mean()) if key is not None and t < maps[key].shape[0] else 1.0
            kept.append((i, box, mask, (y, x), max(t, 1), prob, len(ys)))
        return inst, types, kept


class SeamGuard:
    """Drops a cell kept by a region when a neighbouring region already kept a version of it.

    Two regions that segment a nucleus on their shared edge slightly differently may each find the centroid of
    their own version inside their own core. Cells within ``reach`` pixels of their region's core edge are
    remembered (box and mask, for the current and the previous row of regions); a new cell overlapping one of
    them by more than ``DUPLICATE_OVERLAP`` of the smaller cell is a duplicate, and the first version (raster
    order of regions) stays. Memory: the edge cells of two rows of regions.
    """

    DUPLICATE_OVERLAP = 0.2

    def __init__(self, reach: int):
        self.reach, self.rows, self.dropped = reach, {}, 0

    def admit(self, region: Region, y0: int, x0: int, mask: np.ndarray) -> bool:
        """Whether the cell (mask with its top-left pixel at image (y0, x0)) is new; remembers it if near an edge."""
        h, w = mask.shape
        r = self.reach
        if not (y0 < region.y0 + r or x0 < region.x0 + r or y0 + h > region.y1 - r or x0 + w > region.x1 - r):
            return True
        if region.y0 not in self.rows:  # a new row of regions: keep only the row above it
            above = max((k for k in self.rows if k < region.y0), default=None)
            self.rows = {k: v for k, v in self.rows.items() if k == above}
            self.rows[region.y0] = []
        area = int(np.count_nonzero(mask))
        for cells in self.rows.values():
            for oy, ox, other, oarea, origin in cells:
                if origin == (region.y0, region.x0):
                    continue
                ay, by = max(y0, oy), min(y0 + h, oy + other.shape[0])
                ax, bx = max(x0, ox), min(x0 + w, ox + other.shape[1])
                if ay >= by or ax >= bx:
                    continue
                inter = int(np.count_nonzero(mask[ay - y0:by - y0, ax - x0:bx - x0] &
                                             other[ay - oy:by - oy, ax - ox:bx - ox]))
                if inter > self.DUPLICATE_OVERLAP * min(area, oarea):
                    self.dropped += 1
                    return False
        self.rows[region.y0].append((y0, x0, mask, area, (region.y0, region.x0)))
        return True


def _fill_background(acc: dict[str, np.ndarray], empty: np.ndarray, head: str) -> None:
    """Pixels no tile covered (skipped background): background with certainty, flat regression maps."""
    if not empty.any():
        return
    for k, a in acc.items():
        a[:, empty] = 0.0
    if head == "cisca":
        acc["classes"][2, empty] = 1.0
        if "types" in acc:
            acc["types"][0, empty] = 1.0
    else:
        acc["np"][0, empty] = 1.0
        if "nc" in acc:
            acc["nc"][0, empty] = 1.0


def _skipped_tiles(grid: Grid, scale: float, thumb: np.ndarray, per_px: float) -> set:
    """Tiles of the grid with under 1 % tissue in the thumbnail's tissue mask."""
    mask = tissue_mask(thumb)
    f = scale / per_px  # thumbnail pixels per run pixel
    skip = set()
    for r in range(grid.rows):
        for c in range(grid.cols):
            y, x = grid.tile_origin(r, c)
            a, b = int(y * f), max(int((y + grid.tile) * f), int(y * f) + 1)
            cc, d = int(x * f), max(int((x + grid.tile) * f), int(x * f) + 1)
            part = mask[a:b, cc:d]
            if part.size == 0 or part.mean() < 0.01:
                skip.add((r, c))
    return skip


def predict(config: PredictConfig, on_progress: ProgressFn | None = None, log: Callable[[str], None] = print
            ) -> PredictResult:
    """Predict every input of ``config`` with its run; see the module docstring. Returns what was written."""
    t0 = time.perf_counter()
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if config.tissue not in ("auto", "on", "off"):
        raise ValueError(f"tissue must be auto, on or off, got {config.tissue!r}")
    predictor = Predictor(config.run, config.device, config.weights, config.batch_size)
    target = config.target_mpp or MAGNIFICATION_MPP.get(predictor.magnification, 0.25)
    mpp_value = None if config.mpp in (None, "run") else float(config.mpp)
    # plan every input first (size, resampling, tissue): a bad input fails before any work; each is reopened
    # when its turn comes, so only one input's pixels are held at a time
    plans = []
    for path in config.inputs:
        inp = open_input(path, mpp_value)
        try:
            scale = resolve_scale(inp, target, config.mpp)
            grid = Grid(int(inp.height / scale), int(inp.width / scale), predictor.tile, config.region)
            use_tissue = config.tissue == "on" or (config.tissue == "auto" and inp.slide)
            skip = _skipped_tiles(grid, scale, *inp.thumbnail(TISSUE_THUMB)) if use_tissue else None
            plans.append((path, inp.name, scale, grid, skip))
        finally:
            inp.close()
    stems = _unique_stems([name for _, name, *_ in plans])
    total = sum(sum(1 for r in g.regions() for t in r.tiles if not s or t not in s) for *_, g, s in plans)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if on_progress is not None:
            on_progress(done[0], total)

    images, label_maps = [], {}
    for (path, _, scale, grid, skip), stem in zip(plans, stems):
        inp = open_input(path, mpp_value)
        thumb, per_px = inp.thumbnail(TISSUE_THUMB)
        started = time.perf_counter()
        run_mpp = inp.mpp * scale if inp.mpp else (target if config.mpp == "run" else None)
        writer = CellWriter(out, stem, inp.path.name, predictor.class_names, run_mpp)
        overlay = Overlay(thumb, per_px)
        raster = not inp.slide and grid.height * grid.width <= RASTER_MAX_PIXELS
        labels = np.zeros((grid.height, grid.width, 2), np.int32) if raster else None
        next_id, overlap_px, duplicates, oversized = 1, 0, 0, 0
        guard = SeamGuard(grid.stride)
        try:
            for region in grid.regions():
                maps = predictor.region_maps(inp, grid, region, scale, skip, tick)
                if maps is None:
                    continue
                inst, types, kept = predictor.region_cells(maps, region)
                for i, box, mask, (cy, cx), t, prob, area in kept:
                    by, bx = box[0].start + region.ey0, box[1].start + region.ex0
                    if not guard.admit(region, by, bx, mask):
                        continue
                    oversized += max(mask.shape) > grid.stride
                    ring = polygon(mask, by, bx, scale)
                    cell = Cell(next_id, (cx + 0.5) * scale, (cy + 0.5) * scale, area, t, prob, ring)
                    writer.add(cell)
                    overlay.add(ring, t)
                    if labels is not None:
                        view = labels[by:by + mask.shape[0], bx:bx + mask.shape[1]]
                        taken = int(np.count_nonzero(view[..., 0][mask]))
                        overlap_px += taken
                        duplicates += taken > 0.2 * area
                        view[mask] = (next_id, t)
                    next_id += 1
                del maps, inst, types, kept
                _release_memory()
        except BaseException:
            writer.abort()
            raise
        finally:
            inp.close()
        writer.close()
        overlay.save(out / f"{stem}.overlay.png")
        if labels is not None:
            label_maps[stem] = labels
        seconds = time.perf_counter() - started
        images.append({"input": str(inp.path), "stem": stem, "cells": writer.n, "height": grid.height,
                       "width": grid.width, "scale": scale, "mpp": inp.mpp, "target_mpp": target,
                       "regions": grid.n_regions(), "tiles_skipped": len(skip or ()), "seam_duplicates_dropped": guard.dropped,
                       "cells_wider_than_margin": oversized,
                       "seconds": round(seconds, 3),
                       **({"overlap_px": overlap_px, "duplicates": duplicates} if labels is not None else {}),
                       "geojson": writer.geojson.name, "cells_csv": writer.csv_path.name,
                       "overlay": f"{stem}.overlay.png"})
        if oversized:
            log(f"warning: {inp.path.name}: {oversized} cells are wider than the {grid.stride} px margin between "
                "regions; such cells can be cut or kept twice at region edges (raise --region, or check the run's "
                "magnification against the input's)")
        log(f"{inp.path.name}: {writer.n} cells in {seconds:.1f} s ({grid.height} × {grid.width} px at "
            f"{target} µm/px, {grid.n_regions()} regions)")
    if label_maps and len(label_maps) == len(plans) and len({m.shape for m in label_maps.values()}) == 1:
        np.save(out / "predictions.npy", np.stack(list(label_maps.values())))
        (out / "names.txt").write_text("".join(f"{s}\n" for s in stems))
    else:
        for stem, labels in label_maps.items():
            np.save(out / f"{stem}.labels.npy", labels)
    seconds = time.perf_counter() - t0
    (out / "predict.json").write_text(json.dumps({
        "run": str(config.run), "class_names": predictor.class_names, "target_mpp": target,
        "tile": predictor.tile, "stride": predictor.tile // 2, "region": config.region,
        "postprocess": predictor.run.post.to_dict(), "device": str(predictor.device), "images": images,
        "seconds": round(seconds, 3)}, indent=2))
    return PredictResult(out, images, seconds)


def _release_memory() -> None:
    """Hand the freed heap of the last region back to the OS (glibc ``malloc_trim``), so that resident memory
    follows the live region instead of creeping up with fragmentation; a no-op elsewhere."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _unique_stems(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        stems.append(name if n == 0 else f"{name}-{n}")
    return stems
