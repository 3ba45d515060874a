"""Cache compression and level selection: bytes, read speed and (on real tiles) the PQ cost of each codec.

Part 1, bytes and reading (real CoNSeP train tiles when ``../shared/realdata`` is there, synthetic tiles
otherwise): the packaged EfficientNet-Lite0 extracted with ``--codec none`` (fp16), ``int8``, ``int4``, a mix
(int8 for the two large high-resolution levels, fp16 for the others) and ``pca<C/4>`` on every level (a basis fitted
on the first 256 tiles, a quarter of the channels stored as fp16 coefficients), each with its feature bytes per tile, its
whole cache per tile, the size ratio to fp16, the worst relative error of the read-back features and the time to
read and decode every sample (``Cache`` iteration, best of 3). Then an fp16 cache holding all seven stage ends
(blocks 0,2,4,7,10,14,15) is read serving 1, 2, 4 and 7 of its levels: only the served levels are decoded
(``load_tensors``), so the read cost follows what a run asks for, not what the cache holds.

Part 2, PQ (real data only, ``--seeds``): ``fit-decoder`` trains on the fp16 and the int8 caches (``--fit-codecs``,
also int4 and pca)
of CoNSeP's train images (split by source image as in ``quality_consep.py``: 288 / 48 / 96 tiles), ``--epochs``
epochs, its other options at their defaults, and each run is scored on the test split; mean ± sd over seeds and
the paired difference to fp16.

``--no-fit`` measures part 1 only and keeps the PQ rows of the previous results file (``results/codec_cpu.json``);
``--fit-codecs int4`` trains on int4 caches only, keeping the previous runs of the other codecs (same epochs). The pca
caches of the validation and test splits are projected on the training cache's basis (``extract --pca-basis``); the
committed pca row predates that option (each split then fitted its own basis on its own tiles).

    python benchmarks/codec.py [--seeds 0 1 2] [--epochs 10] [--no-fit] [--fit-codecs fp16 int8 int4 pca]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks._common import REALDATA, RESULTS, machine, md_table, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import REALDATA, RESULTS, machine, md_table, write_results

ENCODER = "efficientnet_lite0_in1k"
GROUPS = r"(.+)_\d+$"
ALL_STAGES = "all"  # EfficientNet-Lite0: its seven stage ends 0,2,4,7,10,14,15
CODECS = {"fp16": "none", "int8": "int8", "int4": "int4",
          "int8 (levels 1-2), fp16": "mixed", "pca (K = C/4)": "pca"}  # mixed, pca: filled from the fp16 levels


def codec_spec(codec: str, levels: list[dict]) -> str:
    """``--codec`` of a ``CODECS`` value: "mixed" → int8 for the two highest-resolution (largest) levels, "pca" →
    pca<C/4> on every level; other values as they are. ``levels``: the fp16 cache's manifest levels."""
    if codec == "mixed":
        return ",".join(f"{lv['name']}=int8" for lv in levels[:2])
    if codec == "pca":
        return ",".join(f"{lv['name']}=pca{max(1, lv['channels'] // 4)}" for lv in levels)
    return codec


def consep() -> Path | None:
    root = REALDATA / "consep_tiles256"
    return root if root.is_dir() else None


def extract_cache(out: Path, codec: str, split: str = "train", blocks: str = "default", workers: int = 2,
                  pca_basis: str | None = None) -> float:
    from cellembed.cache import ExtractConfig, extract

    root = consep()
    if root is not None:
        cfg = ExtractConfig(dataset="folder", root=str(root), out=str(out), encoder=ENCODER, weights="packaged",
                            split=split, scheme="cisca", blocks=blocks, codec=codec, device="cpu",
                            num_workers=workers, batch_size=32, shard_size=64, pca_basis=pca_basis,
                            dataset_options={"group_regex": GROUPS})
    else:
        cfg = ExtractConfig(dataset="synthetic", out=str(out), encoder=ENCODER, weights="packaged", blocks=blocks,
                            codec=codec, device="cpu", num_workers=workers, batch_size=32, shard_size=64,
                            dataset_options={"n_tiles": 64, "seed": 0, "size": 256})
    return extract(cfg).encode_seconds


def feature_bytes(out: Path) -> int:
    total = 0
    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            total += sum(m.size for m in tar if m.name.endswith("feats.safetensors"))
    return total


