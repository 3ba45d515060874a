"""Accuracy ablation on real CoNSeP tiles: one change at a time, from the 0.20-PQ decoder to the defaults.

Same data and split as ``quality_consep.py`` (CoNSeP train images only, split by source image: 288 / 48 / 96
tiles), frozen packaged EfficientNet-Lite0, features cached, unetr decoder + CISCA heads. Every step adds one
change to the step before it; each run is fitted, scored on the test split, and diagnosed with oracle swaps
(``benchmarks/_diagnose.py``: PQ when the ground-truth 3-class or directional maps replace the decoder's).

Each finished step is appended to ``results/ablation_consep_cpu.jsonl`` (so a long ablation can be run in
parts, ``--steps``), and the markdown / PNG are rebuilt from every row there. ``--overlay STEP`` also draws
the overlay grid of that step's test predictions (``results/overlays_consep_cpu.png``).

    python benchmarks/ablation_consep.py [--steps NAME ...] [--overlay NAME]

Steps 5 and 6 of the committed table come from the first seed of ``quality_consep.py``'s "pretrained, cache,
dihedral" variant (the same data, split and settings; it appends them to the JSONL, untuned then tuned), so that
run is not paid twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks._common import REALDATA, RESULTS, machine, write_results
    from benchmarks._diagnose import oracle_swaps, overlay_grid
except ImportError:  # run as a script from the benchmarks folder
    from _common import REALDATA, RESULTS, machine, write_results
    from _diagnose import oracle_swaps, overlay_grid

ENCODER = "efficientnet_lite0_in1k"
GROUPS = r"(.+)_\d+$"
OLD = {"input_policy": "resize", "refine": False, "image_skip": False, "loss": "mindthegap", "epochs": 10,
       "lr": 3e-3, "batch_size": 8, "magnification": "40x", "postprocess": None, "augment": "none", "tune": False}
# cumulative: each step = the previous step's settings + its own change
STEPS = [
    ("0 before (0.20 PQ)", {}),
    ("1 native 256 px input", {"input_policy": "native-grid"}),
    ("2 full-resolution image branch + BatchNorm", {"refine": True, "image_skip": True}),
    ("3 + MSGE on the directional maps", {"loss": "mindthegap-msge"}),
    ("4 longer schedule: 20 epochs, batch 4", {"epochs": 20, "batch_size": 4}),
    ("5 dihedral augmentation of the cache", {"augment": "dihedral"}),
    ("6 minimum area tuned on validation", {"tune": True}),
]
POST_HOC = {"tune"}
"""Changes that need no retraining: the step reuses the previous step's run (same seed) and applies them."""
NAME = "ablation_consep_cpu"


def settings(step: str) -> dict:
    out = dict(OLD)
    for name, change in STEPS:
        out.update(change)
        if name == step:
            return out
    raise KeyError(f"unknown step {step!r}; valid: {[s for s, _ in STEPS]}")


def caches(root: Path, policy: str, tmp: Path) -> dict:
    from cellembed.cache import ExtractConfig, extract

    paths = {}
    for split in ("train", "val", "test"):
        out = tmp / f"{policy}-{split}"
        if not (out / "manifest.json").is_file():
            extract(ExtractConfig(dataset="folder", root=str(root), out=str(out), encoder=ENCODER, weights="packaged",
                                  split=split, scheme="cisca", device="cpu", num_workers=2, batch_size=32,
                                  shard_size=64, input_policy=policy, dataset_options={"group_regex": GROUPS}))
        paths[split] = str(out)
    return paths


