"""Post-processing: numba path vs its scipy / scikit-image twin on 256² tiles, side by side.

Inputs are built in code: targets of synthetic touching nuclei (``make_synthetic_tile``; x2-resized
128² crops for 40x sizes) turned into one-hot "predictions", and the same with noise added (softened
probabilities, perturbed maps). Every output pair is asserted identical (instances and types).

    python benchmarks/postprocess.py [--tiles 40]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cellembed.data import make_synthetic_tile
from cellembed.postprocess import CISCA_PRESETS, cisca_instances, cisca_instances_reference, hover_instances
from cellembed.targets import cisca_targets, hover_targets

try:
    from benchmarks._common import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, write_results


def onehot(x, k):
    return (np.arange(k)[:, None, None] == x[None]).astype(np.float32)


def gt(i: int, mag: str):
    t = make_synthetic_tile(7, i)
    if mag == "20x":
        return t.inst_map, t.type_map
    return tuple(np.kron(a[:128, :128], np.ones((2, 2), a.dtype)) for a in (t.inst_map, t.type_map))


def noisy(rng, x, scale):
    y = x + rng.random(x.shape).astype(np.float32) * scale
    return y / y.sum(0)


def cisca_inputs(n: int, mag: str, noise: bool):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        inst, types = gt(i, mag)
        t = cisca_targets(inst, types, magnification=mag)
        c, ty, d = onehot(t.classes, 3), onehot(t.types, 5), t.directions
        if noise:
            c, ty = noisy(rng, c, 0.6), noisy(rng, ty, 1.0)
            d = d + rng.normal(0, 0.2, d.shape).astype(np.float32)
        out.append((c, d, ty))
    return out


def hover_inputs(n: int, mag: str, noise: bool):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        inst, types = gt(i, mag)
        h = hover_targets(inst, types)
        nprob, hv, nc = h.np.astype(np.float32), h.hv, onehot(h.nc, 5)
        if noise:
            nprob = np.clip(nprob + rng.normal(0, 0.2, nprob.shape), 0, 1).astype(np.float32)
            hv, nc = hv + rng.normal(0, 0.1, hv.shape).astype(np.float32), noisy(rng, nc, 1.0)
        out.append((nprob, hv, nc))
    return out


def timed(fn, inputs, repeats):
    best, outs = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(*x) for x in inputs]
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / len(inputs), outs


def run(method: str, mag: str, noise: bool, n: int) -> dict:
    if method == "CISCA":
        p = CISCA_PRESETS[mag]
        inputs = cisca_inputs(n, mag, noise)
        fast, ref = (lambda c, d, t: cisca_instances(c, d, t, p)), (lambda c, d, t: cisca_instances_reference(c, d, t, p))
    else:
        inputs = hover_inputs(n, mag, noise)
        fast = lambda a, b, c: hover_instances(a, b, c, mag)  # noqa: E731
        ref = lambda a, b, c: hover_instances(a, b, c, mag, reference=True)  # noqa: E731
    fast(*inputs[0])  # compile / load the numba cache, not timed
    fast_ms, fo = timed(fast, inputs, 3)
    ref_ms, ro = timed(ref, inputs, 2)
    for a, b in zip(fo, ro):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    cells = float(np.mean([a[0].max() for a in fo]))
    return {"method": method, "magnification": mag + (" (x2 upsample)" if method == "HoVer" and mag == "20x" else ""),
            "input": "noisy" if noise else "oracle", "tiles": n, "instances/tile": round(cells, 1),
            "numba (ms/tile)": round(fast_ms, 2), "twin (ms/tile)": round(ref_ms, 2),
            "speed-up": round(ref_ms / fast_ms, 2), "identical": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=40)
    args = parser.parse_args()
    rows = [run(m, mag, noise, args.tiles) for m in ("CISCA", "HoVer") for mag in ("20x", "40x")
            for noise in (False, True)]
    payload = {"machine": machine(), "rows": rows,
               "description": "256² tiles; numba = `cisca_instances` / `hover_instances`, twin = "
                              "`cisca_instances_reference` / `hover_instances(reference=True)` (scipy + "
                              "scikit-image). Best of 3 (numba) / 2 (twin) passes, single process; outputs "
                              "asserted identical. Both paths share skeletonize, the 3x3 blur, hole filling "
                              "and HoVer's 21-px Sobel (scipy)."}

    def plot(ax):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["numba (ms/tile)"] for r in rows], width=0.4, label="numba")
        ax.bar(x + 0.2, [r["twin (ms/tile)"] for r in rows], width=0.4, label="scikit-image twin")
        ax.set_xticks(x, [f"{r['method']} {r['magnification'][:3]}\n{r['input']} ×{r['speed-up']}" for r in rows],
                      fontsize=7)
        ax.set_ylabel("ms / 256² tile")
        ax.set_title("post-processing")
        ax.legend()

    print(write_results("postprocess_cpu", payload, rows, plot).read_text())


if __name__ == "__main__":
    main()