def read_ms(cache, level_names: list[str] | None = None, repeats: int = 3) -> float:
    """Best-of-``repeats`` milliseconds per sample to read and decode a cache (only ``level_names`` decoded)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        for path in cache.shard_paths:
            for _ in cache.iter_shard(path, level_names=level_names):
                n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def max_rel_error(ref, other) -> float:
    """Largest |read-back − fp16| over a level's channel range, over every sample and level."""
    worst = 0.0
    for a, b in zip(ref, other):
        for x, y in zip(a.feats, b.feats):
            rng = x.float().abs().amax(dim=(1, 2)).clamp_min(1e-6)
            worst = max(worst, float(((y.float() - x.float()).abs().amax(dim=(1, 2)) / rng).max()))
    return worst


def size_rows(tmp: Path, workers: int) -> tuple[list[dict], list[dict], dict]:
    from cellembed.cache import open_cache

    paths, rows = {}, []
    for label, codec in CODECS.items():
        out = tmp / f"train-{label.split()[0]}{'-mixed' if codec == 'mixed' else ''}"
        if label != "fp16":
            codec = codec_spec(codec, open_cache(paths["fp16"]).manifest["levels"])
        seconds = extract_cache(out, codec, workers=workers)
        paths[label] = out
        cache = open_cache(out)
        n = len(cache)
        rows.append({"codec": label, "--codec": codec, "tiles": n, "extract s": round(seconds, 1),
                     "feature kB / tile": round(feature_bytes(out) / n / 1e3, 1),
                     "cache kB / tile": round(cache.manifest["n_bytes"] / n / 1e3, 1),
                     "read + decode ms / tile": round(read_ms(cache), 2)})
    ref = open_cache(paths["fp16"])
    for row, label in zip(rows, CODECS):
        row["features vs fp16"] = f"{row['feature kB / tile'] / rows[0]['feature kB / tile']:.2f}×"
        row["cache vs fp16"] = f"{row['cache kB / tile'] / rows[0]['cache kB / tile']:.2f}×"
        row["max error / channel range"] = f"{max_rel_error(ref, open_cache(paths[label])):.4f}"
    out = tmp / "train-all-stages"
    extract_cache(out, "none", blocks=ALL_STAGES, workers=workers)
    cache = open_cache(out)
    names = cache.level_names
    level_rows = [{"levels stored": len(names), "levels served": k, "served": ", ".join(names[:k]) if k < len(names)
                   else "all", "read + decode ms / tile": round(read_ms(cache, names[:k]), 2)}
                  for k in (1, 2, 4, len(names))]
    return rows, level_rows, {k: str(v) for k, v in paths.items()}


def fit_rows(tmp: Path, seeds: list[int], epochs: int, workers: int, codecs: list[str], levels: list[dict]) \
        -> list[dict]:
    from cellembed.evaluate import score_run
    from cellembed.train import FitConfig, fit_decoder

    rows = []
    for label in codecs:
        codec = "none" if label == "fp16" else codec_spec(label, levels)
        caches = {split: tmp / f"{label}-{split}" for split in ("train", "val", "test")}
        for split, out in caches.items():  # a pca cache of val / test is projected on the training basis
            basis = str(caches["train"]) if label == "pca" and split != "train" else None
            extract_cache(out, codec, split=split, workers=workers, pca_basis=basis)
        for seed in seeds:
            cfg = FitConfig(out=str(tmp / f"run-{label}-{seed}"), cache=str(caches["train"]),
                            val_cache=str(caches["val"]), epochs=epochs, seed=seed, device="cpu",
                            num_workers=workers, memory="ram", overwrite=True)
            t0 = time.perf_counter()
            fit = fit_decoder(cfg, on_epoch=lambda e, n, m: print(f"  [{label} seed {seed}] epoch {e}/{n} "
                                                                  f"val PQ {m.get('val_pq'):.3f}", flush=True))
            score = score_run(fit.run_dir, str(caches["test"]), device="cpu", num_workers=workers, n_overlays=0,
                              overwrite=True)
            s = score.metrics["summary"]
            rows.append({"codec": label, "seed": seed, "pq": s["pq"], "mpq_plus": s["mpq_plus"], "aji": s["aji"],
                         "best epoch": fit.best["epoch"], "fit s": round(time.perf_counter() - t0)})
            print(f"[{label} seed {seed}] test PQ {s['pq']:.3f} mPQ+ {s['mpq_plus']:.3f}", flush=True)
    return rows


