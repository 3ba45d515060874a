"""Post-processing: numba path vs its scipy / scikit-image twin, side by side in one run.

Inputs are built in code: targets of synthetic touching nuclei (``make_synthetic_tile``; x2-resized
128² crops for 40x sizes) turned into one-hot "predictions" ("oracle"), and the same with noise added
(softened probabilities, perturbed maps; "noisy"). Sizes: 256² tiles (~40 cells at 20x) and 1024²
images (a 4 x 4 mosaic of such tiles, ~650 cells at 20x). Every output pair is asserted identical
(instances and types). Each repeat times the twin and then the numba path on the same inputs; the table
gives the median over repeats. A second table times each stage of both paths on the same intermediate
arrays (256² noisy tiles), which shows where the time goes. 'batch': the same inputs through
``map_tiles`` (one thread per core; what validation, ``score`` and ``tune`` do with a batch of tiles).

    python benchmarks/postprocess.py [--tiles 30] [--images 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from skimage.morphology import skeletonize
from skimage.segmentation import watershed

from cellembed.data import make_synthetic_tile
from cellembed.postprocess import (
    CISCA_PRESETS,
    HOVER_PRESETS,
    _cisca,
    _filters,
    _hover,
    _kernels,
    _ops,
    _reference,
    cisca_instances,
    cisca_instances_reference,
    hover_instances,
    map_tiles,
)
from cellembed._parallel import default_workers
from cellembed.postprocess import _filter_kernels as _fk
from cellembed.targets import cisca_targets, hover_targets

try:
    from benchmarks._common import machine, md_table, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, md_table, write_results


def onehot(x, k):
    return (np.arange(k)[:, None, None] == x[None]).astype(np.float32)


def tile(i: int, mag: str) -> tuple[np.ndarray, np.ndarray]:
    t = make_synthetic_tile(7, i)
    if mag == "20x":
        return t.inst_map, t.type_map
    return tuple(np.kron(a[:128, :128], np.ones((2, 2), a.dtype)) for a in (t.inst_map, t.type_map))


def mosaic(i: int, mag: str) -> tuple[np.ndarray, np.ndarray]:
    """A 1024² image: 4 x 4 tiles, instance ids offset per tile."""
    parts = [tile(1000 + 16 * i + k, mag) for k in range(16)]
    offsets = np.cumsum([0] + [int(p[0].max()) for p in parts[:-1]])
    inst = [np.where(p[0] > 0, p[0] + o, 0).astype(np.int32) for p, o in zip(parts, offsets)]
    rows = [np.concatenate(inst[4 * r:4 * r + 4], axis=1) for r in range(4)]
    types = [np.concatenate([p[1] for p in parts[4 * r:4 * r + 4]], axis=1) for r in range(4)]
    return np.concatenate(rows), np.concatenate(types)


def noisy(rng, x, scale):
    y = x + rng.random(x.shape).astype(np.float32) * scale
    return y / y.sum(0)


def cisca_inputs(gts, mag: str, noise: bool):
    rng = np.random.default_rng(0)
    out = []
    for inst, types in gts:
        t = cisca_targets(inst, types, magnification=mag)
        c, ty, d = onehot(t.classes, 3), onehot(t.types, 5), t.directions
        if noise:
            c, ty = noisy(rng, c, 0.6), noisy(rng, ty, 1.0)
            d = d + rng.normal(0, 0.2, d.shape).astype(np.float32)
        out.append((c, d, ty))
    return out


def hover_inputs(gts, noise: bool):
    rng = np.random.default_rng(1)
    out = []
    for inst, types in gts:
        h = hover_targets(inst, types)
        nprob, hv, nc = h.np.astype(np.float32), h.hv, onehot(h.nc, 5)
        if noise:
            nprob = np.clip(nprob + rng.normal(0, 0.2, nprob.shape), 0, 1).astype(np.float32)
            hv, nc = hv + rng.normal(0, 0.1, hv.shape).astype(np.float32), noisy(rng, nc, 1.0)
        out.append((nprob, hv, nc))
    return out


def side_by_side(fast, ref, inputs, repeats: int) -> tuple[float, float, list]:
    """Median ms per input of ``ref`` and ``fast`` (alternating passes), and the fast outputs (checked)."""
    fast(*inputs[0])  # compile / load the numba cache, not timed
    t_ref, t_fast = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ro = [ref(*x) for x in inputs]
        t1 = time.perf_counter()
        fo = [fast(*x) for x in inputs]
        t2 = time.perf_counter()
        t_ref.append(t1 - t0)
        t_fast.append(t2 - t1)
    for a, b in zip(fo, ro):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), "numba and twin differ"
    return 1e3 * np.median(t_fast) / len(inputs), 1e3 * np.median(t_ref) / len(inputs), fo


def run(method: str, mag: str, noise: bool, size: int, n: int, repeats: int) -> dict:
    gts = [tile(i, mag) if size == 256 else mosaic(i, mag) for i in range(n)]
    if method == "CISCA":
        p = CISCA_PRESETS[mag]
        inputs = cisca_inputs(gts, mag, noise)
        fast = lambda c, d, t: cisca_instances(c, d, t, p)
        ref = lambda c, d, t: cisca_instances_reference(c, d, t, p)
    else:
        inputs = hover_inputs(gts, noise)
        fast = lambda a, b, c: hover_instances(a, b, c, mag)
        ref = lambda a, b, c: hover_instances(a, b, c, mag, reference=True)
    fast_ms, ref_ms, fo = side_by_side(fast, ref, inputs, repeats)
    batch_ms, bo = batched(fast, inputs, repeats)
    for a, b in zip(bo, fo):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), "batched and one-by-one differ"
    return {"method": method, "magnification": mag + (" (x2 upsample)" if method == "HoVer" and mag == "20x" else ""),
            "size": f"{size}²", "input": "noisy" if noise else "oracle", "images": n,
            "instances/image": round(float(np.mean([a[0].max() for a in fo])), 1),
            "numba (ms/img)": round(fast_ms, 2), f"numba, batch on {default_workers(n)} threads (ms/img)":
                round(batch_ms, 2), "twin (ms/img)": round(ref_ms, 2),
            "speed-up": round(ref_ms / fast_ms, 2), "batch speed-up": round(ref_ms / batch_ms, 2), "identical": True}


def batched(fast, inputs, repeats: int) -> tuple[float, list]:
    """Median ms per input of ``map_tiles`` over the whole list (one thread per core), and its outputs."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = map_tiles(lambda x: fast(*x), inputs)
        times.append(time.perf_counter() - t0)
    return 1e3 * np.median(times) / len(inputs), out


