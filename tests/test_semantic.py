"""Tissue semantic segmentation (the FM-benchmark protocol): the semantic_folder reader, Dice / IoU from pooled
pixel counts, ``score`` on a semantic run and a CPU-sized semantic sweep through ``report``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellembed.data import IGNORE, open_dataset
from cellembed.evaluate._predict import class_pixel_counts, semantic_scores

CLASSES = ("tumour", "stroma", "fat")
COLOURS = np.array([[150, 40, 120], [230, 140, 170], [250, 245, 245]], np.uint8)


def _class_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) classes 0..2 as smooth blobs: argmax of three blurred noise fields."""
    from scipy.ndimage import gaussian_filter

    fields = [gaussian_filter(rng.normal(size=(size, size)), size / 8) for _ in CLASSES]
    return np.argmax(fields, 0).astype(np.uint8)


def write_semantic_folder(root: Path, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """A tiny tissue dataset in the semantic_folder layout: classes are blobs of distinct colours (+ noise);
    folds.csv puts the first 2/3 in train, then val, then test."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = ["img_id,fold"]
    for i in range(n):
        mask = _class_map(rng, size)
        noise = rng.integers(-12, 13, (size, size, 3))
        image = np.clip(COLOURS[mask].astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"t{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")
        rows.append(f"t{i},{0 if i < 2 * n // 3 else 1 if i < 5 * n // 6 else 2}")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "folds.csv").write_text("\n".join(rows) + "\n")
    return root


# ----------------------------------------------------------------------------------------------------- reader
def test_reader_reads_the_layout_and_keeps_the_ignore_value(tmp_path):
    root = write_semantic_folder(tmp_path / "d", n=4, size=32)
    mask = np.array(Image.open(root / "masks" / "t1.png"))
    mask[:4, :4] = IGNORE
    Image.fromarray(mask).save(root / "masks" / "t1.png")
    source = open_dataset("semantic_folder", root)
    assert source.class_names == CLASSES and source.keys == ["t0", "t1", "t2", "t3"]
    tile = source[1]
    assert tile.image.shape == (32, 32, 3) and tile.type_map.dtype == np.uint8
    assert not tile.inst_map.any() and np.array_equal(tile.type_map, mask)
    assert source.default_split()[0] == "folds-csv"
    from cellembed.data import resolve_split

    assert [len(resolve_split(source, s).indices) for s in ("train", "val", "test")] == [2, 1, 1]


@pytest.mark.parametrize("damage, error, message", [
    (lambda r: (r / "masks" / "t2.png").unlink(), FileNotFoundError,
     r"no mask for image .*t2\.png: expected .*masks/t2\.png"),
    (lambda r: (r / "classes.txt").unlink(), FileNotFoundError,
     r"missing .*classes\.txt; write one class name per line"),
    (lambda r: Image.fromarray(np.zeros((16, 32), np.uint8)).save(r / "masks" / "t2.png"), ValueError,
     r"masks/t2\.png: mask is \(16, 32\), expected \(32, 32\)"),
    (lambda r: Image.fromarray(np.full((32, 32), 7, np.uint8)).save(r / "masks" / "t2.png"), ValueError,
     r"masks/t2\.png: class id\(s\) \[7\] out of range; classes\.txt names 3 classes"),
])
def test_reader_bad_input_is_one_line_naming_the_file(tmp_path, damage, error, message):
    root = write_semantic_folder(tmp_path / "d", n=4, size=32)
    damage(root)
    with pytest.raises(error, match=message) as err:
        open_dataset("semantic_folder", root)[2]
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------- metrics
def test_dice_and_iou_pool_pixel_counts_over_the_split():
    true = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]], [[2, 2, 2, 2], [0, IGNORE, IGNORE, 1]]])
    pred = np.array([[[0, 1, 1, 1], [0, 0, 1, 1]], [[2, 2, 1, 1], [0, 2, 2, 1]]])
    counts = class_pixel_counts(pred, true, 3)
    # ignored pixels count nowhere; class 0: true 5, predicted 4, both 4; class 1: true 5, predicted 8, both 5;
    # class 2: true 4, predicted 2, both 2
    assert counts.tolist() == [[4, 4, 5], [5, 8, 5], [2, 2, 4]]
    scores = semantic_scores(counts, CLASSES)
    dice = [2 * 4 / 9, 2 * 5 / 13, 2 * 2 / 6]
    iou = [4 / 5, 5 / 8, 2 / 4]
    assert [scores["per_class"][str(c)]["dice"] for c in range(3)] == pytest.approx(dice)
    assert [scores["per_class"][str(c)]["iou"] for c in range(3)] == pytest.approx(iou)
    assert scores["summary"]["mdice"] == pytest.approx(np.mean(dice))
    assert scores["summary"]["miou"] == pytest.approx(np.mean(iou))
    assert scores["summary"]["pixel_accuracy"] == pytest.approx(11 / 14)
    absent = semantic_scores(np.array([[3, 3, 3], [0, 0, 0]]), ("a", "b"))  # class b nowhere: no score, not in the mean
    assert absent["per_class"]["1"]["dice"] is None and absent["summary"]["mdice"] == 1.0


def test_semantic_loss_ignores_unlabelled_pixels():
    import torch

    from cellembed.train.losses import semantic_loss

    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    masked = target.clone()
    masked[0, :2] = IGNORE
    other = logits.clone()
    other[0, :, :2] = torch.randn(3, 2, 4) * 10  # logits under ignored pixels change nothing
    a = semantic_loss({"semantic": logits}, {"semantic": masked})[0]
    b = semantic_loss({"semantic": other}, {"semantic": masked})[0]
    assert torch.isfinite(a) and float(a) == pytest.approx(float(b), rel=1e-6)


# ----------------------------------------------------------------------------------------------------- sweep
SWEEP = """
data:
  dataset: semantic_folder
  root: {root}
extract: {{weights: random, batch_size: 8, num_workers: 0, shard_size: 8, device: cpu}}
fit: {{decoder: light, head: semantic, loss: semantic, best_metric: mdice, epochs: 2, batch_size: 4, lr: 3.0e-3,
      memory: ram, num_workers: 0, device: cpu}}
seeds: [0, 1]
runs:
  - {{encoder: test_vit, blocks: last}}
"""


@pytest.fixture(scope="module")
def semantic_sweep(tmp_path_factory):
    from cellembed.sweep import load_sweep, run_sweep

    tmp = tmp_path_factory.mktemp("semantic_sweep")
    root = write_semantic_folder(tmp / "data")
    path = tmp / "sweep.yaml"
    path.write_text(SWEEP.format(root=root))
    result = run_sweep(load_sweep(path, out=tmp / "out"))
    assert not result.failed, [str(e) for _, e in result.failed]
    return tmp / "out", result


def test_score_of_a_semantic_run_is_dice_from_pooled_pixel_counts(semantic_sweep):
    from cellembed.cache import open_cache

    out, result = semantic_sweep
    run = result.ran[0]
    scored = run.folder / "score"
    metrics = json.loads((scored / "metrics.json").read_text())
    assert not (run.folder / "run" / "tune.json").exists()  # no minimum area to tune for a semantic head
    preds = np.load(scored / "predictions.npy")
    keys = (scored / "keys.txt").read_text().split()
    cache = open_cache(run.cache.paths["test"])
    true = {s.key: s.type_map for p in cache.shard_paths for s in cache.iter_shard(p, level_names=[])}
    assert preds.shape == (2, 64, 64) and sorted(keys) == sorted(true)
    for c in range(3):
        inter = sum(int(((p == c) & (true[k] == c)).sum()) for p, k in zip(preds, keys))
        pred, gt = int((preds == c).sum()), sum(int((t == c).sum()) for t in true.values())
        want = 2 * inter / (pred + gt) if pred + gt else None
        assert metrics["per_class"][str(c)]["dice"] == pytest.approx(want)
        assert metrics["per_class"][str(c)]["name"] == CLASSES[c]
    assert "summed over the whole test split" in metrics["protocol"]["dice"]
    assert "| mDice | mIoU |" in (scored / "table.md").read_text()


def test_semantic_sweep_report_has_dice_columns(semantic_sweep):
    from typer.testing import CliRunner

    from cellembed.cli import app

    out, _ = semantic_sweep
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    table = (out / "report" / "table.md").read_text()
    head, _, row = table.splitlines()[:3]
    assert "mDice" in head and "Dice tumour" in head and "Dice fat" in head and "mIoU" in head and "PQ" not in head
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2" and all("±" in c and c[0].isdigit() for c in cells[3:])  # numbers, mean ± sd of 2 seeds
    assert "pixel counts summed over the whole test split" in table
    for name in ("table.csv", "curves.png", "overlays.png", "report.html"):
        assert (out / "report" / name).stat().st_size > 0
    assert (out / "report" / "report.html").read_text().count("data:image/png;base64,") == 2


def test_score_cli_prints_the_dice_table(semantic_sweep, tmp_path):
    from typer.testing import CliRunner

    from cellembed.cli import app

    _, result = semantic_sweep
    run = result.ran[0]
    res = CliRunner().invoke(app, ["score", str(run.folder / "run"), "--cache", str(run.cache.paths["test"]),
                                   "--out", str(tmp_path / "s"), "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "Dice" in res.output and "tumour" in res.output and "mean" in res.output
    assert len(list((tmp_path / "s").glob("overlay_*.png"))) == 2


def test_a_mixed_instance_and_semantic_report_has_both_column_sets(semantic_sweep, tmp_path):
    from cellembed.sweep import load_sweep, report, run_sweep

    path = tmp_path / "instance.yaml"
    path.write_text("data: {dataset: synthetic, scheme: cisca, dataset_options: {n_tiles: 10, size: 64}}\n"
                    "extract: {weights: random, num_workers: 0, device: cpu}\n"
                    "fit: {epochs: 1, batch_size: 4, memory: ram, num_workers: 0, device: cpu, refine: false}\n"
                    "runs: [{encoder: test_vit, blocks: deep}]\n")
    done = run_sweep(load_sweep(path, out=tmp_path / "instance"))
    assert not done.failed, [str(e) for _, e in done.failed]
    result = report([semantic_sweep[0], tmp_path / "instance"], tmp_path / "report")
    head = (tmp_path / "report" / "table.md").read_text().splitlines()[0]
    assert "| PQ |" in head and "| mDice |" in head and "Dice stroma" in head
    assert {r["dataset"] for r in result.rows} == {"semantic_folder", "synthetic"}
    for name in ("curves.png", "overlays.png", "overlays_semantic.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Semantic runs: Dice" in html


def test_fm_benchmark_sweep_plans_fifteen_encoders_at_their_last_block(tmp_path):
    from cellembed.encoders import get_spec
    from cellembed.sweep import load_sweep

    path = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "fm_benchmark.yaml"
    sweep = load_sweep(path, out=tmp_path)
    assert len(sweep.caches) == 15 and len(sweep.runs) == 45 and {r.seed for r in sweep.runs} == {0, 1, 2}
    for run in sweep.runs:
        assert run.fit.levels == f"block_{get_spec(run.cache.encoder).depth - 1}"
        assert (run.fit.decoder, run.fit.head, run.fit.loss, run.fit.best_metric) == ("light", "semantic",
                                                                                      "semantic", "mdice")
    assert {c.configs["train"].dataset for c in sweep.caches} == {"semantic_folder"}


def test_semantic_loss_name_needs_the_semantic_head(tmp_path):
    from cellembed.train import FitConfig
    from cellembed.train._fit import _check_config

    _check_config(FitConfig(out=str(tmp_path), cache="c", head="semantic", loss="semantic"))
    with pytest.raises(ValueError, match="loss 'semantic' .* is the semantic head's loss"):
        _check_config(FitConfig(out=str(tmp_path), cache="c", head="cisca", loss="semantic"))


def test_default_best_metric_means_mean_dice_for_a_semantic_run():
    from cellembed.train._fit import metric_key

    semantic = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_mdice": 0.4, "val_miou": 0.3}
    assert metric_key("pq", semantic) == "val_mdice"  # fit-decoder's default, on a run without PQ
    assert metric_key("miou", semantic) == "val_miou"
    assert metric_key("pq", {"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_pq": 0.5}) == "val_pq"
    assert metric_key("aji", semantic) == "val_loss"  # a metric the run has not: its validation loss