def summary_rows(rows: list[dict]) -> list[dict]:
    out = []
    by = {c: [r for r in rows if r["codec"] == c] for c in dict.fromkeys(r["codec"] for r in rows)}
    for codec, rs in by.items():
        cell = lambda k: (f"{statistics.mean(r[k] for r in rs):.3f} ± "
                          f"{statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0:.3f}")
        out.append({"codec": codec, "seeds": len(rs), "test PQ": cell("pq"), "test mPQ+": cell("mpq_plus"),
                    "test AJI": cell("aji")})
    for codec in by:
        pairs = [(a, b) for a in by[codec] for b in by.get("fp16", []) if a["seed"] == b["seed"]]
        if codec == "fp16" or not pairs:
            continue
        d = [a["pq"] - b["pq"] for a, b in pairs]
        out.append({"codec": f"{codec} − fp16 (paired by seed)", "seeds": len(d),
                    "test PQ": f"{statistics.mean(d):+.3f} ± {statistics.stdev(d) if len(d) > 1 else 0:.3f}",
                    "test mPQ+": f"{statistics.mean(a['mpq_plus'] - b['mpq_plus'] for a, b in pairs):+.3f}",
                    "test AJI": f"{statistics.mean(a['aji'] - b['aji'] for a, b in pairs):+.3f}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-fit", action="store_true", help="bytes and reading only (no training)")
    parser.add_argument("--fit-codecs", nargs="+", default=["fp16", "int8"], choices=["fp16", "int8", "int4", "pca"],
                        help="codecs trained on; the previous results' runs of other codecs are kept")
    args = parser.parse_args()
    from cellembed.cache import read_manifest

    torch.set_num_threads(min(2, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="cellembed-codec-"))
    t0 = time.perf_counter()
    try:
        sizes, levels, paths = size_rows(tmp, args.workers)
        old = RESULTS / "codec_cpu.json"
        previous = json.loads(old.read_text()) if old.is_file() else {}
        kept = previous.get("fits", []) if previous.get("args", {}).get("epochs", args.epochs) == args.epochs else []
        if args.no_fit:  # the previous runs as they are, with their own schedule
            fits = previous.get("fits", [])
            args.epochs = previous.get("args", {}).get("epochs", args.epochs)
        else:
            fp16_levels = read_manifest(paths["fp16"])["levels"]
            new = [] if consep() is None else fit_rows(tmp, args.seeds, args.epochs, args.workers, args.fit_codecs,
                                                       fp16_levels)
            fits = [r for r in kept if r["codec"] not in args.fit_codecs] + new
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = "CoNSeP train split (288 tiles of 256²)" if consep() else "64 synthetic 256² tiles (no ../shared here)"
    description = (
        f"{data}, EfficientNet-Lite0 (packaged ImageNet weights), CPU. Feature bytes = the feats.safetensors members "
        "of every shard; cache bytes = the whole shards (image PNG, ground truth, metadata included). int8 / int4: "
        "per tile and per channel, the absolute maximum / 127 (int8) or / 7 (int4, two values per byte) as scale "
        "(stored in fp16 beside the level), values read back as fp16; pca: K = C/4 principal-component "
        "coefficients per position in fp16 (basis fitted on the first 256 tiles, in pca.safetensors, not counted in "
        "the feature bytes; the validation and test caches of the PQ runs are projected on the training cache's "
        "basis, `extract --pca-basis`), reconstructed to C channels when read; error = largest |read-back − fp16| over the "
        "channel's absolute maximum. Reading: every sample "
        "of the cache decoded in this process (tar, safetensors, PNG), best of 3.")
    summary = summary_rows(fits) if fits else []
    payload = {"machine": machine(), "sizes": sizes, "levels": levels, "fits": fits, "summary": summary,
               "args": vars(args), "seconds": time.perf_counter() - t0, "description": description}

    def plot(ax):
        x = np.arange(len(sizes))
        ax.bar(x, [r["feature kB / tile"] for r in sizes])
        ax.set_xticks(x, [r["codec"] for r in sizes], fontsize=8)
        ax.set_ylabel("feature kB per tile")
        ax2 = ax.twinx()
        ax2.plot(x, [r["read + decode ms / tile"] for r in sizes], "o-", color="C1")
        ax2.set_ylabel("read + decode ms per tile", color="C1")
        ax.set_title("cache codecs: bytes (bars) and read time (line)")

    path = write_results("codec_cpu", payload, sizes, plot)
    extra = ("\n## Reading a cache of all seven stage ends, serving some of its levels\n\n" + md_table(levels)
             + "\n\nOnly the served levels' tensors are copied out of each sample's safetensors member "
             "(`cellembed.cache._codec.load_tensors`); the tar member itself is read whole.\n")
    if summary:
        extra += (f"\n## PQ cost on CoNSeP (test split, {args.epochs} epochs, fit-decoder defaults otherwise)\n\n"
                  + md_table(summary) + "\n\n"
                  + md_table([{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in fits])
                  + "\n")
    path.write_text(path.read_text() + extra)
    print(path.read_text())


if __name__ == "__main__":
    main()
