"""cellembed sweep / report: plan, parts, locks, a killed-and-resumed sweep, two parts at once, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellembed._config import ConfigError
from cellembed.cli import app
from cellembed.sweep import Lock, load_sweep, parse_part, parse_sets, share

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sweeps" / "tiny.yaml"


@pytest.mark.parametrize("text", ["3/2", "0/2", "1", "a/2", "2/0", "-1/2"])
def test_bad_part_is_one_clear_line(text):
    with pytest.raises(ValueError, match=r"--part .* should be I/N with 1 <= I <= N") as err:
        parse_part(text, {})
    assert "\n" not in str(err.value)


def test_part_from_slurm_array_any_numbering():
    env = lambda i, lo, n, step=1: {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": str(lo),  # noqa: E731
                                    "SLURM_ARRAY_TASK_COUNT": str(n), "SLURM_ARRAY_TASK_STEP": str(step)}
    assert [parse_part(None, env(i, 0, 4)) for i in range(4)] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # --array=0-3
    assert [parse_part(None, env(i, 1, 4)) for i in range(1, 5)] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 1-4
    assert [parse_part(None, env(i, 0, 3, 5)) for i in (0, 5, 10)] == [(1, 3), (2, 3), (3, 3)]  # 0-10:5
    assert parse_part("2/3", env(0, 0, 4)) == (2, 3)  # --part wins
    assert parse_part(None, {}) == (1, 1)
    irregular = {**env(3, 1, 3), "SLURM_ARRAY_TASK_MAX": "7"}  # --array=1,3,7
    with pytest.raises(ValueError, match="not a regular range"):
        parse_part(None, irregular)


def test_parts_cover_every_config_once():
    ids = [f"c{i}" for i in range(7) for _ in range(3)]  # 7 configs x 3 seeds
    for n in (1, 2, 3, 7, 9):
        shares = [share(ids, (i, n)) for i in range(1, n + 1)]
        assert sorted(c for s in shares for c in s) == sorted(set(ids))


def test_plan_shares_one_cache_per_encoder_and_hashes_the_config(tmp_path):
    sweep = load_sweep(TINY, out=tmp_path)
    assert len(sweep.runs) == 6 and len(sweep.caches) == 2
    vit = next(c for c in sweep.caches if c.encoder == "test_vit")
    assert vit.configs["train"].blocks == "0,1,2,3,4,5" and vit.configs["test"].split == "test"
    levels = {r.name: r.fit.levels for r in sweep.runs}
    assert levels["test_vit-shallow"] == "block_0,block_1,block_2"
    assert levels["test_vit-deep"] == "block_3,block_4,block_5"
    eff = next(c for c in sweep.caches if c.encoder == "efficientnet_lite0_in1k")
    assert eff.configs["train"].weights == "packaged" and vit.configs["train"].weights == "random"
    assert [r.seed for r in load_sweep(TINY, parse_sets(["seeds=[4, 5, 6]"]), out=tmp_path).runs[:3]] == [4, 5, 6]
    changed = load_sweep(TINY, parse_sets(["epochs=3"]), out=tmp_path)
    assert {r.config_id for r in changed.runs}.isdisjoint({r.config_id for r in sweep.runs})
    assert [r.folder.parent.name.rsplit("-", 1)[0] for r in changed.runs[::2]] == [r.name for r in sweep.runs[::2]]


@pytest.mark.parametrize("text, message", [
    ("data: {dataset: synthetic}\nruns: [{encoder: test_vit}]\nfitt: {}\n", r"unknown section\(s\) \['fitt'\]"),
    ("data: {dataset: synthetic}\nruns: [{encoder: test_vit, lrr: 1}]\n", r"unknown key\(s\) \['lrr'\]"),
    ("data: {dataset: synthetic}\nruns: [{encoder: test_vit, seed: 1}]\n", r"`seed` is set by the sweep"),
    ("data: {dataset: synthetic}\nruns: [{blocks: deep}]\n", r"each run needs an `encoder`"),
    ("data: {dataset: synthetic}\n", r"no configurations"),
])
def test_bad_sweep_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path, out=tmp_path)
    assert str(path) in str(err.value)


def test_lock_is_exclusive_and_a_stale_or_dead_lock_is_taken_over(tmp_path):
    a, b = Lock(tmp_path / "x.lock", stale=60), Lock(tmp_path / "x.lock", stale=60)
    assert a.acquire() and not b.acquire()
    assert a.holder()["pid"] == os.getpid()
    a._stop.set()  # a crashed job: no more heartbeats
    old = time.time() - 120
    os.utime(tmp_path / "x.lock", (old, old))
    assert b.acquire()  # stale: taken over
    b.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "y.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "time": 0}))
    assert Lock(tmp_path / "y.lock", stale=60).acquire()  # fresh file, but its process is gone


def _sweep_cmd(out, *extra):
    return [sys.executable, "-m", "cellembed", "sweep", str(TINY), "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _summaries(out: Path) -> dict:
    """Each run's test scores and its per-epoch losses and validation scores (times left out)."""
    return {str(p.parent.relative_to(out)): (json.loads(p.read_text())["summary"],
                                             [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                                              for line in (p.parent / "run" / "metrics.jsonl").read_text().splitlines()])
            for p in sorted(out.glob("runs/*/seed*/done.json"))}


