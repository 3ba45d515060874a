"""Tables, paired comparisons and figures over the finished runs of one or more sweep folders.

Every number is first computed per run on the test split (``score``: PQ, DQ, SQ, AJI as the mean over test
images with at least one true nucleus; per-class PQ and mPQ+ from TP / FP / FN / IoU pooled per class over the
test split, mPQ+ = mean of the class PQs; semantic runs: Dice per class and mIoU from pixel counts pooled over the
test split, mDice = mean of the class Dices), then summarised over the seeds of a configuration: mean ± sample
standard deviation (ddof = 1; "–" with one seed). :data:`AVERAGING` is written beside every table.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

INSTANCE_AVERAGING = ("Each run: PQ, DQ, SQ and AJI are means over the test images with at least one true nucleus; "
                      "per-class PQ and mPQ+ pool TP/FP/FN/IoU per class over the whole test split (mPQ+ = mean of "
                      "the class PQs, CoNIC).")
SEMANTIC_AVERAGING = ("Semantic runs: Dice and IoU per class from pixel counts summed over the whole test split "
                      "(ignored pixels left out); mDice / mIoU = unweighted mean over the classes present in the "
                      "ground truth or the prediction, class 0 included (FM benchmark: mean over classes).")
SEED_AVERAGING = ("Each cell: mean ± sample sd (ddof = 1) over the seeds of one configuration "
                  "(n = number of seeds); best mean per column in bold (per dataset; none where all tie). Paired "
                  "comparisons: per-seed differences A − B over the seeds both have, their mean and sd, and a "
                  "two-sided paired t-test.")
AVERAGING = f"{INSTANCE_AVERAGING} {SEED_AVERAGING}"


def averaging(keys: list[str]) -> str:
    """The averaging note of a table with these metric keys (instance and / or semantic columns)."""
    parts = [INSTANCE_AVERAGING] if "pq" in keys or "mdice" not in keys else []
    return " ".join(parts + ([SEMANTIC_AVERAGING] if "mdice" in keys else []) + [SEED_AVERAGING])


COLUMNS = (("pq", "PQ"), ("mpq_plus", "mPQ+"), ("aji", "AJI"), ("dq", "DQ"), ("sq", "SQ"))
SEMANTIC_COLUMNS = (("mdice", "mDice"), ("miou", "mIoU"))


class Record(NamedTuple):
    """One finished run: where, which config, which seed, its test scores and its per-epoch history; ``score_key``
    is the validation metric it kept its best epoch by (``val_pq``, ``val_mdice``, ...; the loss if it had none)."""

    folder: Path
    dataset: str
    config_id: str
    name: str
    seed: int
    values: dict
    class_names: list
    history: list
    test_cache: str
    score_key: str = "val_pq"

    @property
    def semantic(self) -> bool:
        return "mdice" in self.values


def collect(sweep_dirs: list[str | Path]) -> list[Record]:
    """Every finished run (``done.json``) under the given sweep folders, in folder order.

    Raises:
        FileNotFoundError: a folder with no finished run (names the folder).
    """
    records = []
    for root in map(Path, sweep_dirs):
        found = sorted(root.glob("runs/*/seed*/done.json"))
        if not found:
            raise FileNotFoundError(f"{root}: no finished runs (runs/*/seed*/done.json); run `cellembed sweep` "
                                    "into this folder first")
        for done in found:
            records.append(_record(done.parent))
    return records


def _record(folder: Path) -> Record:
    done = json.loads((folder / "done.json").read_text())
    resolved = json.loads((folder / "sweep.json").read_text())
    scores = json.loads((folder / "score" / "metrics.json").read_text())
    names = scores["run"]["class_names"]
    semantic = "mdice" in scores["summary"]
    values = {k: scores["summary"].get(k) for k, _ in (SEMANTIC_COLUMNS if semantic else COLUMNS)}
    for c, v in (scores.get("per_class") or {}).items():
        name = names[int(c)] if int(c) < len(names) else c
        values[f"dice_{name}" if semantic else f"pq_{name}"] = v["dice" if semantic else "pq"]
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(x) for x in lines if x.strip()]
    test_cache = folder.parents[2] / "caches" / resolved["cache"] / "test"  # <sweep>/runs/<config>/seed<k>
    return Record(folder, resolved["data"]["dataset"], done["config_id"], done["name"], done["seed"], values,
                  names, history, str(test_cache), _score_key(folder, history, semantic))


def _score_key(folder: Path, history: list[dict], semantic: bool) -> str:
    """The validation metric the run selected its best epoch by; its head's main score when that was a loss."""
    from cellembed.train._fit import metric_key

    best = json.loads((folder / "run" / "config.json").read_text()).get("config", {}).get("best_metric", "pq")
    key = metric_key(best, history[-1]) if history else "val_loss"
    return ("val_mdice" if semantic else "val_pq") if key.endswith("loss") else key


