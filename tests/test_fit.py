"""Stage two end to end: fit-decoder (seeded, resumable, validated), score RUN --cache, tune."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cellembed.cache import CacheError, ExtractConfig, extract, open_cache
from cellembed.cli import app
from cellembed.evaluate import score_run, tune_run
from cellembed.evaluate._run import load_run
from cellembed.metrics import score_arrays
from cellembed.train import FitConfig, fit_decoder
from cellembed.train._checkpoint import last_tensors


def _cache(path, seed, n=8, encoder="test_vit", size=64):
    extract(ExtractConfig(dataset="synthetic", out=str(path), encoder=encoder, weights="random", device="cpu",
                          num_workers=0, shard_size=4, batch_size=4,
                          dataset_options={"n_tiles": n, "seed": seed, "size": size}))
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    return {"train": _cache(root / "train", 0), "val": _cache(root / "val", 1),
            "other": _cache(root / "other", 1, encoder="test_convnext")}


def _config(caches, out, **kw):
    base = dict(out=str(out), cache=str(caches["train"]), val_cache=str(caches["val"]), epochs=2, batch_size=4,
                device="cpu", num_workers=0, lr=1e-3, memory="ram")
    return FitConfig(**{**base, **kw})


def _last(run_dir):
    return load_file(str(last_tensors(run_dir)))


def _weights(run_dir):
    return {k: v for k, v in _last(run_dir).items() if k.startswith("model.")}


def test_fit_writes_a_complete_run(caches, tmp_path):
    result = fit_decoder(_config(caches, tmp_path / "run"))
    run = result.run_dir
    for name in ("config.json", "model.safetensors", "last.json", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in run.glob("last-*.safetensors")] == ["last-00002.safetensors"]
    record = json.loads((run / "config.json").read_text())
    assert record["cache_key"] == open_cache(caches["train"]).cache_key
    assert record["decoder"]["trainable_parameters"] == result.n_params > 0
    # the minimum area is tuned on the validation cache after training (preset 80 px × 0, ¼, …, 2)
    tuned = json.loads((run / "tune.json").read_text())
    assert [r["min_area"] for r in tuned["table"]] == [0, 20, 40, 60, 80, 100, 120, 160]
    assert record["postprocess"] == {"head": "cisca", "preset": "40x", "min_area": tuned["min_area"]}
    assert tuned["value"] == max(r["pq"] for r in tuned["table"])
    assert record["decoder"]["refine"] is True
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] == [m["epoch"] for m in result.history]
    for m in lines:  # validation: losses and the real post-processing's scores
        assert {"train_loss", "val_loss", "val_classes_ce", "val_pq", "val_mpq_plus", "val_aji", "lr"} <= set(m)
        assert 0.0 <= m["val_pq"] <= 1.0 and np.isfinite(m["val_loss"])
    assert result.best["metric"] == "val_pq" and result.best["epoch"] in (1, 2)


def test_same_seed_same_weights_and_other_seed_differs(caches, tmp_path):
    a = fit_decoder(_config(caches, tmp_path / "a", val_cache=None, augment="dihedral"))
    b = fit_decoder(_config(caches, tmp_path / "b", val_cache=None, augment="dihedral"))
    c = fit_decoder(_config(caches, tmp_path / "c", val_cache=None, augment="dihedral", seed=1))
    wa, wb, wc = (_weights(r.run_dir) for r in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]


def test_resume_after_interruption_ends_with_the_same_weights(caches, tmp_path):
    full = fit_decoder(_config(caches, tmp_path / "full", epochs=3))

    def stop_after_first(epoch, total, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_decoder(_config(caches, tmp_path / "cut", epochs=3), on_epoch=stop_after_first)
    assert json.loads((tmp_path / "cut" / "last.json").read_text())["epoch"] == 1
    resumed = fit_decoder(_config(caches, tmp_path / "cut", epochs=3, num_workers=1))  # workers may change
    assert resumed.epochs_run == 2 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    pairs = {"last": (_last(full.run_dir), _last(resumed.run_dir)),  # model, optimizer moments, RNG
             "best": (load_file(str(full.run_dir / "model.safetensors")), load_file(str(resumed.run_dir / "model.safetensors")))}
    for name, (wf, wr) in pairs.items():
        assert wf.keys() == wr.keys() and all(torch.equal(wf[k], wr[k]) for k in wf), name
    assert full.history == resumed.history or all(
        {k: v for k, v in f.items() if "seconds" not in k} == {k: v for k, v in r.items() if "seconds" not in k}
        for f, r in zip(full.history, resumed.history))


def test_light_decoder_run_resumes(caches, tmp_path):
    """The light decoder records no unetr options; a rerun must not read their absence as another config."""
    def stop_after_first(epoch, total, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    config = _config(caches, tmp_path / "light", decoder="light", val_cache=None)
    with pytest.raises(KeyboardInterrupt):
        fit_decoder(config, on_epoch=stop_after_first)
    assert fit_decoder(config).epochs_run == 1


def test_sigkill_mid_epoch_then_rerun_matches_uninterrupted(caches, tmp_path):
    """A real SIGKILL of the CLI while it trains; the rerun resumes from the last finished epoch."""
    args = [sys.executable, "-m", "cellembed", "fit-decoder", str(caches["train"]), "--epochs", "6",
            "--batch-size", "2", "--device", "cpu", "--workers", "0", "--memory", "ram", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count("\n")
    assert 2 <= done < 6, "the kill should land during training"
    subprocess.run(args + ["--out", str(tmp_path / "killed")], env=env, check=True, capture_output=True)
    subprocess.run(args + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    wk, ww = _last(tmp_path / "killed"), _last(tmp_path / "whole")
    assert all(torch.equal(wk[k], ww[k]) for k in ww)
    assert json.loads((tmp_path / "killed" / "last.json").read_text())["epoch"] == 6


def test_one_cycle_schedule(caches, tmp_path):
    result = fit_decoder(_config(caches, tmp_path / "lr", val_cache=None, epochs=10, lr=1e-4))
    lrs = [h["lr"] for h in result.history]  # after each epoch's last step (2 steps per epoch)
    peak = int(np.argmax(lrs))
    assert lrs[peak] == pytest.approx(1e-4, rel=0.05) and peak in (2, 3)  # 30% of 20 steps = step 6
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-3)
    assert all(x >= y for x, y in zip(lrs[peak:], lrs[peak + 1:]))


def test_refusals(caches, tmp_path):
    with pytest.raises(CacheError, match="validation cache.*encoder"):
        fit_decoder(_config(caches, tmp_path / "x", val_cache=str(caches["other"])))
    fit_decoder(_config(caches, tmp_path / "y", epochs=1))
    with pytest.raises(ValueError, match="another config.*--overwrite"):
        fit_decoder(_config(caches, tmp_path / "y", epochs=1, lr=5e-4))
    fit_decoder(_config(caches, tmp_path / "y", epochs=1, lr=5e-4, overwrite=True))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a cellembed run"):
        fit_decoder(_config(caches, tmp_path / "z", epochs=1))
    (tmp_path / "k").mkdir()  # killed between write_json_atomic's temporary file and its rename: no run yet
    (tmp_path / "k" / f".config.json.{os.getpid()}.tmp").write_text('{"trunc')
    fit_decoder(_config(caches, tmp_path / "k", epochs=1))
    assert (tmp_path / "k" / "config.json").is_file() and not list((tmp_path / "k").glob(".*.tmp"))
    with pytest.raises(ValueError, match="unknown head"):
        fit_decoder(_config(caches, tmp_path / "w", head="mask-rcnn"))


@pytest.mark.parametrize("head", ["hovernet", "semantic"])
def test_other_heads_train_and_validate(caches, tmp_path, head):
    result = fit_decoder(_config(caches, tmp_path / head, head=head, decoder="light", epochs=1))
    m = result.history[-1]
    key = "val_pq" if head == "hovernet" else "val_miou"
    assert m[key] is not None and 0.0 <= m[key] <= 1.0 and np.isfinite(m["val_loss"])


def test_score_run_is_consistent_with_score_arrays(caches, tmp_path):
    run = fit_decoder(_config(caches, tmp_path / "run", epochs=1)).run_dir
    result = score_run(run, caches["val"], tmp_path / "scored", num_workers=2, batch_size=3)
    out = result.out
    cache = open_cache(caches["val"])
    samples = list(cache)
    assert (out / "keys.txt").read_text().split() == [s.key for s in samples]  # cache order
    pred = np.load(out / "predictions.npy")
    assert pred.shape == (len(samples), 64, 64, 2) and pred.dtype == np.int32
    true = np.stack([np.stack([s.inst_map, s.type_map.astype(np.int32)], -1) for s in samples])
    expected = score_arrays(pred, true, num_classes=4)
    written = json.loads((out / "metrics.json").read_text())
    assert written["summary"] == expected["summary"] and written["per_class"] == expected["per_class"]
    assert written["per_image"] == expected["per_image"]
    assert written["run"]["decoder_parameters"] == json.loads((run / "config.json").read_text())["decoder"][
        "trainable_parameters"]
    table = (out / "table.md").read_text()
    assert "| P | R | DQ | SQ | PQ | mPQ+ | decoder params |" in table
    assert len(list(out.glob("overlay_*.png"))) == 4
    with pytest.raises(CacheError, match="test cache.*encoder"):
        score_run(run, caches["other"], tmp_path / "bad")


def test_no_tune_keeps_the_preset_and_early_stopping_stops_and_resumes_stopped(caches, tmp_path):
    # lr ~0: the weights stay put (only BatchNorm's running statistics move), so validation PQ soon stops
    # improving and patience 2 stops the run two epochs after its best one, long before epoch 8
    cfg = _config(caches, tmp_path / "run", epochs=8, lr=1e-12, final_lr=1e-13, patience=2, tune=False)
    result = fit_decoder(cfg)
    best = result.best["epoch"]
    assert [h["epoch"] for h in result.history] == list(range(1, best + 3)) and best + 2 < 8
    assert all(h["val_pq"] <= result.best["value"] for h in result.history)
    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["postprocess"]["min_area"] is None and not (result.run_dir / "tune.json").exists()
    again = fit_decoder(cfg)  # a rerun of a stopped run trains nothing more
    assert again.epochs_run == 0 and len(again.history) == len(result.history)
    with pytest.raises(ValueError, match="patience"):
        fit_decoder(_config(caches, tmp_path / "bad", patience=0))


def test_narrow_decoder_runs_still_load_and_score(caches, tmp_path):
    run = fit_decoder(_config(caches, tmp_path / "run", epochs=1, refine=False, tune=False)).run_dir
    record = json.loads((run / "config.json").read_text())
    assert record["decoder"]["refine"] is False
    del record["decoder"]["refine"]  # a run written before the option existed used the narrow design
    (run / "config.json").write_text(json.dumps(record))
    assert score_run(run, caches["val"], tmp_path / "s", num_workers=0).metrics["summary"]["pq"] is not None


def test_full_channels_is_recorded_and_rebuilt(caches, tmp_path):
    run = fit_decoder(_config(caches, tmp_path / "run", epochs=1, full_channels=8, tune=False)).run_dir
    record = json.loads((run / "config.json").read_text())
    assert record["decoder"]["full_channels"] == 8
    loaded = load_run(run)
    assert loaded.model.full_channels == 8 and loaded.model.full[0][0].out_channels == 8
    default = load_run(fit_decoder(_config(caches, tmp_path / "default", epochs=1, tune=False)).run_dir)
    assert default.model.full_channels == 16  # REFINE_CHANNELS


def test_run_recorded_before_type_branch_resumes_with_its_old_value(caches, tmp_path):
    cfg = _config(caches, tmp_path / "run", epochs=2, type_branch=False, tune=False)
    first = fit_decoder(cfg)
    assert first.epochs_run == 2
    path = first.run_dir / "config.json"
    record = json.loads(path.read_text())
    for part, key in (("config", "type_branch"), ("config", "full_channels"), ("decoder", "type_branch")):
        del record[part][key]  # as written before these options existed
    path.write_text(json.dumps(record))
    assert fit_decoder(cfg).epochs_run == 0  # the same run: nothing left to train, nothing refused
    with pytest.raises(ValueError, match="another config"):
        fit_decoder(_config(caches, tmp_path / "run", epochs=2, tune=False))  # the type branch is another model


def test_tune_saves_min_area_used_by_score(caches, tmp_path):
    run = fit_decoder(_config(caches, tmp_path / "run", epochs=1)).run_dir
    result = tune_run(run, caches["val"], areas=[0, 7, 30], num_workers=0)
    assert [r["min_area"] for r in result["table"]] == [0, 7, 30]
    best = max(result["table"], key=lambda r: r["pq"])
    assert result["value"] == best["pq"]
    assert json.loads((run / "config.json").read_text())["postprocess"]["min_area"] == result["min_area"]
    scored = score_run(run, caches["val"], tmp_path / "s", num_workers=0)
    assert scored.metrics["protocol"]["postprocess"]["min_area"] == result["min_area"]
    assert scored.metrics["summary"]["pq"] == pytest.approx(result["value"])


def test_cli_fit_score_tune_and_config(caches, tmp_path):
    runner = CliRunner()
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(f"cache: {caches['train']}\nepochs: 1\nbatch_size: 4\ndevice: cpu\nnum_workers: 0\n")
    res = runner.invoke(app, ["fit-decoder", "--config", str(cfg), "--out", str(tmp_path / "run"),
                              "--val-cache", str(caches["val"]), "--lr", "1e-3", "--shuffle-buffer", "24"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["epochs"] == 1 and record["config"]["lr"] == 1e-3
    assert record["config"]["shuffle_buffer"] == 24
    res = runner.invoke(app, ["score", str(tmp_path / "run"), "--cache", str(caches["val"]), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "mpq_plus" in res.output and (tmp_path / "run" / "score-val" / "metrics.json").is_file()
    res = runner.invoke(app, ["score", str(tmp_path / "run"), "--cache", str(caches["val"]), "--workers", "0",
                              "--tta", "--out", str(tmp_path / "tta")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "tta" / "metrics.json").read_text())["protocol"]["tta"].startswith("dihedral")
    res = runner.invoke(app, ["tune", str(tmp_path / "run"), "--cache", str(caches["val"]), "--areas", "0,40",
                              "--workers", "0"])
    assert res.exit_code == 0 and "saved min_area" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    res = runner.invoke(app, ["fit-decoder", "--config", str(bad), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "epochz" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["fit-decoder", str(caches["train"]), "--out", str(tmp_path / "r4"),
                              "--shuffle-buffer", "lots", "--workers", "0"])
    assert res.exit_code == 2 and "shuffle_buffer" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["fit-decoder", str(tmp_path / "nope"), "--out", str(tmp_path / "r3")])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["score", str(tmp_path / "run")])
    assert res.exit_code == 2 and "--cache" in res.output


def test_decoder_learns_from_the_cache(caches, tmp_path):
    """Not a smoke test: the losses on training and held-out tiles fall well below their start."""
    # the narrow decoder and MAE-only loss: on 8 tiles of random test-ViT features, 16 steps leave the refined
    # decoder's BatchNorm statistics and the held-out MSGE too noisy for a 15 % test (that decoder's learning on
    # real tiles is benchmarks/ablation_consep.py; test_decoders checks it reaches high PQ on synthetic tiles)
    result = fit_decoder(_config(caches, tmp_path / "learn", epochs=8, lr=3e-3, image_skip=True, refine=False,
                                 loss="mindthegap"))
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert last["val_loss"] < 0.85 * first["val_loss"]


def test_live_source_trains_and_its_run_scores_on_a_cache(caches, tmp_path):
    """--source live: the encoder in the loop with image-space augmentation; same checkpoint format."""
    live = dict(source="live", cache=None, val_cache=None, dataset="synthetic", encoder="test_vit", weights="random",
                dataset_options={"n_tiles": 10, "seed": 0, "size": 64}, epochs=1, batch_size=4, num_workers=0)
    result = fit_decoder(_config(caches, tmp_path / "live", **live))
    m = result.history[-1]
    assert np.isfinite(m["train_loss"]) and "val_pq" in m  # validated live on the dataset's val split
    record = json.loads((tmp_path / "live" / "config.json").read_text())
    assert record["source"] == "live" and record["config"]["augment"] == "auto"
    scored = score_run(result.run_dir, caches["val"], tmp_path / "s", num_workers=0)  # same encoder identity
    assert 0.0 <= scored.metrics["summary"]["pq"] <= 1.0
    with pytest.raises(ValueError, match="--dataset"):
        fit_decoder(_config(caches, tmp_path / "bad", source="live", cache=None))


def test_bad_caches_are_refused_in_one_line(caches, tmp_path):
    """Training tiles as validation, another dtype, a corrupt shard: one line naming the cause and the fix."""
    runner = CliRunner()
    with pytest.raises(CacheError, match="same tiles as the run's training cache"):
        fit_decoder(_config(caches, tmp_path / "leak", val_cache=str(caches["train"])))
    fp32 = tmp_path / "fp32"
    extract(ExtractConfig(dataset="synthetic", out=str(fp32), encoder="test_vit", weights="random", device="cpu",
                          num_workers=0, shard_size=4, batch_size=4, dtype="fp32",
                          dataset_options={"n_tiles": 8, "seed": 1, "size": 64}))
    with pytest.raises(CacheError, match="dtype: fp32 → fp16"):
        fit_decoder(_config(caches, tmp_path / "dt", val_cache=str(fp32)))
    run = fit_decoder(_config(caches, tmp_path / "run", epochs=1, val_cache=None)).run_dir
    broken = tmp_path / "broken"
    _cache(broken, 1)
    shard = sorted(broken.glob("shard-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[2000:2400] = bytes(400)  # zero a block inside the first member's payload
    shard.write_bytes(bytes(data))
    for args in (["fit-decoder", str(broken), "--out", str(tmp_path / "r2"), "--epochs", "1", "--workers", "0",
                  "--device", "cpu", "--memory", "stream"],
                 ["score", str(run), "--cache", str(broken), "--workers", "0"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert shard.name in line and "cellembed" in line and "Traceback" not in line, line
    res = runner.invoke(app, ["score", str(run), "--cache", str(caches["val"]), "--workers", "0"])
    again = runner.invoke(app, ["score", str(run), "--cache", str(caches["val"]), "--workers", "0"])
    assert res.exit_code == 0 and again.exit_code == 2 and "--overwrite" in again.output


def test_oversampling_reaches_the_training_loop(caches, tmp_path):
    five = tmp_path / "five"
    extract(ExtractConfig(dataset="synthetic", out=str(five), encoder="test_vit", weights="random", device="cpu",
                          num_workers=0, shard_size=4, batch_size=4,
                          dataset_options={"n_tiles": 8, "seed": 2, "size": 64, "n_types": 5}))
    steps = []
    fit_decoder(FitConfig(out=str(tmp_path / "run"), cache=str(five), epochs=1, batch_size=4, device="cpu",
                          num_workers=0, oversample="cisca-pannuke"), on_step=steps.append)
    assert sum(steps) > 8  # the oversampled list is longer than the 8 tiles
    with pytest.raises(ValueError, match="cisca-conic.*5 multipliers.*cache classes"):
        fit_decoder(_config(caches, tmp_path / "bad", oversample="cisca-conic"))


def test_kill_inside_the_checkpoint_write_resumes_from_the_previous_epoch(caches, tmp_path, monkeypatch):
    """A kill after the new tensors are written but before last.json names them must not mix epochs."""
    import cellembed.train._checkpoint as ckpt

    full = fit_decoder(_config(caches, tmp_path / "full", epochs=3, val_cache=None))
    real = ckpt.write_json_atomic

    def die_at_epoch_2(path, data):
        if data.get("epoch") == 2:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(ckpt, "write_json_atomic", die_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit_decoder(_config(caches, tmp_path / "cut", epochs=3, val_cache=None))
    monkeypatch.setattr(ckpt, "write_json_atomic", real)
    assert json.loads((tmp_path / "cut" / "last.json").read_text())["epoch"] == 1
    resumed = fit_decoder(_config(caches, tmp_path / "cut", epochs=3, val_cache=None))
    assert resumed.epochs_run == 2
    wf, wr = _last(full.run_dir), _last(resumed.run_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3
