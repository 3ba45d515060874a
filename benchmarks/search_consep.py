"""Which EfficientNet-Lite0 stages matter on real CoNSeP tiles: ``search-blocks`` over an all-stage cache, then its
best combination against the default stages, paired by seed.

Data and split as ``quality_consep.py`` (CoNSeP train images only, split by source image: 288 / 48 / 96 tiles).

1. ``extract --blocks all``: the seven stage ends of the frozen packaged EfficientNet-Lite0 (blocks 0, 2, 4, 7, 10,
   14, 15), train / val / test, once.
2. ``search_blocks`` (successive halving): ``--budget`` level subsets of 1..``--max-levels`` levels (a seeded
   sample), trained together for ``--search-epochs`` epochs with fit-decoder's defaults otherwise, ranked by
   validation PQ.
3. The best combination and the default stages (blocks 2, 4, 10, 15), each trained ``--epochs`` epochs per seed
   (fit-decoder's defaults otherwise, minimum area tuned on validation), scored on the test split; the table gives
   mean ± sd over the seeds and the paired difference (best − default) with its sd and a paired t-test.

Every step reuses what ``--work`` already holds (caches, ``search/search.json``, runs with a ``score`` folder),
so an interrupted run resumes; delete ``search/search.json`` to search again. ``--default-scores`` takes score
folders of default-stage runs trained elsewhere with the same protocol (e.g. the ``consep_cpu.yaml`` sweep's, a
cache of the same features), ``{seed}`` in the path standing for the seed. Skips cleanly when the data are absent.

    python benchmarks/search_consep.py [--work DIR] [--seeds 0 1 2] [--epochs 10] [--search-epochs 16] [--budget 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

try:
    from benchmarks._common import REALDATA, machine, md_table, write_results
    from benchmarks.quality_consep import extract_splits
except ImportError:  # run as a script from the benchmarks folder
    from _common import REALDATA, machine, md_table, write_results
    from quality_consep import extract_splits

DEFAULT = "block_2,block_4,block_10,block_15"
"""EfficientNet-Lite0's default stage ends (``blocks=default``)."""
METRICS = ("pq", "mpq_plus", "aji", "dq", "sq")


def _fit_config(caches: dict, out: Path, args, **fields):
    from cellembed.train import FitConfig

    return FitConfig(out=str(out), cache=caches["train"], val_cache=caches["val"], device="cpu",
                     num_workers=args.workers, memory="ram", **fields)


def search(caches: dict, work: Path, args) -> dict:
    from cellembed.train import search_blocks

    found = work / "search" / "search.json"
    if found.is_file():
        return json.loads(found.read_text())
    search_blocks(_fit_config(caches, work / "search", args, epochs=args.search_epochs), strategy="halving",
                  budget=args.budget, max_levels=args.max_levels)
    return json.loads(found.read_text())


