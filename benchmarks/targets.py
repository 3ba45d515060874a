"""CISCA training targets per tile: numba kernels vs their numpy/scikit-image twins, identical outputs asserted.

Targets are computed per sample in the training loader (after augmentation), so their cost is paid every
step. ``python benchmarks/targets.py [--tiles 20]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cellembed.data import make_synthetic_tile
from cellembed.targets import cisca_targets

try:
    from benchmarks._common import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, write_results


def per_tile_ms(tiles, **kw) -> tuple[float, list]:
    cisca_targets(tiles[0], **kw)  # compile / warm up
    t0 = time.perf_counter()
    outs = [cisca_targets(t, **kw) for t in tiles]
    return (time.perf_counter() - t0) / len(tiles) * 1e3, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=20)
    args = parser.parse_args()
    tiles = [make_synthetic_tile(1, i, size=256).inst_map for i in range(args.tiles)]
    rows = []
    for mag in ("20x", "40x"):
        fast, a = per_tile_ms(tiles, magnification=mag)
        twin, b = per_tile_ms(tiles, magnification=mag, reference=True)
        same = all(all(np.array_equal(x, y) for x, y in zip(u, v)) for u, v in zip(a, b))
        assert same, f"numba and twin targets differ at {mag}"
        rows.append({"magnification": mag, "numba (ms/tile)": round(fast, 2), "twin (ms/tile)": round(twin, 1),
                     "speed-up": round(twin / fast, 1), "identical": same})
    cells = float(np.mean([len(np.unique(t)) - 1 for t in tiles]))
    payload = {"machine": machine(), "tiles": args.tiles, "cells_per_tile": cells, "rows": rows,
               "description": f"{args.tiles} synthetic 256² tiles, {cells:.1f} touching nuclei each; all five "
                              "CISCA outputs (3-class map, graymask4, 4 directional maps, types, weights)."}

    def plot(ax):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["twin (ms/tile)"] for r in rows], 0.4, label="numpy/scikit-image twin")
        ax.bar(x + 0.2, [r["numba (ms/tile)"] for r in rows], 0.4, label="numba")
        ax.set_xticks(x, [r["magnification"] for r in rows])
        ax.set_ylabel("ms per 256² tile")
        ax.set_title("CISCA targets")
        ax.legend()

    print(write_results("targets_cpu", payload, rows, plot).read_text())


if __name__ == "__main__":
    main()
