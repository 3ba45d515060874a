"""Cells out of ``cellembed predict``: polygons, GeoJSON for QuPath, the cell table, the overlay PNG.

GeoJSON (RFC 7946): one ``FeatureCollection`` per input, one ``Feature`` per cell with a ``Polygon`` in the input's
level-0 pixel coordinates (x right, y down, as QuPath reads them) and the properties QuPath imports:
``objectType: "detection"``, ``classification: {name, color}`` and ``measurements``. The file is written as cells
arrive, so it never sits in memory.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127))
CELL_COLUMNS = ("image", "id", "x", "y", "area_px", "area_um2", "class", "class_id", "class_probability")


def class_colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[(class_id - 1) % len(PALETTE)]


class Cell(NamedTuple):
    """One predicted cell, in the input's level-0 pixel coordinates."""

    id: int
    x: float
    y: float
    area_px: int
    """Area in pixels at the run's resolution."""
    class_id: int
    class_probability: float
    polygon: list[list[float]]
    """Closed ring ``[[x, y], ...]`` (first point repeated last)."""


def polygon(mask: np.ndarray, y0: float, x0: float, scale: float, tolerance: float = 0.5) -> list[list[float]]:
    """Outline of a binary mask (its largest contour, simplified within ``tolerance`` px) as a closed ring of
    ``[x, y]`` level-0 coordinates; ``(y0, x0)`` is the mask's top-left pixel, ``scale`` level-0 px per mask px."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask, 1)
    rings = find_contours(padded.astype(np.float32), 0.5)
    ring = max(rings, key=len) if rings else np.zeros((0, 2))
    if len(ring) >= 4:
        ring = approximate_polygon(ring, tolerance)
    if len(ring) < 4:  # a one- or two-pixel cell: its pixels' bounding box
        ys, xs = np.nonzero(mask)
        a, b, c, d = ys.min() - 0.5, ys.max() + 0.5, xs.min() - 0.5, xs.max() + 0.5
        ring = np.array([[a, c], [a, d], [b, d], [b, c], [a, c]]) + 1.0
    ring = ring - 1.0  # undo the pad
    pts = [[round((x0 + float(x) + 0.5) * scale, 2), round((y0 + float(y) + 0.5) * scale, 2)] for y, x in ring]
    if pts[0] != pts[-1]:
        pts.append(list(pts[0]))
    return pts


class CellWriter:
    """Streams one input's cells to ``<stem>.geojson`` and ``<stem>.cells.csv``."""

    def __init__(self, out: Path, stem: str, image: str, class_names: list[str], mpp: float | None):
        self.geojson, self.csv_path = out / f"{stem}.geojson", out / f"{stem}.cells.csv"
        self.image, self.class_names, self.mpp, self.n = image, class_names, mpp, 0
        self._g = open(self.geojson.with_suffix(".geojson.part"), "w", encoding="utf-8")
        self._c = open(self.csv_path.with_suffix(".csv.part"), "w", newline="", encoding="utf-8")
        self._g.write('{"type": "FeatureCollection", "features": [\n')
        self._rows = csv.writer(self._c)
        self._rows.writerow(CELL_COLUMNS)

    def name(self, class_id: int) -> str:
        return self.class_names[class_id] if 0 < class_id < len(self.class_names) else f"class {class_id}"

    def add(self, cell: Cell) -> None:
        name = self.name(cell.class_id)
        area_um2 = None if self.mpp is None else round(cell.area_px * self.mpp ** 2, 3)
        feature = {"type": "Feature", "id": cell.id,
                   "geometry": {"type": "Polygon", "coordinates": [cell.polygon]},
                   "properties": {"objectType": "detection",
                                  "classification": {"name": name, "color": list(class_colour(cell.class_id))},
                                  "measurements": {"area_px": cell.area_px, "class_probability":
                                                   round(cell.class_probability, 4),
                                                   **({"area_um2": area_um2} if area_um2 is not None else {})}}}
        self._g.write((",\n" if self.n else "") + json.dumps(feature, separators=(",", ":")))
        self._rows.writerow((self.image, cell.id, round(cell.x, 2), round(cell.y, 2), cell.area_px,
                             "" if area_um2 is None else area_um2, name, cell.class_id,
                             round(cell.class_probability, 4)))
        self.n += 1

    def close(self) -> None:
        """Finish both files (renamed into place only now: an interrupted run leaves ``*.part`` files)."""
        self._g.write("\n]}\n")
        for f, final in ((self._g, self.geojson), (self._c, self.csv_path)):
            f.close()
            Path(f.name).replace(final)

    def abort(self) -> None:
        for f in (self._g, self._c):
            f.close()


class Overlay:
    """A thumbnail on which each cell's outline is drawn in its class colour as it arrives (no cell list kept).

    Args:
        thumb: RGB uint8 thumbnail; per_px: level-0 pixels per thumbnail pixel.
    """

    def __init__(self, thumb: np.ndarray, per_px: float):
        from PIL import Image, ImageDraw

        self.image = Image.fromarray(thumb).convert("RGB")
        self.draw, self.per_px = ImageDraw.Draw(self.image), per_px
        self.width = 1 if per_px > 1.5 else 2

    def add(self, ring: list[list[float]], class_id: int) -> None:
        pts = [(x / self.per_px - 0.5, y / self.per_px - 0.5) for x, y in ring]
        self.draw.line(pts, fill=class_colour(class_id), width=self.width)

    def save(self, path: Path) -> None:
        self.image.save(path)