def _mean_sd(values: list) -> tuple[float, float, int]:
    v = np.array([np.nan if x is None else x for x in values], float)
    v = v[~np.isnan(v)]
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def table(records: list[Record]) -> tuple[list[str], list[dict]]:
    """Mind the Gap's Table I: one row per (dataset, configuration), each metric as mean / sd / n over seeds.

    Returns:
        (metric keys in column order, rows). A row holds dataset, config, name, seeds and, per metric key,
        ``(mean, sd, n)``; ``best`` lists the metric keys where this row has the highest mean of its dataset
        (none in a column where every row ties).
    """
    keys = list(dict.fromkeys(k for r in records for k in r.values))
    out = []
    if any(not r.semantic for r in records):
        out += [k for k, _ in COLUMNS[:2]] + [k for k in keys if k.startswith("pq_")] + [k for k, _ in COLUMNS[2:]]
    if any(r.semantic for r in records):
        out += ["mdice"] + [k for k in keys if k.startswith("dice_")] + ["miou"]
    keys = out
    groups: dict = {}
    for r in records:
        groups.setdefault((r.dataset, r.config_id), []).append(r)
    rows = [{"dataset": d, "config": c, "name": rs[0].name, "seeds": sorted(r.seed for r in rs),
             **{k: _mean_sd([r.values.get(k) for r in rs]) for k in keys}, "best": []}
            for (d, c), rs in groups.items()]
    for dataset in {r["dataset"] for r in rows}:
        mine = [r for r in rows if r["dataset"] == dataset]
        for k in keys:
            scored = [r for r in mine if not math.isnan(r[k][0])]
            if len({r[k][0] for r in scored}) > 1:  # a column where every row ties has no best
                top = max(r[k][0] for r in scored)
                for r in scored:
                    if r[k][0] == top:
                        r["best"].append(k)
    return keys, rows


def _label(key: str) -> str:
    if key.startswith("dice_"):
        return f"Dice {key[5:]}"
    return dict(COLUMNS + SEMANTIC_COLUMNS).get(key) or f"PQ {key[3:]}"


def _cell(v: tuple, bold: bool = False) -> str:
    mean, sd, n = v
    if n == 0:
        return "–"
    text = f"{mean:.4f} ± {sd:.4f}" if n > 1 else f"{mean:.4f} ± –"
    return f"**{text}**" if bold else text


def table_markdown(keys: list[str], rows: list[dict]) -> str:
    """The table as markdown, best mean per column in bold, then the averaging note."""
    head = "| dataset | configuration | seeds | " + " | ".join(_label(k) for k in keys) + " |"
    lines = [head, "|---|---|---|" + "---:|" * len(keys)]
    lines += [f"| {r['dataset']} | {r['name']} | {len(r['seeds'])} | "
              + " | ".join(_cell(r[k], k in r["best"]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + f"\n\n{averaging(keys)}\n"


def write_csv(path: Path, keys: list[str], rows: list[dict]) -> None:
    """One row per configuration: ``<metric>_mean``, ``<metric>_sd``, ``<metric>_n`` and ``<metric>_best``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "config", "name", "seeds"] + [f"{k}_{s}" for k in keys for s in ("mean", "sd", "n",
                                                                                              "best")])
        for r in rows:
            w.writerow([r["dataset"], r["config"], r["name"], " ".join(map(str, r["seeds"]))]
                       + [x for k in keys for x in (*r[k], int(k in r["best"]))])


def _find(records: list[Record], key: str) -> list[Record]:
    exact = [r for r in records if key in (r.config_id, r.name)]
    found = exact or [r for r in records if r.config_id.startswith(key)]
    ids = sorted({r.config_id for r in found})
    if len(ids) != 1:
        names = sorted({r.name for r in records})
        raise ValueError(f"--compare {key!r} matches {len(ids)} configurations {ids}; give a name or config id "
                         f"(names: {', '.join(names)})")
    return found


def compare(records: list[Record], a: str, b: str) -> list[dict]:
    """Paired comparison of configurations ``a`` and ``b`` (names or config ids) over the seeds both ran.

    Returns:
        One dict per metric: n (paired seeds), mean and sd of the per-seed differences A − B, the paired t
        statistic and its two-sided p-value (NaN with fewer than two pairs).
    """
    from scipy import stats

    ra, rb = ({r.seed: r for r in _find(records, k)} for k in (a, b))
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise ValueError(f"--compare: {a} (seeds {sorted(ra)}) and {b} (seeds {sorted(rb)}) share no seed")
    out = []
    for key in dict.fromkeys(k for s in seeds for k in ra[s].values):
        pairs = [(ra[s].values.get(key), rb[s].values.get(key)) for s in seeds]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        d = np.array([x - y for x, y in pairs], float)
        t, p = (stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs]) if len(d) > 1 and d.std() > 0
                else (math.nan, math.nan))
        out.append({"metric": key, "n": len(d), "a_mean": float(np.mean([x for x, _ in pairs])) if pairs else math.nan,
                    "b_mean": float(np.mean([y for _, y in pairs])) if pairs else math.nan,
                    "diff_mean": float(d.mean()) if d.size else math.nan,
                    "diff_sd": float(d.std(ddof=1)) if d.size > 1 else math.nan, "t": float(t), "p": float(p)})
    return out


def compare_markdown(a: str, b: str, rows: list[dict]) -> str:
    lines = [f"Paired comparison A = {a}, B = {b} (per-seed differences A − B; paired t-test, two-sided)", "",
             "| metric | seeds | A mean | B mean | mean A − B | sd | t | p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {_label(r['metric'])} | {r['n']} | {r['a_mean']:.4f} | {r['b_mean']:.4f} | {r['diff_mean']:+.4f} | "
              f"{r['diff_sd']:.4f} | {r['t']:.3f} | {r['p']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"
