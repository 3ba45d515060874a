"""search-blocks: greedy forward selection and successive halving over cached levels, on a tiny cache."""

import json

import pytest
from typer.testing import CliRunner

from cellembed.cache import ExtractConfig, extract
from cellembed.cli import app
from cellembed.evaluate import score_run
from cellembed.train import FitConfig
from cellembed.train import search_blocks
from cellembed.train._search import _score, halving_rungs

POOL = "block_1,block_3,block_5"


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    out = {}
    for name, seed in (("train", 0), ("val", 1)):
        out[name] = root / name
        extract(ExtractConfig(dataset="synthetic", out=str(out[name]), encoder="test_vit", weights="random",
                              device="cpu", num_workers=0, shard_size=4, batch_size=4, blocks="all",
                              dataset_options={"n_tiles": 8, "seed": seed, "size": 64}))
    return out


def _base(caches, out, **kw):
    base = dict(out=str(out), cache=str(caches["train"]), val_cache=str(caches["val"]), epochs=1, batch_size=4,
                device="cpu", num_workers=0, lr=1e-3, memory="ram", levels=POOL, refine=False)
    return FitConfig(**{**base, **kw})


def test_greedy_ranks_writes_and_keeps_a_scorable_best_run(caches, tmp_path):
    rounds = []
    result = search_blocks(_base(caches, tmp_path / "s"), budget=5, on_round=lambda r, c: rounds.append(c))
    assert rounds[0] == [["block_1"], ["block_3"], ["block_5"]]
    if len(rounds) > 1:  # round 2 adds each other level to round 1's best single level
        first = max((r for r in result.table if r["round"] == 1), key=lambda r: r["score"])["levels"]
        assert all(set(first) < set(c) and len(c) == 2 for c in rounds[1])
    assert len(rounds) <= 2 and sum(map(len, rounds)) <= 5  # round 3 would exceed the budget of 5 decoders
    assert result.stopped.startswith(("budget", "no level added"))
    scores = [r["score"] for r in result.table]
    assert scores == sorted(scores, reverse=True) and result.best == result.table[0]
    out = tmp_path / "s"
    saved = json.loads((out / "search.json").read_text())
    assert [c["levels"] for c in saved["candidates"]] == [r["levels"] for r in result.table]
    assert "| rank | levels |" in (out / "search.md").read_text() and (out / "search.png").stat().st_size > 0
    best = out / "runs" / "+".join(result.best["levels"])
    assert json.loads((best / "config.json").read_text())["config"]["levels"] == ",".join(result.best["levels"])
    assert (best / "tune.json").is_file()  # the best run alone is tuned
    assert not any((out / "runs" / "+".join(r["levels"]) / "tune.json").exists() for r in result.table[1:])
    scored = score_run(best, caches["val"], tmp_path / "score", device="cpu", num_workers=0)
    assert 0.0 <= scored.metrics["summary"]["pq"] <= 1.0
    again = search_blocks(_base(caches, tmp_path / "s"), budget=5)  # a rerun reuses the finished runs
    assert again.table == result.table


def test_halving_stops_the_worse_half_at_the_rung(caches, tmp_path):
    result = search_blocks(_base(caches, tmp_path / "h", epochs=2, tune=False), strategy="halving", budget=4,
                           max_levels=2)
    assert len(result.table) == 4 and halving_rungs(4, 2) == [1]
    assert json.loads((tmp_path / "h" / "search.json").read_text())["min_rung"] == 1  # ⌈0.3 × 2⌉: the warmup's end
    survivors = [r for r in result.table if r["epochs"] == 2]
    pruned = [r for r in result.table if r["epochs"] == 1]
    assert len(survivors) == len(pruned) == 2 and result.table[:2] == survivors
    at_rung = lambda r: _score(  # noqa: E731
        [json.loads(x) for x in open(r["run"] + "/metrics.jsonl").read().splitlines()][:1], "pq", False)
    assert min(map(at_rung, survivors)) >= max(map(at_rung, pruned))


def test_rungs_and_refusals(caches, tmp_path):
    assert halving_rungs(16, 16) == [1, 2, 4, 8] and halving_rungs(1, 10) == [] and halving_rungs(8, 2) == [1]
    assert halving_rungs(16, 16, first=5) == [5, 8]  # none inside a 16-epoch OneCycle's warmup (0.3 x 16 -> 5)
    assert halving_rungs(16, 16, first=16) == [] and halving_rungs(4, 2, first=1) == [1]
    with pytest.raises(ValueError, match="--val-cache"):
        search_blocks(_base(caches, tmp_path / "x", val_cache=None))
    with pytest.raises(ValueError, match="block_9 are not cached"):
        search_blocks(_base(caches, tmp_path / "x", levels="block_1,block_9"))
    with pytest.raises(ValueError, match="budget 2 is below the first round's 3 decoders"):
        search_blocks(_base(caches, tmp_path / "x"), budget=2)
    with pytest.raises(ValueError, match="unknown strategy"):
        search_blocks(_base(caches, tmp_path / "x"), strategy="random")


def test_cli_search_blocks_end_to_end(caches, tmp_path):
    args = ["search-blocks", str(caches["train"]), "--val-cache", str(caches["val"]), "--out", str(tmp_path / "c"),
            "--levels", "block_2,block_4", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--memory", "ram", "--budget", "2", "--no-tune"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best" in result.output and (tmp_path / "c" / "search.md").is_file()
    assert len(json.loads((tmp_path / "c" / "search.json").read_text())["candidates"]) == 2
    bad = CliRunner().invoke(app, args[:-3] + ["--strategy", "random"])
    assert bad.exit_code == 2 and "unknown strategy" in bad.output and "Traceback" not in bad.output


def test_halving_drops_nobody_during_the_warmup(caches, tmp_path):
    """4 candidates, 4 epochs: without a first rung they would be halved after epochs 1 and 2; the warmup (0.3 x 4)
    ends with epoch 2, so the one halving is there and two candidates finish."""
    assert halving_rungs(4, 4) == [1, 2]
    result = search_blocks(_base(caches, tmp_path / "w", epochs=4, tune=False), strategy="halving", budget=4,
                           max_levels=2)
    assert sorted(r["epochs"] for r in result.table) == [2, 2, 4, 4]
    assert json.loads((tmp_path / "w" / "search.json").read_text())["min_rung"] == 2