def run_step(step: str, root: Path, tmp: Path, seed: int) -> tuple[dict, str]:
    from cellembed.evaluate import score_run
    from cellembed.train import FitConfig, fit_decoder

    s = settings(step)
    c = caches(root, s["input_policy"], tmp)
    fit_keys = {k: v for k, v in s.items() if k != "input_policy"}
    run = tmp / f"run-{step.split()[0]}-{seed}"
    index = [name for name, _ in STEPS].index(step)
    change = STEPS[index][1]
    t0 = time.perf_counter()
    config = FitConfig(out=str(run), cache=c["train"], val_cache=c["val"], seed=seed, device="cpu", num_workers=2,
                       memory="ram", best_metric="pq", overwrite=True, **fit_keys)
    previous = tmp / f"run-{STEPS[index - 1][0].split()[0]}-{seed}" if index else None
    if set(change) <= POST_HOC and previous and (previous / "model.safetensors").is_file():
        from types import SimpleNamespace

        from cellembed.evaluate._run import load_run
        from cellembed.train._fit import _tune_min_area

        shutil.copytree(previous, run, dirs_exist_ok=True)
        _tune_min_area(config, run, load_run(run).post)  # what fit-decoder does after training with tune=True
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        best = max(history, key=lambda h: h["val_pq"])
        fit = SimpleNamespace(run_dir=run, history=history, best={"epoch": best["epoch"]},
                              n_params=json.loads((run / "config.json").read_text())["decoder"]["trainable_parameters"])
    else:
        fit = fit_decoder(config, on_epoch=lambda e, n, m: print(f"  [{step}] epoch {e}/{n} val PQ "
                                                                 f"{m.get('val_pq'):.3f}", flush=True))
    fit_s = time.perf_counter() - t0
    score = score_run(fit.run_dir, c["test"], device="cpu", num_workers=2, n_overlays=0, overwrite=True)
    m = score.metrics["summary"]
    swaps = oracle_swaps(fit.run_dir, c["test"])
    row = {"step": step, "seed": seed, "settings": s, "pq": m["pq"], "dq": m["dq"], "sq": m["sq"],
           "mpq_plus": m["mpq_plus"], "aji": m["aji"], "best_epoch": fit.best["epoch"], "fit_seconds": fit_s,
           "epoch_seconds": sorted(h["train_seconds"] for h in fit.history)[len(fit.history) // 2],
           "parameters": fit.n_params, "swaps": swaps, "history": fit.history}
    return row, c["test"]


def render(rows: list[dict]) -> None:
    table = []
    for r in rows:
        sw = {x["maps"]: x for x in r["swaps"]}
        own = sw["decoder maps"]
        table.append({"step": r["step"], "seed": r["seed"], "PQ": f"{r['pq']:.3f}", "DQ": f"{r['dq']:.3f}",
                      "SQ": f"{r['sq']:.3f}", "mPQ+": f"{r['mpq_plus']:.3f}", "AJI": f"{r['aji']:.3f}",
                      "pred / true nuclei": f"{own['pred_instances']} / {own['true_instances']}",
                      "split / merged": f"{own['split_true']} / {own['merged_pred']}",
                      "PQ, GT 3-class": f"{sw['GT 3-class map']['pq']:.3f}",
                      "PQ, GT directions": f"{sw['GT directional maps']['pq']:.3f}",
                      "PQ, oracle": f"{sw['GT both (oracle)']['pq']:.3f}",
                      "epochs (best)": f"{r['settings']['epochs']} ({r['best_epoch']})",
                      "s / epoch": f"{r['epoch_seconds']:.0f}"})
    description = (
        "CoNSeP train images only, split by source image (288 / 48 / 96 tiles of 256², 18 / 3 / 6 images), "
        f"frozen packaged {ENCODER}, cached features, unetr decoder + CISCA heads, 40x targets and "
        "post-processing, best epoch by validation PQ, scored on the test split. Each step adds one change to "
        "the step above it. 'PQ, GT 3-class' / 'GT directions': the same run's test PQ when the ground-truth "
        "map replaces that head's prediction; 'oracle': both (the post-processing's ceiling on these tiles). "
        "'split': true nuclei covered ≥ 20 % each by two or more predictions; 'merged': predictions covering "
        "≥ 20 % each of two or more true nuclei. s / epoch: median training seconds per epoch on this CPU.")
    payload = {"machine": machine(), "rows": rows, "description": description}

    def plot(ax):
        labels = [f"{r['step'].split()[0]}/s{r['seed']}" for r in rows]
        x = range(len(rows))
        ax.plot(x, [r["pq"] for r in rows], "o-", label="PQ")
        ax.plot(x, [r["mpq_plus"] for r in rows], "s-", label="mPQ+")
        ax.plot(x, [next(s["pq"] for s in r["swaps"] if s["maps"] == "GT both (oracle)") for r in rows], "k--",
                label="oracle PQ")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("test")
        ax.set_title("CoNSeP ablation (each step adds one change)")
        ax.legend(fontsize=7)

    write_results(NAME, payload, table, plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="*", default=[s for s, _ in STEPS],
                        help="steps to run (none: only rebuild the markdown / PNG from the JSONL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlay", default=None, help="step whose test predictions to draw")
    parser.add_argument("--cache-dir", default=None, help="keep caches here between invocations")
    args = parser.parse_args()
    root = REALDATA / "consep_tiles256"
    if not (root / "labels.npz").is_file():
        print(f"ablation_consep: no CoNSeP tiles at {root} (set CELLEMBED_REALDATA); skipped.")
        sys.exit(0)
    tmp = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="cellembed-ablation-"))
    jsonl = RESULTS / f"{NAME}.jsonl"
    if not args.steps:
        render([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()])
        return
    try:
        for step in args.steps:
            row, test = run_step(step, root, tmp, args.seed)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("step", "pq", "mpq_plus", "aji")}), flush=True)
            if step == args.overlay:
                overlay_grid(tmp / f"run-{step.split()[0]}-{args.seed}", test, RESULTS / "overlays_consep_cpu.png")
    finally:
        if not args.cache_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    render([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
