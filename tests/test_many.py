"""Many decoders per pass: same results as separate runs, refused mismatches, resume, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cellembed.cache import ExtractConfig, extract
from cellembed.cli import app
from cellembed.evaluate import score_run
from cellembed.train import FitConfig, fit_decoder
from cellembed.train._checkpoint import last_tensors
from cellembed.train._many import fit_many, parse_variant, variant_configs


def _cache(path, seed, n=8):
    extract(ExtractConfig(dataset="synthetic", out=str(path), encoder="test_vit", weights="random", device="cpu",
                          num_workers=0, shard_size=4, batch_size=4, blocks="all",
                          dataset_options={"n_tiles": n, "seed": seed, "size": 64}))
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    return {"train": _cache(root / "train", 0), "val": _cache(root / "val", 1)}


def _config(caches, out, **kw):
    base = dict(out=str(out), cache=str(caches["train"]), val_cache=str(caches["val"]), epochs=2, batch_size=4,
                device="cpu", num_workers=0, lr=1e-3, memory="ram", tune=False, augment="dihedral")
    return FitConfig(**{**base, **kw})


def _state(run_dir):
    """Model weights and optimizer moments of the last finished epoch (rng.torch is left out: training draws
    nothing from torch's global generator, and what it holds depends on how many loaders were iterated)."""
    return {k: v for k, v in load_file(str(last_tensors(run_dir))).items() if not k.startswith("rng.")}


def _no_times(history):
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


VARIANTS = (dict(levels="block_1,block_3", refine=False), dict(levels="block_5", lr=2e-3, epochs=3, refine=False),
            dict(seed=1, data_seed=0), dict(refine=False, levels="block_2,block_4", loss="mindthegap"))


def test_many_equals_separate_runs_bit_for_bit(caches, tmp_path):
    configs = [_config(caches, tmp_path / "many" / str(i), **v) for i, v in enumerate(VARIANTS)]
    steps = []
    many = fit_many(configs, on_step=steps.append)
    assert sum(steps) == 8 * 3  # 8 tiles per epoch, each read once for all four decoders; 3 epochs (the longest)
    for i, (config, result) in enumerate(zip(configs, many)):
        alone = fit_decoder(_config(caches, tmp_path / "alone" / str(i), **VARIANTS[i]))
        a, b = _state(alone.run_dir), _state(result.run_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), VARIANTS[i]
        assert _no_times(alone.history) == _no_times(result.history), VARIANTS[i]
        assert result.epochs_run == config.epochs and result.best == alone.best and result.n_params == alone.n_params
        ra = json.loads((alone.run_dir / "config.json").read_text())
        rb = json.loads((result.run_dir / "config.json").read_text())
        assert {**ra, "config": None} == {**rb, "config": None}  # same levels, decoder, cache key, post-processing
    # the variants really differ: other levels, other seed
    assert many[0].n_params != many[1].n_params
    w0, w2 = _state(many[0].run_dir), _state(tmp_path / "alone" / "2")
    assert w0.keys() != w2.keys() or any(not torch.equal(w0[k], w2[k]) for k in w0)


def test_seed_variants_without_data_seed_are_refused(caches, tmp_path):
    a, b = _config(caches, tmp_path / "a"), _config(caches, tmp_path / "b", seed=1)
    with pytest.raises(ValueError, match=r"config 1 .* data_seed"):
        fit_many([a, b])


@pytest.mark.parametrize("field, value", [("batch_size", 2), ("augment", "none"), ("head", "hovernet"),
                                          ("memory", "stream"), ("val_cache", None)])
def test_configs_that_cannot_share_a_stream_are_refused(caches, tmp_path, field, value):
    a, b = _config(caches, tmp_path / "a"), _config(caches, tmp_path / "b", **{field: value})
    with pytest.raises(ValueError, match=rf"config 1 \(.*\) has {field}=.* set the same {field}"):
        fit_many([a, b])
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_same_out_and_uncached_levels_are_refused(caches, tmp_path):
    with pytest.raises(ValueError, match="both write to"):
        fit_many([_config(caches, tmp_path / "a"), _config(caches, tmp_path / "a", lr=2e-3)])
    with pytest.raises(ValueError, match="block_9 are not cached"):
        fit_many([_config(caches, tmp_path / "a", levels="block_9")])


def test_killed_many_run_resumes_each_run_to_the_uninterrupted_result(caches, tmp_path):
    variants = (dict(levels="block_0"), dict(levels="block_4,block_5", lr=2e-3))
    full = fit_many([_config(caches, tmp_path / "full" / str(i), epochs=3, val_cache=None, **v)
                     for i, v in enumerate(variants)])
    cut = [_config(caches, tmp_path / "cut" / str(i), epochs=3, val_cache=None, **v) for i, v in enumerate(variants)]

    def kill(index, epoch, epochs, metrics):  # killed after run 0 saved epoch 2, before run 1 did
        if (index, epoch) == (0, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_many(cut, on_epoch=kill)
    assert [json.loads((tmp_path / "cut" / str(i) / "last.json").read_text())["epoch"] for i in (0, 1)] == [2, 1]
    resumed = fit_many(cut)
    assert [r.epochs_run for r in resumed] == [1, 2]
    for f, r in zip(full, resumed):
        a, b = _state(f.run_dir), _state(r.run_dir)
        assert all(torch.equal(a[k], b[k]) for k in a) and _no_times(f.history) == _no_times(r.history)


@pytest.mark.slow
def test_sigkill_of_the_cli_then_rerun_matches_uninterrupted(caches, tmp_path):
    """A real SIGKILL of `fit-decoder --variant` while it trains; the rerun resumes every run."""
    args = [sys.executable, "-m", "cellembed", "fit-decoder", str(caches["train"]), "--epochs", "4",
            "--batch-size", "2", "--device", "cpu", "--workers", "0", "--memory", "ram", "--no-refine",
            "--variant", "levels=block_0 name=a", "--variant", "levels=block_3,block_5 lr=2e-3 name=b"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= metrics.read_text().count("\n") < 4, "the kill should land during training"
    subprocess.run(args + ["--out", str(tmp_path / "killed")], env=env, check=True, capture_output=True)
    subprocess.run(args + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    for name in ("a", "b"):
        wk, ww = _state(tmp_path / "killed" / name), _state(tmp_path / "whole" / name)
        assert all(torch.equal(wk[k], ww[k]) for k in ww), name
        assert json.loads((tmp_path / "killed" / name / "last.json").read_text())["epoch"] == 4


def test_prune_stops_a_run_and_keeps_its_state(caches, tmp_path):
    configs = [_config(caches, tmp_path / str(i), epochs=3, levels=lv, val_cache=None)
               for i, lv in enumerate(("block_0", "block_5"))]
    asked = []

    def prune(epoch, histories):
        asked.append((epoch, [len(h) for h in histories]))
        return [1] if epoch >= 1 else []

    results = fit_many(configs, prune=prune)
    assert [len(r.history) for r in results] == [3, 1]
    assert asked == [(0, [0, 0]), (1, [1, 1]), (2, [2, 1])]
    assert json.loads((tmp_path / "1" / "last.json").read_text())["epoch"] == 1
    again = fit_many(configs, prune=prune)  # a rerun asks again and the pruned run stays pruned
    assert [r.epochs_run for r in again] == [0, 0] and [len(r.history) for r in again] == [3, 1]


def test_run_recorded_before_data_seed_resumes_and_another_data_seed_is_another_run(caches, tmp_path):
    cfg = _config(caches, tmp_path / "run", epochs=1, val_cache=None, refine=False)
    path = fit_decoder(cfg).run_dir / "config.json"
    record = json.loads(path.read_text())
    assert record["config"]["data_seed"] is None
    del record["config"]["data_seed"]  # as written before the option existed
    path.write_text(json.dumps(record))
    assert fit_decoder(cfg).epochs_run == 0  # the same run: nothing left to train, nothing refused
    with pytest.raises(ValueError, match="another config"):
        fit_decoder(_config(caches, tmp_path / "run", epochs=1, val_cache=None, refine=False, data_seed=3))


def test_variants_parse_to_typed_configs(tmp_path):
    assert parse_variant("levels=block_2,block_4 lr=1e-3 refine=false epochs=3") == \
        {"levels": "block_2,block_4", "lr": 1e-3, "refine": False, "epochs": 3}
    base = FitConfig(out=str(tmp_path), cache="c", seed=3)
    configs = variant_configs(base, ["levels=block_1", "seed=7 name=s7", ""])
    assert [c.out for c in configs] == [str(tmp_path / n) for n in ("levels-block_1", "s7", "base")]
    assert [(c.seed, c.data_seed) for c in configs] == [(3, 3), (7, 3), (3, 3)]
    with pytest.raises(ValueError, match="unknown key"):
        variant_configs(base, ["lrr=1"])
    with pytest.raises(ValueError, match="should be float"):
        variant_configs(base, ["lr=fast"])
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_variant("block_1")


def test_cli_fit_decoder_with_variants_writes_scorable_runs(caches, tmp_path):
    out = tmp_path / "runs"
    args = ["fit-decoder", str(caches["train"]), "--val-cache", str(caches["val"]), "--out", str(out),
            "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0", "--memory", "ram",
            "--no-tune", "--variant", "levels=block_1,block_3", "--variant", "levels=block_5 lr=2e-3 name=deep"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "levels-block_1+block_3" in result.output and "deep" in result.output
    for name in ("levels-block_1+block_3", "deep"):
        assert (out / name / "model.safetensors").is_file()
    assert json.loads((out / "deep" / "config.json").read_text())["config"]["lr"] == 2e-3
    scored = score_run(out / "deep", caches["val"], tmp_path / "score", device="cpu", num_workers=0)
    assert 0.0 <= scored.metrics["summary"]["pq"] <= 1.0
    bad = CliRunner().invoke(app, args[:-4] + ["--variant", "", "--variant", "batch_size=2"])
    assert bad.exit_code == 2 and "set the same batch_size" in bad.output and "Traceback" not in bad.output