# ---------------------------------------------------------------- per-stage profile


def cisca_stages(c, d, t, p):
    """(stage, twin call, numba call) on the twin's intermediate arrays of one tile."""
    R = _reference
    fg, cth = R.cisca_contours_reference(c, d, p)
    land, markers, mask = R.cisca_landscape_reference(c, fg, cth, p), R.cisca_seeds_reference(c, cth, p), \
        R.cisca_mask_reference(c, p)
    padded, ws = np.pad(land, 1), watershed(land, markers, mask=mask, connectivity=2)
    inst = R.cisca_size_filter_reference(ws, p.min_area)
    n, m = int(inst.max()), int(markers.max())
    return [("contours: minmax + 5x5 correlations + threshold", lambda: R.cisca_contours_reference(c, d, p),
             lambda: _cisca.contours(c, d, p)),
            ("landscape: 3x3 blur + mixing", lambda: R.cisca_landscape_reference(c, fg, cth, p),
             lambda: _cisca.landscape(c, fg, cth, p)),
            ("seeds: morphology + labelling", lambda: R.cisca_seeds_reference(c, cth, p),
             lambda: _cisca.seeds(c, cth, p)),
            ("  of which skeletonize (shared)", lambda: skeletonize(cth), lambda: skeletonize(cth)),
            ("watershed mask: opening", lambda: R.cisca_mask_reference(c, p), lambda: _cisca.watershed_mask(c, p)),
            ("watershed", lambda: watershed(land, markers, mask=mask, connectivity=2),
             lambda: _ops.flood(padded, markers, mask, 2)),
            ("size filter + relabel", lambda: R.cisca_size_filter_reference(ws, p.min_area),
             lambda: _kernels.union_filter(ws, m, p.min_area)),
            ("type voting", lambda: R.vote_types_reference(inst, t), lambda: _cisca.soft_types(inst, n, t))]


