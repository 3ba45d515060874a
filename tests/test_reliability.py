"""Bad input as a user meets it on the command line: one line naming the file or key, exit 2, no traceback
(unless --debug), and nothing half-written left under a final name."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from data_fixtures import write_folder_files
from PIL import Image
from typer.testing import CliRunner

from cellembed.cli import app

runner = CliRunner()


def _extract(root, out, *extra):
    return runner.invoke(app, ["extract", "--dataset", "folder", "--root", str(root), "--encoder", "test_vit",
                               "--weights", "random", "--device", "cpu", "--workers", "0", "--out", str(out), *extra])


def _five_channel_image(root):
    path = root / "images" / "t_2.tif"
    (root / "images" / "t_2.png").unlink()
    tifffile.imwrite(path, np.zeros((16, 16, 5), np.uint8))
    return path


def _sixteen_bit_image(root):
    path = root / "images" / "t_2.tif"
    (root / "images" / "t_2.png").unlink()
    tifffile.imwrite(path, np.zeros((32, 32, 3), np.uint16))
    return path


def _unreadable_image(root):
    path = root / "images" / "t_2.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return path


def _negative_ids(root):
    path = root / "labels" / "t_1.npy"
    arr = np.load(path)
    arr[0, 0, 0] = -3
    np.save(path, arr)
    return path


def _shape_mismatch(root):
    path = root / "labels" / "t_1.npy"
    np.save(path, np.zeros((7, 9, 2), np.int32))
    return path


def _types_beyond_classes(root):
    path = root / "types" / "t_10.npy"
    np.save(path, np.full(np.load(path).shape, 9, np.uint8))
    return path


def _missing_label(root):
    (root / "labels" / "t_2.tif").unlink()
    return root / "labels"


def _empty_dataset(root):
    for p in (root / "images").iterdir():
        p.unlink()
    return root / "images"


CASES = {"five channels": _five_channel_image, "16-bit image": _sixteen_bit_image, "unreadable image": _unreadable_image,
         "negative ids": _negative_ids, "map shape differs from image": _shape_mismatch,
         "type ids beyond the classes": _types_beyond_classes, "missing label file": _missing_label,
         "empty dataset": _empty_dataset}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_folder_input_is_one_line_naming_the_file(tmp_path, case):
    root = tmp_path / "data"
    write_folder_files(root)
    named = CASES[case](root)
    result = _extract(root, tmp_path / "cache")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error:" in text and "Traceback" not in text
    assert str(named) in text or named.name in text, text
    assert not list((tmp_path / "cache").glob("shard-*.tar"))  # nothing half-written under a final name
    debug = runner.invoke(app, ["--debug", "extract", "--dataset", "folder", "--root", str(root), "--encoder",
                                "test_vit", "--weights", "random", "--device", "cpu", "--workers", "0", "--out",
                                str(tmp_path / "cache2")])
    assert debug.exit_code != 0 and debug.exception is not None  # --debug lets the exception through


def test_missing_root_and_bad_config_key(tmp_path):
    result = _extract(tmp_path / "nowhere", tmp_path / "cache")
    assert result.exit_code == 2 and "nowhere" in result.output and "Traceback" not in result.output
    cfg = tmp_path / "x.yaml"
    cfg.write_text("dataset: synthetic\nencoder: test_vit\nout: c\nbatch_sise: 4\n")
    result = runner.invoke(app, ["extract", "--config", str(cfg)])
    assert result.exit_code == 2 and "batch_sise" in result.output and str(cfg) in " ".join(result.output.split())
    cfg.write_text("dataset: synthetic\nencoder: test_vit\nout: c\nbatch_size: many\n")
    result = runner.invoke(app, ["extract", "--config", str(cfg)])
    assert result.exit_code == 2 and "batch_size" in result.output


def test_gated_model_without_token_says_where_to_ask(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["extract", "--dataset", "synthetic", "-o", "n_tiles=2", "-o", "size=32",
                                 "--encoder", "uni2_h", "--device", "cpu", "--out", str(tmp_path / "c")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "HF_TOKEN" in text and "huggingface.co/MahmoodLab" in text, text


def test_rgba_and_grey_png_are_read_as_rgb(tmp_path):
    """Not an error: 8-bit grey and RGBA PNGs are common exports; they become RGB (alpha dropped)."""
    root = tmp_path / "data"
    write_folder_files(root)
    size = np.asarray(Image.open(root / "images" / "t_1.png")).shape[:2]
    Image.fromarray(np.zeros(size, np.uint8)).save(root / "images" / "t_1.png")
    Image.fromarray(np.zeros((*size, 4), np.uint8)).save(root / "images" / "t_2.png")
    result = _extract(root, tmp_path / "cache")
    assert result.exit_code == 0, result.output


def test_corrupt_shard_refused_by_fit_then_repaired_by_extract_repair(tmp_path):
    from cellembed.cache import read_manifest

    synth = ["--dataset", "synthetic", "-o", "n_tiles=8", "-o", "size=64", "--encoder", "test_vit", "--weights",
             "random", "--device", "cpu", "--workers", "0", "--shard-size", "4", "--out", str(tmp_path / "c")]
    assert runner.invoke(app, ["extract", *synth]).exit_code == 0
    before = read_manifest(tmp_path / "c")
    shard = tmp_path / "c" / before["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    fit = ["fit-decoder", str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--epochs", "1", "--workers", "0",
           "--device", "cpu", "--memory", "stream", "--batch-size", "4"]
    refused = runner.invoke(app, fit)
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and shard.name in text and "--repair" in text, text
    repaired = runner.invoke(app, ["extract", *synth, "--repair"])
    assert repaired.exit_code == 0 and f"repaired 1 shard(s): {shard.name}" in " ".join(repaired.output.split())
    assert read_manifest(tmp_path / "c") == before
    assert runner.invoke(app, fit).exit_code == 0
