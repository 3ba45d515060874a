"""Strict YAML configs, the CLI's --config merge, and the shipped sweep files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cellembed._config import ConfigError, load_config, load_yaml
from cellembed.cache import ExtractConfig, read_manifest
from cellembed.cli import app
from cellembed.encoders import get_spec, resolve_blocks

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_config_loads_with_types_and_overrides(tmp_path):
    path = write(tmp_path, "dataset: synthetic\nencoder: test_vit\nout: o\nbatch_size: 4\n"
                           "dataset_options: {n_tiles: 3}\n")
    cfg = load_config(ExtractConfig, path, out="elsewhere")
    assert (cfg.dataset, cfg.batch_size, cfg.out, cfg.dataset_options) == ("synthetic", 4, "elsewhere", {"n_tiles": 3})


@pytest.mark.parametrize("text, message", [
    ("dataset: synthetic\nencoder: test_vit\nout: o\nbogus: 1\n", r"unknown key\(s\) \['bogus'\]"),
    ("dataset: synthetic\nencoder: test_vit\nout: o\nbatch_size: big\n", "batch_size = 'big' should be int"),
    ("dataset: synthetic\nencoder: test_vit\nout: o\noverwrite: 1\n", "overwrite = 1 should be bool"),
    ("dataset: synthetic\nout: o\n", r"missing required key\(s\) \['encoder'\]"),
    ("- just\n- a list\n", "mapping"),
    ("dataset: [unclosed\n", "not valid YAML"),
])
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(ExtractConfig, path)
    assert str(path) in str(err.value)


def test_cli_options_win_over_config(tmp_path):
    path = write(tmp_path, f"dataset: synthetic\nencoder: test_vit\nweights: random\nout: {tmp_path / 'a'}\n"
                           "dataset_options: {n_tiles: 3, size: 64}\nnum_workers: 0\ndevice: cpu\n")
    result = CliRunner().invoke(app, ["extract", "--config", str(path), "--out", str(tmp_path / "b"),
                                      "-o", "n_tiles=2", "--blocks", "0,1"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "a").exists()
    manifest = read_manifest(tmp_path / "b")
    assert manifest["n_tiles"] == 2 and manifest["identity"]["encoder"]["blocks"] == [0, 1]
    assert manifest["identity"]["dataset"]["size"] == 64


def test_mind_the_gap_sweep_has_the_papers_18_configurations():
    sweep = load_yaml(ROOT / "configs" / "sweeps" / "mind_the_gap.yaml")
    runs = sweep["runs"]
    assert len(runs) == 18 and len({(r["encoder"], r["blocks"]) for r in runs}) == 18
    expected = {("vit_l_21k", "mixed"): (2, 5, 10, 20), ("vit_h_142m", "deep"): (34, 36, 37, 39),
                ("virchow2", "mixed"): (2, 5, 14, 28), ("convnext_b_22k", "stages"): (2, 5, 32, 35),
                ("swin2_b_22k", "stages"): (1, 3, 21, 23), ("maxvit_b_21k", "stages"): (1, 7, 21, 23)}
    for run in runs:
        blocks = resolve_blocks(get_spec(run["encoder"]), run["blocks"])
        assert len(blocks) == 4
        if (run["encoder"], run["blocks"]) in expected:
            assert blocks == expected[(run["encoder"], run["blocks"])]


@pytest.mark.parametrize("name", ["demo.yaml"])
def test_shipped_extract_configs_load(name):
    cfg = load_config(ExtractConfig, ROOT / "configs" / "extract" / name)
    get_spec(cfg.encoder)


def test_sweep_tool_runs_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "sweep_extract.py"), str(ROOT / "configs" / "sweeps" / "tiny.yaml"),
           "--out", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # one cache per encoder and split (test_vit shallow + deep share one with blocks 0..5)
    assert len(list(tmp_path.glob("caches/*/*/manifest.json"))) == 2 * 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("│ ok     │ 0 ") == 2, again.stdout