def hover_stages(a, hv, nc, mag: str):
    """As ``cisca_stages``; at 20x the stages run on the x2-upsampled maps with the 40x constants."""
    R, x, p = _reference, np.concatenate([a[None], hv]), HOVER_PRESETS["40x"]
    if mag == "20x":
        up = _filters.upsample2(x)
        a, hv = up[0], np.ascontiguousarray(up[1:])
    blb = R.hover_foreground_reference(a, p)
    overall, dist = R.hover_energy_reference(blb, hv, p)
    _, seeds = _hover.energy(blb, hv, p)
    markers = R.hover_markers_reference(blb, overall, p)
    padded, ws = np.pad(dist, 1), watershed(dist, markers, mask=blb)
    inst = R.remove_small_reference(ws[::2, ::2] if mag == "20x" else ws, 1)
    n = int(inst.max())
    stages = [("foreground: threshold + labelling", lambda: R.hover_foreground_reference(a, p),
             lambda: _hover.foreground(a, p)),
            ("energy: minmax + 21-tap Sobel + 3x3 blur", lambda: R.hover_energy_reference(blb, hv, p),
             lambda: _hover.energy(blb, hv, p)),
            ("markers: fill holes + opening + labelling", lambda: R.hover_markers_reference(blb, overall, p),
             lambda: _hover.markers(seeds, p)),
            ("watershed", lambda: watershed(dist, markers, mask=blb), lambda: _ops.flood(padded, markers, blb, 1)),
            ("type voting", lambda: R.majority_types_reference(inst, nc), lambda: _hover._majority(inst, n, nc))]
    if mag == "20x":
        stages.insert(0, ("x2 bilinear upsampling", lambda: _filters.upsample2(x), lambda: _fk.upsample2(x)))
    return stages


def profile(method: str, mag: str, n: int, repeats: int) -> list[dict]:
    gts = [tile(i, mag) for i in range(n)]
    if method == "CISCA":
        p = CISCA_PRESETS[mag]
        per_tile = [cisca_stages(*[np.ascontiguousarray(v) for v in x], p) for x in cisca_inputs(gts, mag, True)]
    else:
        per_tile = [hover_stages(*[np.ascontiguousarray(v) for v in x], mag) for x in hover_inputs(gts, True)]
    rows = []
    for k, (stage, _, _) in enumerate(per_tile[0]):
        per_tile[0][k][2]()
        t_ref, t_fast = [], []
        for _ in range(repeats):
            for calls, out in ((1, t_ref), (2, t_fast)):
                t0 = time.perf_counter()
                for stages in per_tile:
                    stages[k][calls]()
                out.append(time.perf_counter() - t0)
        ref_ms, fast_ms = (1e3 * np.median(x) / n for x in (t_ref, t_fast))
        rows.append({"method": f"{method} {mag}", "stage": stage, "twin (ms/tile)": round(ref_ms, 3),
                     "numba (ms/tile)": round(fast_ms, 3), "speed-up": round(ref_ms / fast_ms, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=30, help="256² tiles per case")
    parser.add_argument("--images", type=int, default=3, help="1024² images per case")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [run(m, mag, noise, size, n, reps) for m in ("CISCA", "HoVer") for mag in ("20x", "40x")
            for size, n, reps in ((256, args.tiles, args.repeats), (1024, args.images, max(3, args.repeats // 2)))
            for noise in (False, True)]
    steps = [r for m in ("CISCA", "HoVer") for mag in ("20x", "40x") for r in profile(m, mag, 10, args.repeats)]
    load = [round(x, 1) for x in (*load_before, *os.getloadavg())]
    payload = {"machine": machine(), "load_average": load, "rows": rows, "stages": steps,
               "description": "numba = `cisca_instances` / `hover_instances` one tile at a time; batch = the same through "
                              "`map_tiles` (one thread per core, kernels release the GIL); twin = `cisca_instances_reference` / "
                              "`hover_instances(reference=True)` (scipy + scikit-image). Median over repeats of "
                              "alternating passes (twin, then numba) on the same inputs; single process; outputs "
                              "asserted identical (batch included). Both paths use scikit-image's `skeletonize` (CISCA seeds). "
                              f"Load average (1, 5, 15 min) before / after the run: {load[:3]} / {load[3:]} "
                              "(other jobs share the machine: absolute times vary, the ratios less so)."}

    def plot(ax):
        x = np.arange(len(rows))
        ms = [[r[k] for k in r if k.startswith("numba")] for r in rows]
        ax.bar(x - 0.2, [m[0] for m in ms], width=0.4, label="one tile at a time")
        ax.bar(x + 0.2, [m[1] for m in ms], width=0.4, label="batch, one thread per core")
        ax.axhline(2, color="k", lw=0.8, ls="--", label="2 ms target (256²)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_xticks(x, [f"{r['method']} {r['magnification'][:3]} {r['size']}\n{r['input']}" for r in rows],
                      fontsize=6, rotation=90)
        ax.set_ylabel("ms per tile / image (log)")
        ax.set_title("post-processing, numba path (outputs identical to the scikit-image twin)")

    path = write_results("postprocess_cpu", payload, rows, plot)
    steps_md = "\n## Where the time goes (256² noisy tiles, per stage)\n\n" + md_table(steps) + "\n"
    path.write_text(path.read_text() + steps_md)
    print(path.read_text())


if __name__ == "__main__":
    main()
