"""Per-image scoring: cellembed.metrics vs the straightforward per-instance implementation, side by side.

The reference (``cellembed.metrics._reference``) works the way hover_net / CoNIC / PanNuke-metrics do:
``remap_label``, one mask per instance, IoU per overlapping pair, argmax (AJI), full Hungarian (AJI+),
``inst * (type == c)`` per class and PanNuke's ``binarize``. Both compute the same statistics (binary
TP/FP/FN/IoU, AJI, AJI+, Dice, per-class counts for K = 6, bPQ parts); the run asserts they are identical.

    python benchmarks/score.py [--tiles 500] [--large 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cellembed.metrics import score_arrays
from cellembed.metrics._image import image_counts_numpy, image_counts_unchecked
from cellembed.metrics._reference import image_counts_reference, random_pair

try:
    from benchmarks._common import machine, write_results
    from benchmarks._previous import fused_counts_before
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, write_results
    from _previous import fused_counts_before

K = 6


def make(n: int, size: int, cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [random_pair(rng, size=size, n_cells=cells, n_classes=K, radius=(5.0, 12.0), scramble=False)
             for _ in range(n)]
    return (np.stack([p for p, _ in pairs]).astype(np.int32), np.stack([t for _, t in pairs]).astype(np.int32))


def timed(fn, pred, true, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(pred[i], true[i], K) for i in range(len(pred))]
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / len(pred), out


def assert_same(fast, ref) -> None:
    for a, b in zip(fast, ref):
        for field in a._fields:
            x, y = getattr(a, field), getattr(b, field)
            ok = np.allclose(x, y, rtol=0, atol=1e-9) if "iou" in field else np.array_equal(x, y)
            assert ok, f"{field}: {x} != {y}"


def run_case(label: str, pred, true, typed: bool) -> dict:
    if not typed:
        pred, true = pred[..., 0], true[..., 0]
    cells = float(np.mean([np.unique(t[..., 0] if typed else t).size - 1 for t in true]))
    fast_ms, fast = timed(image_counts_unchecked, pred, true, repeats=3)
    before_ms, before = timed(fused_counts_before, pred, true, repeats=3)
    numpy_ms, numpy_path = timed(image_counts_numpy, pred, true, repeats=3)
    ref_ms, ref = timed(image_counts_reference, pred, true, repeats=1)
    assert_same(fast, ref)
    assert_same(numpy_path, ref)
    assert_same(before, ref)
    t0 = time.perf_counter()
    score_arrays(pred, true, num_classes=K if typed else None)
    full_ms = 1e3 * (time.perf_counter() - t0) / len(pred)
    return {"case": label, "images": len(pred), "cells/image": round(cells, 1), "classes": K if typed else "-",
            "cellembed (ms/img)": round(fast_ms, 3), "compiled, before issue 15 (ms/img)": round(before_ms, 3),
            "speed-up over before": round(before_ms / fast_ms, 2), "numpy path (ms/img)": round(numpy_ms, 3),
            "compiled / numpy": round(numpy_ms / fast_ms, 1), "score_arrays (ms/img)": round(full_ms, 3),
            "per-instance reference (ms/img)": round(ref_ms, 2), "speed-up": round(ref_ms / fast_ms, 1),
            "identical": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=500)
    parser.add_argument("--large", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    small = make(args.tiles, 256, 40, seed=0)
    large = make(args.large, 1024, 700, seed=1)
    image_counts_unchecked(small[0][0], small[1][0], K)  # numba compile / cache load, not timed
    image_counts_unchecked(small[0][0][..., 0], small[1][0][..., 0], None)
    image_counts_numpy(small[0][0], small[1][0], K)
    fused_counts_before(small[0][0], small[1][0], K)
    fused_counts_before(small[0][0][..., 0], small[1][0][..., 0], None)
    rows = [run_case("256² typed", *small, typed=True), run_case("256² instance-only", *small, typed=False),
            run_case("1024² typed", *large, typed=True)]
    load = [round(x, 1) for x in (*load_before, *os.getloadavg())]
    payload = {"machine": machine(), "rows": rows, "k": K, "load_average": load,
               "description": "Synthetic (pred, true) pairs from `random_pair` (touching discs; the prediction "
                              "shifts, resizes, drops, splits and merges cells, adds FPs, flips types). Both "
                              "sides compute all per-image statistics (PQ counts, AJI, AJI+, Dice, per-class "
                              "counts, PanNuke bPQ parts); counts asserted identical, IoU sums to 1e-9. "
                              "cellembed: the compiled one-pass path (`metrics/_fused.py`), best of 3 passes; "
                              "'compiled, before issue 15': the same statistics fed by the previous pixel pass "
                              "(`benchmarks/_previous.py`: (P, 2) rows compared field by field, a (P, 5) run buffer "
                              "per image; now one packed int64 compare per pixel, runs counted first); 'numpy "
                              "path': the implementation before that (overlap table in numba, statistics in "
                              "numpy; still the fallback for huge ids), all timed in the same run; "
                              "`score_arrays` adds validation, a thread per core over the images, and aggregation. "
                              "Single process. Load average (1, 5, 15 min) before / after the run: "
                              f"{load[:3]} / {load[3:]} (other jobs sharing the 2 cores inflate absolute "
                              "times; the compiled / numpy ratio is measured side by side)."}

    def plot(ax):
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["cellembed (ms/img)"] for r in rows], width=0.4, label="cellembed")
        ax.bar(x + 0.2, [r["per-instance reference (ms/img)"] for r in rows], width=0.4, label="per-instance reference")
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{r['case']}\n×{r['speed-up']}" for r in rows])
        ax.set_ylabel("ms / image (log)")
        ax.set_title("per-image scoring")
        ax.legend()

    print(write_results("score_cpu", payload, rows, plot).read_text())


if __name__ == "__main__":
    main()