def trained_score(caches: dict, work: Path, name: str, levels: str, seed: int, args) -> dict:
    """Test summary of ``levels`` at ``seed`` (``work/<name>/score<seed>``), trained and scored unless there."""
    from cellembed.evaluate import score_run
    from cellembed.train import fit_decoder

    score = work / name / f"score{seed}"
    if not (score / "metrics.json").is_file():
        fit = fit_decoder(_fit_config(caches, work / name / f"seed{seed}", args, levels=levels, epochs=args.epochs,
                                      seed=seed, overwrite=True))
        score_run(fit.run_dir, caches["test"], score, device="cpu", num_workers=args.workers, n_overlays=0,
                  overwrite=True)
    return json.loads((score / "metrics.json").read_text())["summary"]


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder kept between runs (default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the best-vs-default runs")
    parser.add_argument("--search-epochs", type=int, default=16)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--max-levels", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--default-scores", default=None, help="score folders of default-stage runs, {seed} = seed")
    parser.add_argument("--note", default="", help="how the runs were trained (threads, sharing), for the description")
    parser.add_argument("--name", default="search_consep_cpu")
    args = parser.parse_args()
    root = REALDATA / "consep_tiles256"
    if not root.is_dir():
        print(f"skipped: {root} not found (set CELLEMBED_REALDATA)")
        sys.exit(0)
    from scipy.stats import ttest_rel

    work = Path(args.work or tempfile.mkdtemp(prefix="cellembed-search-"))
    caches, _ = extract_splits(root, "packaged", work / "allb", args.workers, blocks="all")
    found = search(caches, work, args)
    best = ",".join(found["best"]["levels"])
    runs = {"best": {}, "default": {}}
    for seed in args.seeds:
        runs["best"][seed] = trained_score(caches, work, "best", best, seed, args)
        if args.default_scores:
            path = Path(args.default_scores.format(seed=seed)) / "metrics.json"
            runs["default"][seed] = json.loads(path.read_text())["summary"]
        else:
            runs["default"][seed] = trained_score(caches, work, "default", DEFAULT, seed, args)
    seeds = args.seeds
    table = []
    for label, levels in (("search's best", best), ("default stages", DEFAULT)):
        key = "best" if label == "search's best" else "default"
        table.append({"levels": f"{label}: {levels.replace('block_', '')}", "seeds": len(seeds),
                      **{m: _mean_sd([runs[key][s][m] for s in seeds]) for m in METRICS}})
    diffs = {m: [runs["best"][s][m] - runs["default"][s][m] for s in seeds] for m in METRICS}
    table.append({"levels": "best − default (paired by seed)", "seeds": len(seeds),
                  **{m: (f"{statistics.mean(d):+.3f} ± {statistics.stdev(d):.3f}" if len(d) > 1
                         else f"{d[0]:+.3f}") for m, d in diffs.items()}})
    p = float(ttest_rel([runs["best"][s]["pq"] for s in seeds], [runs["default"][s]["pq"] for s in seeds]).pvalue) \
        if len(seeds) > 1 else float("nan")
    candidates = [{"rank": c["rank"], "levels": "+".join(c["levels"]).replace("block_", ""),
                   "epochs trained": c["epochs"], "best val PQ": round(c["score"], 3) if c["score"] is not None else ""}
                  for c in found["candidates"]]
    description = (
        "CoNSeP train images only, split by source image (288 / 48 / 96 tiles), frozen efficientnet_lite0_in1k "
        "with its packaged ImageNet weights, all seven stage ends cached once (`extract --blocks all`: blocks 0, "
        f"2, 4, 7, 10, 14, 15). Search: `search-blocks --strategy halving --budget {found['budget']} --max-levels "
        f"{found['max_levels']} --epochs {found['epochs']}` ({found['stopped']}; min rung "
        f"{found.get('min_rung', 1)}), fit-decoder's defaults otherwise, ranked by best validation PQ. Then the "
        f"search's best combination and the default stages trained {args.epochs} epochs per seed (seeds "
        f"{', '.join(map(str, seeds))}; the seed sets initial weights and batch order, so the two are paired), "
        "minimum area tuned on validation, scored on the test split; mean ± sd over seeds, and the paired "
        f"difference (two-sided paired t-test on PQ: p = {p:.3f}). {args.note}")

    def plot(ax):
        ranked = [c for c in found["candidates"] if c["score"] is not None]
        ax.barh(range(len(ranked)), [c["score"] for c in ranked],
                color=["C0" if c["epochs"] == found["epochs"] else "0.7" for c in ranked])
        ax.set_yticks(range(len(ranked)), ["+".join(c["levels"]).replace("block_", "") for c in ranked], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("best validation PQ (grey: dropped at a rung)")
        inset = ax.inset_axes([0.62, 0.08, 0.35, 0.4])
        for s in seeds:
            inset.plot([0, 1], [runs["default"][s]["pq"], runs["best"][s]["pq"]], "o-", color="C1")
        inset.set_xticks([0, 1], ["default", "best"], fontsize=7)
        inset.set_title("test PQ by seed", fontsize=7)
        inset.tick_params(labelsize=7)
        ax.set_title("search-blocks on CoNSeP (EfficientNet-Lite0 stage ends)")

    md = write_results(args.name, {"machine": machine(), "search": found, "best": best, "default": DEFAULT,
                                   "runs": {k: {str(s): v for s, v in r.items()} for k, r in runs.items()},
                                   "paired_p_pq": p, "description": description, "candidates": candidates},
                       table, plot)
    with md.open("a") as f:  # the search's own ranking under the comparison
        f.write("\n## The search's candidates (validation split)\n\n" + md_table(candidates) + "\n")
    print("\n".join(f"{r['levels']}: PQ {r['pq']}" for r in table))


if __name__ == "__main__":
    main()
