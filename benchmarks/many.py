"""Many decoders per pass: K decoders trained by ``fit_many`` from one read of the cache vs K separate runs.

One synthetic cache holding every block of an encoder (``extract --blocks all``; default the ViT-B/16 ``phikon``
architecture with random weights: compute and bytes do not depend on the weights), 256² tiles. K decoders, each
fed its own 4 of the cached levels (a seeded draw per decoder, the kind of variants ``search-blocks`` trains),
``fit-decoder``'s defaults otherwise (unetr, cisca heads, dihedral augmentation), no validation. For each memory
mode (``ram``: decoded once, an epoch indexes it; ``stream``: shards read and decoded in worker processes every
epoch), decoder and K:

* separate: K ``fit_decoder`` runs one after another, each with its own loader: its epoch time is the median of
  ``train_seconds`` over its epochs after the first, summed over the K runs; its total is the K runs' wall time
  (loader set-up, RAM loading, model builds, every epoch);
* one pass: ``fit_many`` of the same K configs: the same two numbers for the single pass;
* speed-ups = separate / one pass, for the epoch and for the total. The data work (reading, decoding, dihedral
  augmentation, CISCA targets) is paid K times apart and once in one pass; the decoders' steps K times either
  way, so the epoch speed-up tends to (data + step) / step per decoder as K grows.

The histories of the two ways are asserted equal (``fit_many`` promises the runs of separate ``fit_decoder``
calls), so the comparison is between two ways of computing the same numbers.

    python benchmarks/many.py [--tiles 16] [--epochs 3] [--ks 1 2 4 8] [--memory ram stream]
        [--decoders unetr light] [--encoder phikon] [--quick] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._common import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import machine, write_results

TILE = 256
LEVELS_PER_DECODER = 4


def make_cache(out: Path, encoder: str, tiles: int, size: int, device: str, workers: int) -> list[str]:
    from cellembed.cache import ExtractConfig, extract, open_cache

    extract(ExtractConfig(dataset="synthetic", out=str(out), encoder=encoder, weights="random", blocks="all",
                          device=device, num_workers=workers, shard_size=max(1, tiles // 4), batch_size=8,
                          dataset_options={"n_tiles": tiles, "seed": 0, "size": size}))
    return open_cache(out).level_names


def variants(levels: list[str], k: int) -> list[str]:
    """K subsets of ``LEVELS_PER_DECODER`` levels each: a seeded order of every subset, repeated if K is larger."""
    combos = list(itertools.combinations(levels, min(LEVELS_PER_DECODER, len(levels))))
    order = np.random.default_rng(0).permutation(len(combos))
    return [",".join(combos[order[j % len(combos)]]) for j in range(k)]


def configs(cache: Path, runs: Path, subsets: list[str], args, memory: str, decoder: str):
    from cellembed.train import FitConfig

    return [FitConfig(out=str(runs / str(i)), cache=str(cache), levels=lv, epochs=args.epochs,
                      batch_size=args.batch_size, memory=memory, decoder=decoder, device=args.device,
                      num_workers=args.workers, tune=False) for i, lv in enumerate(subsets)]


def epoch_seconds(history: list[dict]) -> float:
    """Median ``train_seconds`` of the epochs after the first (the first one alone when there is one)."""
    times = [h["train_seconds"] for h in history]
    return statistics.median(times[1:] if len(times) > 1 else times)


def no_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


def measure(cache: Path, tmp: Path, subsets: list[str], args, memory: str, decoder: str) -> dict:
    from cellembed.train import fit_decoder, fit_many

    alone, alone_total = [], 0.0
    for c in configs(cache, tmp / "alone", subsets, args, memory, decoder):
        t = time.perf_counter()
        alone.append(fit_decoder(c))
        alone_total += time.perf_counter() - t
    t = time.perf_counter()
    many = fit_many(configs(cache, tmp / "many", subsets, args, memory, decoder))
    many_total = time.perf_counter() - t
    for a, m in zip(alone, many):  # the same numbers, computed once per batch instead of once per run
        tol = 0 if args.device == "cpu" else 1e-3
        assert all(abs(x["train_loss"] - y["train_loss"]) <= tol * max(1.0, abs(x["train_loss"]))
                   for x, y in zip(no_times(a.history), no_times(m.history))), "fit_many differs from fit_decoder"
    shutil.rmtree(tmp / "alone", ignore_errors=True)
    shutil.rmtree(tmp / "many", ignore_errors=True)
    sep_epoch = sum(epoch_seconds(r.history) for r in alone)
    one_epoch = epoch_seconds(many[0].history)
    return {"memory": memory, "decoder": decoder, "K": len(subsets), "separate epoch s": round(sep_epoch, 3),
            "one pass epoch s": round(one_epoch, 3), "epoch speed-up": round(sep_epoch / one_epoch, 2),
            "separate total s": round(alone_total, 2), "one pass total s": round(many_total, 2),
            "total speed-up": round(alone_total / many_total, 2),
            "per decoder, one pass s": round(one_epoch / len(subsets), 3)}


def plot_fn(rows: list[dict]):
    def plot(ax):
        for key in sorted({(r["memory"], r["decoder"]) for r in rows}):
            sel = [r for r in rows if (r["memory"], r["decoder"]) == key]
            ax.plot([r["K"] for r in sel], [r["epoch speed-up"] for r in sel], "o-", label=f"{key[1]}, {key[0]}")
        ks = sorted({r["K"] for r in rows})
        ax.plot(ks, [1] * len(ks), "k:", lw=0.8)
        ax.set(xlabel="K decoders", ylabel="epoch speed-up (K separate runs / one pass)", xscale="log", xticks=ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_title("one read of the cache for K decoders")
        ax.legend(fontsize=7)
    return plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--memory", nargs="+", default=["ram", "stream"], choices=["ram", "stream", "gpu"])
    parser.add_argument("--decoders", nargs="+", default=["unetr"], choices=["unetr", "light"],
                        help="light: the FM benchmark decoder (256 channels up to full resolution: slow on CPU)")
    parser.add_argument("--encoder", default="phikon", help="encoder preset (random weights, every block cached)")
    parser.add_argument("--workers", type=int, default=2, help="reader worker processes (stream, ram loading)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="test_vit, 8 tiles of 64², 2 epochs, K 1 and 2, "
                        "unetr from RAM; writes many_quick_<device>")
    parser.add_argument("--name", default=None, help="results name (default many_<device>)")
    args = parser.parse_args()
    size = TILE
    if args.quick:
        args.tiles, args.epochs, args.ks, args.memory, args.decoders = 8, 2, [1, 2], ["ram"], ["unetr"]
        args.encoder, args.batch_size, size = "test_vit", 4, 64
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="cellembed-many-"))
    t0 = time.perf_counter()
    try:
        levels = make_cache(tmp / "cache", args.encoder, args.tiles, size, args.device, args.workers)
        rows = [measure(tmp / "cache", tmp, variants(levels, k), args, memory, decoder)
                for memory in args.memory for decoder in args.decoders for k in args.ks]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    description = (
        f"{args.tiles} synthetic {size}² tiles, a `{args.encoder}` cache of every block ({len(levels)} levels, "
        f"random weights), batch {args.batch_size}, {args.epochs} epochs per run, each decoder fed "
        f"{min(LEVELS_PER_DECODER, len(levels))} of the levels (a seeded draw per decoder), fit-decoder's defaults "
        f"otherwise (cisca heads, dihedral augmentation), no validation, {args.workers} reader workers, device "
        f"{args.device}, torch threads {torch.get_num_threads()}. `separate` = K `fit_decoder` runs one after "
        "another; `one pass` = `fit_many` of the same K configs (histories asserted equal). Epoch s = median "
        "`train_seconds` of the epochs after the first (summed over the K separate runs); total s = wall time of "
        "everything (loaders, RAM loading, model builds, all epochs). `per decoder, one pass` = one-pass epoch / K.")
    payload = {"machine": machine(), "args": vars(args), "levels": levels, "rows": rows,
               "seconds": time.perf_counter() - t0, "description": description}
    md = write_results(args.name or f"many{'_quick' if args.quick else ''}_{args.device}", payload, rows,
                       plot_fn(rows))
    print(md.read_text())


if __name__ == "__main__":
    main()
