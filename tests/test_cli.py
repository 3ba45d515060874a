"""The command line as a user meets it: help, errors as one line, synth → extract → info → verify, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellembed.cache import open_cache, read_manifest
from cellembed.cli import app

runner = CliRunner()
COMMANDS = ["extract", "info", "verify", "encoders", "synth", "demo", "score", "fit-decoder", "tune", "search-blocks"]
REALDATA = Path(os.environ.get("CELLEMBED_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # README.md exists there: a file, not a cache


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_module_entry_point_works():
    proc = subprocess.run([sys.executable, "-m", "cellembed", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "extract" in proc.stdout


def test_encoders_table_lists_presets_with_licence():
    result = run("encoders")
    assert result.exit_code == 0
    for name in ("uni2_h", "virchow2", "prov_gigapath", "convnext_b_22k", "efficientnet_lite0_in1k", "test_vit"):
        assert name in result.output


@pytest.mark.parametrize("args, message", [
    (["--dataset", "folder", "--root", "/nonexistent/data"], "/nonexistent/data"),
    (["--dataset", "synthetic", "--encoder", "no_such_encoder"], "valid names"),
    (["--dataset", "synthetic", "--blocks", "99"], "out of range"),
    (["--dataset", "synthetic", "-o", "n_tile=3"], "unknown option"),
    (["--dataset", "synthetic", "-o", "n_tiles"], "KEY=VALUE"),
    (["--dataset", "synthetic", "--weights", "/nonexistent/w.safetensors"], "not found"),
    (["--dataset", "synthetic", "--weights", "README.md"], "not a readable weights file"),
    (["--dataset", "synthetic", "-o", "n_tiles=abc"], "should be int"),
    (["--dataset", "synthetic", "--device", "gpu"], "unknown device"),
    (["--dataset", "synthetic", "--folds", "folds.csv"], "--split train|val|test"),
    (["--dataset", "synthetic", "--out", "README.md"], "is a file"),
    (["--dataset", "synthetic", "--codec", "int2"], "unknown codec 'int2'"),
    (["--dataset", "synthetic", "--codec", "block_99=int8"], "unknown level 'block_99'"),
    (["--dataset", "synthetic", "--codec", "pca0"], "choose pca1 to pca"),
    (["--dataset", "synthetic", "--codec", "pca9999"], "choose pca1 to pca"),
])
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    base = {"--encoder": "test_vit", "--weights": "random", "--out": str(tmp_path / "c")}
    for i in range(0, len(args) - 1):
        if args[i] in base:
            base.pop(args[i])
    extra = [x for kv in base.items() for x in kv]
    result = run("extract", *args, *extra)
    assert result.exit_code == 2
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_synth_into_non_empty_folder_and_info_on_incomplete_cache(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep")
    result = run("synth", str(tmp_path / "d"), "--tiles", "2")
    assert result.exit_code == 2 and "--overwrite" in result.output and "Traceback" not in result.output
    (tmp_path / "c" / ".parts").mkdir(parents=True)
    info = run("info", str(tmp_path / "c"))
    assert info.exit_code == 2 and "incomplete cache" in info.output


def test_synth_extract_info_verify(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    assert run("synth", str(data), "--tiles", "6", "--seed", "1", "--size", "64").exit_code == 0
    assert len(list((data / "images").iterdir())) == 6
    result = run("extract", "--dataset", "folder", "--root", str(data), "--encoder", "test_convnext",
                 "--weights", "random", "--workers", "1", "--shard-size", "4", "--device", "cpu", "--out", str(cache))
    assert result.exit_code == 0, result.output
    assert "tiles 6" in result.output
    info = run("info", str(cache))
    assert info.exit_code == 0 and read_manifest(cache)["cache_key"] in info.output and "block_" in info.output
    assert "codec" in info.output and "none" in info.output
    assert run("verify", str(cache)).exit_code == 0
    shard = next(cache.glob("shard-*.tar"))
    shard.write_bytes(shard.read_bytes()[:300])
    bad = run("verify", str(cache))
    assert bad.exit_code == 1 and "truncated" in bad.output and shard.name in bad.output


def test_demo_runs_end_to_end(tmp_path):
    result = run("demo", "--out", str(tmp_path / "demo"), "--tiles", "20", "--epochs", "1")
    assert result.exit_code == 0, result.output
    caches = {s: open_cache(tmp_path / "demo" / "cache" / "efficientnet_lite0_in1k" / s) for s in ("train", "val", "test")}
    assert sum(len(c) for c in caches.values()) == 20 and all(len(c) for c in caches.values())
    assert caches["train"].manifest["identity"]["encoder"]["weights_id"].startswith("packaged:")
    scores = json.loads((tmp_path / "demo" / "run" / "score-test" / "metrics.json").read_text())
    assert scores["protocol"]["n_images"] == len(caches["test"])
    assert "demo finished" in result.output and "cache_key" in result.output and "mPQ+" in result.output


@pytest.mark.skipif(not (REALDATA / "consep_tiles256" / "labels.npz").is_file(), reason="../shared/realdata absent")
@pytest.mark.parametrize("encoder, weights", [("test_vit", "random"), ("efficientnet_lite0_in1k", "packaged")])
def test_extract_real_consep_tiles(tmp_path, encoder, weights):
    """Real CoNSeP tiles through the folder reader, a user folds.csv selecting 12 test tiles."""
    root = REALDATA / "consep_tiles256"
    names = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    folds = tmp_path / "folds.csv"
    folds.write_text("img_id,fold\n" + "".join(f"{n},{2 if i < 12 else 0}\n" for i, n in enumerate(names)))
    result = run("extract", "--dataset", "folder", "--root", str(root), "--split", "test", "--folds", str(folds),
                 "--encoder", encoder, "--weights", weights, "--workers", "1", "--device", "cpu",
                 "--out", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    cache = open_cache(tmp_path / "cache")
    assert cache.manifest["class_names"] == ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
    samples = list(cache)
    assert [s.key for s in samples] == names[:12]
    assert all(s.inst_map.max() > 0 and s.type_map.max() <= 4 for s in samples)
    assert cache.manifest["identity"]["split"]["scheme"] == "folds-csv"


def test_score_arrays_from_npy_files(tmp_path):
    import json

    import numpy as np

    from cellembed.data import open_dataset
    from cellembed.metrics import score_arrays

    tiles = list(open_dataset("synthetic", None, n_tiles=4, seed=2, size=96))
    true = np.stack([np.stack([t.inst_map, t.type_map], -1) for t in tiles]).astype(np.int32)
    pred = true.copy()
    pred[1] = np.roll(pred[1], 4, axis=1)
    np.save(tmp_path / "p.npy", pred)
    np.save(tmp_path / "t.npy", true)
    np.save(tmp_path / "tissues.npy", np.array(["a", "a", "b", "b"]))
    result = run("score", "--pred", str(tmp_path / "p.npy"), "--true", str(tmp_path / "t.npy"), "--num-classes", "4",
                 "--tissues", str(tmp_path / "tissues.npy"), "--json", str(tmp_path / "m.json"))
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "m.json").read_text())
    expected = score_arrays(pred, true, num_classes=4, tissues=["a", "a", "b", "b"])
    assert written["summary"] == json.loads(json.dumps(expected["summary"]))
    assert f"{expected['summary']['pq']:.4f}" in result.output and "mpq_plus" in result.output
    assert written["per_image"][0]["pq"] == 1.0 and written["per_image"][1]["pq"] < 1.0
    missing = run("score", "--pred", str(tmp_path / "p.npy"), "--true", str(tmp_path / "absent.npy"))
    assert missing.exit_code == 2 and "absent.npy not found" in missing.output
    np.save(tmp_path / "bad.npy", pred[:2])
    bad = run("score", "--pred", str(tmp_path / "bad.npy"), "--true", str(tmp_path / "t.npy"))
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output


def test_extract_pca_codec_and_info(tmp_path):
    """``--codec pcaK``: the basis file is written beside the shards; ``info`` names it and each level's K and
    explained variance."""
    cache = tmp_path / "cache"
    result = run("extract", "--dataset", "synthetic", "-o", "n_tiles=4", "-o", "size=64", "--encoder", "test_vit",
                 "--weights", "random", "--workers", "0", "--device", "cpu", "--codec", "pca4", "--pca-tiles", "3",
                 "--out", str(cache))
    assert result.exit_code == 0, result.output
    assert (cache / "pca.safetensors").is_file()
    manifest = read_manifest(cache)
    assert manifest["identity"]["pca"]["fit_tiles"] == 3
    info = run("info", str(cache))
    assert info.exit_code == 0, info.output
    text = " ".join(info.output.split())
    assert "pca.safetensors" in text and "fitted on 3 tiles" in text
    for lv in manifest["levels"]:
        assert f"4, {lv['pca']['explained_variance']:.4f}" in text
