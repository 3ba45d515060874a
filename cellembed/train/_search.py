"""Which cached depths matter: rank combinations of levels by validation score, many decoders per pass.

With every block cached once (``extract --blocks all``), "Mind the Gap"'s shallow / deep / mixed question is a
search over level subsets, each candidate a decoder trained by :func:`~cellembed.train.fit_many` (one read of
the cache per epoch for every candidate of a round):

- ``greedy`` (forward selection): round 1 trains one decoder per single level; each next round adds to the
  best combination so far each level it lacks, one decoder per addition; the search stops when no addition
  beats the best by more than ``min_gain``, at ``max_levels`` levels, or before a round that would exceed
  ``budget`` decoders.
- ``halving`` (successive halving): candidates are the subsets of 1..``max_levels`` levels (a seeded sample of
  ``budget`` of them when there are more), trained together in one pass; after epochs E/2^(R-1), ..., E/2
  (R = ⌈log2 n⌉ rungs, rounded, distinct, none before ``min_rung``) the worse half of the candidates still
  training stops. ``min_rung`` defaults to the end of the OneCycle warmup (⌈warmup × E⌉): during the warmup
  validation PQ is near zero for every candidate (0.00–0.08 after epoch 1 on CoNSeP) and ranks nothing.

A candidate's score is its run's best ``best_metric`` (validation PQ by default). Writes into ``out``::

    runs/<level+level>/  one normal run per candidate (score, tune and resume it as any run)
    search.json          settings, every candidate (levels, round, score, epochs, parameters, run), the best
    search.md            the ranking as a markdown table
    search.png           every candidate's validation curve, and the ranking

A rerun with the same settings resumes: finished runs are reused, interrupted ones continue.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cellembed.train._fit import FitConfig, _level_names, metric_key
from cellembed.train._many import ManyEpochCallback, fit_many

STRATEGIES = ("greedy", "halving")
RoundCallback = Callable[[int, list[list[str]]], None]  # (round, the level combinations it trains)


class SearchResult(NamedTuple):
    """A finished search: its folder, the ranking (best first), the best candidate, why it stopped, its time."""

    out: Path
    table: list[dict]
    best: dict
    stopped: str
    seconds: float


def search_blocks(base: FitConfig, *, strategy: str = "greedy", budget: int | None = None, max_levels: int = 4,
                  min_gain: float = 0.0, min_rung: int | None = None, on_round: RoundCallback | None = None,
                  on_epoch: ManyEpochCallback | None = None, on_step=None) -> SearchResult:
    """Rank combinations of a cache's levels by validation score (see the module docstring).

    Args:
        base: the settings of every candidate; ``out`` is the search folder, ``levels`` the pool of levels to
            combine (default: every cached level), ``val_cache`` is required. Candidates skip ``tune``; the best
            one is tuned when ``base.tune`` is set.
        strategy: "greedy" or "halving".
        budget: the most decoders trained (default: no limit for greedy, every subset for halving).
        max_levels: the largest combination (unetr feeds at most 4 levels to its 4 decoder levels as designed).
        min_gain: greedy: how much an added level must improve the score to be kept.
        min_rung: halving: the earliest epoch after which candidates are dropped (default: the end of the
            warmup, ⌈``base.warmup`` × ``base.epochs``⌉, at least 1).
        on_round: called before each round with (round, its level combinations).
        on_epoch, on_step: progress of the passes, as :func:`~cellembed.train.fit_many`'s.

    Raises:
        ValueError: bad settings (named), or anything ``fit_many`` refuses.
    """
    from cellembed.cache import open_cache

    t0 = time.perf_counter()
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not base.val_cache:
        raise ValueError("search-blocks ranks combinations by validation score: give --val-cache VAL")
    if max_levels < 1 or (budget is not None and budget < 1):
        raise ValueError(f"max_levels and budget must be >= 1, got {max_levels} and {budget}")
    if min_rung is None:
        min_rung = max(1, math.ceil(base.warmup * base.epochs))
    if min_rung < 1:
        raise ValueError(f"min_rung must be >= 1, got {min_rung}")
    cached = open_cache(base.cache).level_names
    pool = _level_names(base.levels) or cached
    unknown = [n for n in pool if n not in cached]
    if unknown:
        raise ValueError(f"levels {', '.join(unknown)} are not cached in {base.cache} (it holds {', '.join(cached)})")
    search = _Search(base, [n for n in cached if n in pool], on_round, on_epoch, on_step)
    if strategy == "greedy":
        stopped = search.greedy(budget, max_levels, min_gain)
    else:
        stopped = search.halving(budget, max_levels, min_rung)
    table = search.ranking()
    best = table[0]
    if base.tune:
        _tune_best(search.configs[best["run"]], Path(best["run"]))
    result = SearchResult(Path(base.out), table, best, stopped, time.perf_counter() - t0)
    _write(result, base, strategy, budget, max_levels, search.pool, min_rung if strategy == "halving" else None)
    return result


class _Search:
    """The candidates trained so far and how to train more of them."""

    def __init__(self, base: FitConfig, pool: list[str], on_round, on_epoch, on_step):
        self.base, self.pool = base, pool
        self.on_round, self.on_epoch, self.on_step = on_round, on_epoch, on_step
        self.rows: list[dict] = []
        self.configs: dict[str, FitConfig] = {}
        self.lower = base.best_metric.endswith("loss")

    def config(self, levels: list[str]) -> FitConfig:
        out = Path(self.base.out) / "runs" / "+".join(levels)
        return dataclasses.replace(self.base, out=str(out), levels=",".join(levels), tune=False)

    def train(self, round_: int, combos: list[list[str]], prune=None) -> list[dict]:
        if self.on_round:
            self.on_round(round_, combos)
        configs = [self.config(c) for c in combos]
        results = fit_many(configs, on_epoch=self.on_epoch, on_step=self.on_step, prune=prune)
        rows = [{"levels": c, "round": round_, "score": _score(r.history, self.base.best_metric, self.lower),
                 "metric": r.best["metric"] if r.best else None, "best_epoch": (r.best or {}).get("epoch"),
                 "epochs": len(r.history), "parameters": r.n_params, "run": str(r.run_dir)}
                for c, r in zip(combos, results)]
        self.configs.update({str(r.run_dir): cfg for cfg, r in zip(configs, results)})
        self.rows += rows
        return rows

    def better(self, a: float, b: float, margin: float = 0.0) -> bool:
        return a < b - margin if self.lower else a > b + margin

    def greedy(self, budget: int | None, max_levels: int, min_gain: float) -> str:
        chosen, best, spent = [], None, 0
        for round_ in itertools.count(1):  # returns when a stopping rule holds
            if len(chosen) >= min(max_levels, len(self.pool)):
                return f"reached {len(chosen)} levels"
            combos = [[n for n in self.pool if n in chosen or n == add] for add in self.pool if add not in chosen]
            if budget is not None and spent + len(combos) > budget:
                if round_ == 1:
                    raise ValueError(f"budget {budget} is below the first round's {len(combos)} decoders (one per "
                                     "level); raise --budget or pass fewer --levels")
                return f"budget: round {round_} needs {len(combos)} more decoders ({spent} of {budget} trained)"
            rows = self.train(round_, combos)
            spent += len(rows)
            top = rows[0]
            for row in rows[1:]:
                top = row if self.better(row["score"], top["score"]) else top
            if best is not None and not self.better(top["score"], best, min_gain):
                return f"no level added to {'+'.join(chosen)} improved {self.base.best_metric} by more than {min_gain}"
            chosen, best = top["levels"], top["score"]
        raise AssertionError("itertools.count ended")

    def halving(self, budget: int | None, max_levels: int, min_rung: int = 1) -> str:
        combos = [list(c) for k in range(1, min(max_levels, len(self.pool)) + 1)
                  for c in itertools.combinations(self.pool, k)]
        if budget is not None and budget < len(combos):
            keep = np.random.default_rng(self.base.seed).choice(len(combos), size=budget, replace=False)
            combos = [combos[i] for i in sorted(keep)]
        rungs = halving_rungs(len(combos), self.base.epochs, min_rung)
        metric, lower = self.base.best_metric, self.lower

        def prune(epoch: int, histories: list[list[dict]]) -> list[int]:
            alive = list(range(len(histories)))
            for rung in (r for r in rungs if r <= epoch):
                ranked = sorted(alive, key=lambda i: _score(histories[i][:rung], metric, lower), reverse=not lower)
                alive = sorted(ranked[: math.ceil(len(alive) / 2)])
            return [i for i in range(len(histories)) if i not in alive]

        self.train(1, combos, prune)
        return f"halving: {len(combos)} candidates, rungs at epochs {', '.join(map(str, rungs)) or 'none'}"

    def ranking(self) -> list[dict]:
        """Longest-trained first (halving's survivors), then by score; rank numbers added."""
        sign = 1 if self.lower else -1
        rows = sorted(self.rows, key=lambda r: (-r["epochs"], sign * r["score"]))
        return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def halving_rungs(n: int, epochs: int, first: int = 1) -> list[int]:
    """Epochs after which successive halving drops the worse half: E/2^(R-1), ..., E/2 for R = ⌈log2 n⌉,
    rounded, at least ``first``, below E, distinct (rungs raised to ``first`` merge, so fewer halvings)."""
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    rungs = {max(first, 1, round(epochs / 2 ** k)) for k in range(1, rounds + 1)}
    return sorted(r for r in rungs if r < epochs)


def _score(history: list[dict], metric: str, lower: bool) -> float:
    """The best value of ``metric`` in ``history`` (as ``_keep_best`` picks it; a missing value is the worst)."""
    worst = math.inf if lower else -math.inf
    values = [h.get(metric_key(metric, h)) for h in history]
    values = [worst if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
    if not values:
        return worst
    return min(values) if lower else max(values)


def _tune_best(config: FitConfig, run_dir: Path) -> None:
    from cellembed.evaluate._predict import INSTANCE_HEADS, Postprocess
    from cellembed.train._fit import _tune_min_area

    if config.head in INSTANCE_HEADS:
        post = Postprocess(**json.loads((run_dir / "config.json").read_text())["postprocess"])
        _tune_min_area(config, run_dir, post)


def _write(result: SearchResult, base: FitConfig, strategy: str, budget, max_levels: int, pool: list[str],
           min_rung: int | None = None) -> None:
    from cellembed.cache._manifest import write_json_atomic

    out = result.out
    finite = lambda r: {**r, "score": r["score"] if math.isfinite(r["score"]) else None}  # noqa: E731
    write_json_atomic(out / "search.json", {
        "strategy": strategy, "metric": base.best_metric, "budget": budget, "max_levels": max_levels,
        **({"min_rung": min_rung} if min_rung is not None else {}),
        "pool": pool, "epochs": base.epochs, "cache": base.cache, "val_cache": base.val_cache,
        "stopped": result.stopped, "best": finite(result.best), "candidates": [finite(r) for r in result.table],
        "seconds": result.seconds})
    rows = [{**r, "levels": "+".join(r["levels"])} for r in result.table]
    cols = ("rank", "levels", "round", "score", "best_epoch", "epochs", "parameters", "run")
    lines = [f"# search-blocks: {strategy}, by {base.best_metric}\n", f"Stopped: {result.stopped}.\n",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.4f}" if c == "score" and math.isfinite(r[c]) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "search.md").write_text("\n".join(lines) + "\n")
    _plot(out, result.table, base.best_metric)


def _plot(out: Path, table: list[dict], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for r in reversed(table):
        history = [json.loads(line) for line in (Path(r["run"]) / "metrics.jsonl").read_text().splitlines()]
        key = metric_key(metric, history[-1]) if history else metric
        best = r["rank"] == 1
        curves.plot([h["epoch"] for h in history], [h.get(key) for h in history], "o-", ms=3,
                    color="C3" if best else "0.6", lw=2 if best else 0.8, label="+".join(r["levels"]) if best else None,
                    zorder=3 if best else 1)
    curves.set(xlabel="epoch", ylabel=f"validation {metric}", title="every candidate (best in red)")
    curves.legend()
    top = table[:15]
    bars.barh(range(len(top)), [r["score"] if math.isfinite(r["score"]) else math.nan for r in top],
              color=["C3"] + ["C0"] * (len(top) - 1))
    bars.set_yticks(range(len(top)), ["+".join(r["levels"]) for r in top], fontsize=7)
    bars.invert_yaxis()
    bars.set(xlabel=f"best {metric}", title="ranking")
    fig.tight_layout()
    fig.savefig(out / "search.png", dpi=100)
    plt.close(fig)