@pytest.mark.slow
def test_sweep_parts_at_once_then_killed_and_resumed_sweep_matches(tmp_path):
    # two parts started together on one folder: every run once, each by its own part
    both = tmp_path / "both"
    procs = [subprocess.Popen(_sweep_cmd(both, "--part", f"{i}/2"), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    log = [json.loads(line) for line in (both / "log.jsonl").read_text().splitlines()]
    started = [e["run"] for e in log if e["event"] == "started"]
    assert len(started) == len(set(started)) == 6
    assert {e["pid"] for e in log} == {p.pid for p in procs}
    sweep = load_sweep(TINY, out=both)
    for e in log:
        assert e["run"].split("/")[0] in share([r.config_id for r in sweep.runs], tuple(map(int, e["part"].split("/"))))
    assert len(list(both.glob("caches/*/*/manifest.json"))) == 6  # two encoders x three splits, extracted once
    # the same sweep killed mid-run (SIGKILL), then resumed: the same tables
    again = tmp_path / "again"
    proc = subprocess.Popen(_sweep_cmd(again), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list(again.glob("runs/*/seed*/done.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(list(again.glob("runs/*/seed*/done.json"))) < 6, "the sweep ended before it could be killed"
    resumed = subprocess.run(_sweep_cmd(again), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got, want = _summaries(again), _summaries(both)
    assert len(want) == 6 and got.keys() == want.keys()
    assert got == want, [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    finished = subprocess.run(_sweep_cmd(again), env=ENV, capture_output=True, text=True, timeout=600)
    assert finished.stdout.count("done before") == 6  # nothing is run twice
    # the report: Table I, a paired comparison, curves, overlays, one HTML page
    result = CliRunner().invoke(app, ["report", str(again), "--compare", "test_vit-shallow", "test_vit-deep"])
    assert result.exit_code == 0, result.output
    report = again / "report"
    table = (report / "table.md").read_text()
    assert table == _report_table(both)
    assert table.count("±") >= 3 * 5 and "mean ± sample sd" in table
    compare = (report / "compare.md").read_text()
    assert "| PQ | 2 |" in compare and "paired t-test" in compare
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    for png in ("curves.png", "overlays.png"):
        assert (report / png).stat().st_size > 10_000


def _report_table(out: Path) -> str:
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(out / "report")])
    assert result.exit_code == 0, result.output
    return (out / "report" / "table.md").read_text()


def test_sweep_cli_refuses_a_bad_part(tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(TINY), "--out", str(tmp_path), "--part", "3/2"])
    assert result.exit_code == 2 and "should be I/N" in result.output and "Traceback" not in result.output


def test_a_failing_config_is_reported_and_the_sweep_goes_on(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data: {dataset: synthetic, scheme: cisca, dataset_options: {n_tiles: 10, size: 64}}\n"
                    "extract: {num_workers: 0, device: cpu}\nfit: {device: cpu, num_workers: 0}\n"
                    f"runs:\n  - {{encoder: test_vit, blocks: deep, extract: {{weights: {tmp_path / 'a.safetensors'}}}}}\n"
                    f"  - {{encoder: test_vit, blocks: mixed, extract: {{weights: {tmp_path / 'b.safetensors'}}}}}\n")
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    failed = sorted((tmp_path / "out").glob("runs/*/seed0/failed.json"))
    assert len(failed) == 2  # the first failure did not stop the second configuration
    assert "a.safetensors" in json.loads(failed[0].read_text())["error"] + json.loads(failed[1].read_text())["error"]
    assert result.output.count("failed") >= 2 and "Traceback" not in result.output


def _rec(config, seed, pq, aji):
    from cellembed.sweep._report import Record

    return Record(Path("."), "d", config, config, seed, {"pq": pq, "mpq_plus": 0.5, "aji": aji, "dq": None,
                                                         "sq": 0.7}, [], [], "")


def test_table_is_mean_and_sd_over_seeds_with_the_best_marked_and_compare_is_paired():
    from cellembed.sweep import compare, table
    from cellembed.sweep._report import table_markdown

    records = [_rec("a", 0, 0.5, 0.4), _rec("a", 1, 0.7, 0.6), _rec("b", 0, 0.4, 0.5), _rec("b", 1, 0.5, 0.9)]
    keys, rows = table(records)
    a, b = rows
    assert a["pq"][0] == pytest.approx(0.6) and a["pq"][1] == pytest.approx(0.1414213, rel=1e-5) and a["pq"][2] == 2
    assert a["best"] == ["pq"] and b["best"] == ["aji"]  # mPQ+ and SQ tie: no best; DQ has no values
    md = table_markdown(keys, rows)
    assert "**0.6000 ± 0.1414**" in md and "**0.7000 ± 0.2828**" in md and "| – |" in md
    pq = next(r for r in compare(records, "a", "b") if r["metric"] == "pq")
    assert pq["n"] == 2 and pq["diff_mean"] == pytest.approx(0.15) and pq["diff_sd"] == pytest.approx(0.0707107)
    from scipy import stats
    assert pq["p"] == pytest.approx(stats.ttest_rel([0.5, 0.7], [0.4, 0.5]).pvalue)
    with pytest.raises(ValueError, match="matches 0 configurations"):
        compare(records, "a", "zzz")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_resolves(path, tmp_path):
    """Each file of configs/sweeps/ plans (known encoders, blocks, fields) and its runs read their own caches."""
    sweep = load_sweep(path, out=tmp_path)
    assert sweep.runs and sweep.caches
    assert len({r.folder for r in sweep.runs}) == len(sweep.runs)  # no two runs share a folder
    for run in sweep.runs:
        assert run.fit.cache == str(run.cache.paths["train"]) and run.fit.levels
