"""cellembed.metrics: kernels vs numpy twins, fast path vs the per-instance reference, geometry, edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cellembed.metrics import (
    _kernels,
    _reference,
    _table,
    compact_labels,
    image_counts,
    overlap,
    score_arrays,
)
from cellembed.metrics._reference import image_counts_reference, random_pair


def same_counts(a, b, atol=1e-9):
    for field in a._fields:
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, np.ndarray) or "iou" in field:
            assert np.allclose(x, y, rtol=0, atol=atol), field
        else:
            assert x == y, field


def square(shape, y0, y1, x0, x1, value=1):
    out = np.zeros(shape, np.int64)
    out[y0:y1, x0:x1] = value
    return out


def disc(shape, cy, cx, r, value=1):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, value, 0).astype(np.int64)


# --- kernels against their numpy twins -------------------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_kernels_match_numpy_twins(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 2000))
    top = int(rng.choice([0, 1, 5, 300, 5000]))
    g = rng.integers(0, top + 1, size).astype(np.int64)
    p = rng.integers(0, top + 1, size).astype(np.int64)
    if seed % 3 == 0:
        g = g + 1  # no background pixel
    gc, g_ids = _kernels.compact_ids(g, int(g.max()))
    gc2, g_ids2 = _reference.compact_ids_np(g)
    assert np.array_equal(gc, gc2) and np.array_equal(g_ids, g_ids2)
    assert np.array_equal(g_ids[gc], g)
    pc, p_ids = _kernels.compact_ids(p, int(p.max()))
    types = rng.integers(0, 4, size).astype(np.int64)
    assert np.array_equal(_kernels.class_keys(gc, types, 4), _reference.class_keys_np(gc, types, 4))
    n_g, n_p = g_ids.size - 1, p_ids.size - 1
    assert np.array_equal(_kernels.overlap_counts(gc, pc, n_g, n_p), _reference.overlap_counts_np(gc, pc, n_g, n_p))


def test_kernel_edge_cases():
    empty = np.zeros(0, np.int64)
    out, ids = _kernels.compact_ids(empty, 0)
    assert out.size == 0 and ids.tolist() == [0]
    assert _kernels.overlap_counts(empty, empty, 0, 0).tolist() == [[0]]
    out, ids = _kernels.compact_ids(np.full(9, 7, np.int64), 7)
    assert out.tolist() == [1] * 9 and ids.tolist() == [0, 7]


def test_compact_labels_wrapper():
    assert compact_labels(np.array([[0, 7], [7, 3]]))[0].tolist() == [[0, 2], [2, 1]]
    big = np.array([[2**62, 5], [0, 2**40]], np.uint64)
    out, ids = compact_labels(big)
    assert out.tolist() == [[3, 1], [0, 2]] and ids.tolist() == [0, 5, 2**40, 2**62]
    with pytest.raises(ValueError, match="integer"):
        compact_labels(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        compact_labels(-np.ones((2, 2), int))


def test_sparse_overlap_path_matches_dense(monkeypatch):
    rng = np.random.default_rng(3)
    pairs = [random_pair(rng, n_classes=2) for _ in range(5)]
    dense = [image_counts(p, t, 2) for p, t in pairs]
    monkeypatch.setattr(_table, "_DENSE_LIMIT", 0)
    for (p, t), d in zip(pairs, dense):
        same_counts(image_counts(p, t, 2), d)


# --- fast path against the straightforward per-instance reference -----------------------------------

@pytest.mark.parametrize("seed", range(60))
def test_fast_matches_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 5))
    pred, true = random_pair(rng, size=int(rng.choice([32, 64])), n_cells=int(rng.integers(0, 25)), n_classes=k)
    same_counts(image_counts(pred, true, k), image_counts_reference(pred, true, k))
    same_counts(image_counts(pred[..., 0], true[..., 0]), image_counts_reference(pred[..., 0], true[..., 0]))


@pytest.mark.parametrize("seed", range(40))
def test_compiled_one_pass_equals_the_numpy_path(seed):
    from cellembed.metrics._fused import fused_counts
    from cellembed.metrics._image import image_counts_numpy

    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(1, 7))
    pred, true = random_pair(rng, size=int(rng.choice([32, 64, 96])), n_cells=int(rng.integers(0, 40)), n_classes=k,
                             scramble=bool(seed % 2))
    dtype = [np.int32, np.int64, np.uint16, np.int16][seed % 4]
    if pred.max() > np.iinfo(dtype).max or true.max() > np.iinfo(dtype).max:
        dtype = np.int64
    pred, true = pred.astype(dtype), true.astype(dtype)
    small_ids = max(pred[..., 0].max(), true[..., 0].max()) <= 4 * pred[..., 0].size + 65536
    for p, t, kk in ((pred, true, k), (pred[..., 0], true[..., 0], None)):
        fast = fused_counts(p, t, kk)
        assert (fast is not None) == small_ids  # huge scrambled ids go to the numpy path
        if fast is not None:
            ref = image_counts_numpy(p, t, kk)
            for field in fast._fields:  # counts exact; IoU sums summed in another order
                x, y = getattr(fast, field), getattr(ref, field)
                assert np.allclose(x, y, rtol=0, atol=1e-12) if "iou" in field else np.array_equal(x, y), field
                assert type(x) is type(y) or isinstance(x, np.ndarray), field


@pytest.mark.parametrize("case", ["empty", "pred_empty", "true_empty", "one_pixel", "full", "all_types_zero"])
def test_fast_matches_reference_on_adversarial_maps(case):
    rng = np.random.default_rng(0)
    pred, true = random_pair(rng, size=32, n_cells=8, n_classes=2)
    if case in ("empty", "pred_empty"):
        pred[:] = 0
    if case in ("empty", "true_empty"):
        true[:] = 0
    if case == "one_pixel":
        pred[:], true[:] = 0, 0
        pred[3, 3], true[3, 3] = (9, 1), (4, 2)
    if case == "full":
        pred[..., 0], true[..., 0] = 5, 2**35
    if case == "all_types_zero":
        pred[..., 1], true[..., 1] = 0, 0
    same_counts(image_counts(pred, true, 2), image_counts_reference(pred, true, 2))


@pytest.mark.parametrize("seed", range(30))
def test_fast_matches_reference_on_grid_squares_with_ties(seed):
    rng = np.random.default_rng(seed)
    true, pred = np.zeros((24, 24, 2), np.int64), np.zeros((24, 24, 2), np.int64)
    for i in range(1, 12):  # coarse grids: many exactly equal IoUs (AJI argmax / AJI+ assignment ties)
        y, x, h, w = *(rng.integers(0, 6, 2) * 4), *(rng.integers(1, 3, 2) * 4)
        true[y:y + h, x:x + w] = (i, rng.integers(1, 3))
        y, x, h, w = *(rng.integers(0, 12, 2) * 2), *(rng.integers(1, 5, 2) * 2)
        pred[y:y + h, x:x + w] = (i + 20, rng.integers(1, 3))
    same_counts(image_counts(pred, true, 2), image_counts_reference(pred, true, 2))


# --- hand-checked geometry -------------------------------------------------------------------------

def test_squares_shifted_by_known_offsets():
    true = square((40, 40), 5, 15, 5, 15, 3)  # 10 x 10
    for dx, iou, match in [(0, 1.0, True), (2, 80 / 120, True), (3, 70 / 130, True), (4, 60 / 140, False)]:
        pred = square((40, 40), 5, 15, 5 + dx, 15 + dx, 8)
        c = image_counts(pred, true)
        assert (c.tp, c.fp, c.fn) == ((1, 0, 0) if match else (0, 1, 1))
        assert c.iou_sum == pytest.approx(iou if match else 0.0, abs=1e-12)
        assert (c.aji_inter, c.aji_union) == (100 - 10 * dx, 100 + 10 * dx)


def test_discs_shifted_agree_with_lens_geometry():
    r = 30.0
    true = disc((100, 140), 50, 50, r, 1)
    for d in (4, 10, 16, 22):
        pred = disc((100, 140), 50, 50 + d, r, 1)
        lens = 2 * r * r * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r * r - d * d)
        iou = lens / (2 * math.pi * r * r - lens)
        c = image_counts(pred, true)
        assert c.tp == (1 if iou > 0.5 else 0)
        if c.tp:
            assert c.iou_sum == pytest.approx(iou, abs=0.01)


def test_iou_exactly_half_never_matches():
    shape = (70, 110)
    true = square(shape, 0, 61, 0, 100, 1)  # 6100 px
    pred = square(shape, 0, 61, 0, 50, 2)   # 3050 px inside: IoU 3050 / 6100
    assert image_counts(pred, true)[:3] == (0, 1, 1)
    true[60, 98:] = 0                       # 6098 px: IoU 3050 / 6098 > 0.5
    c = image_counts(pred, true)
    assert c[:3] == (1, 0, 0) and c.iou_sum == pytest.approx(3050 / 6098)


def test_aji_counts_a_merging_prediction_twice_and_aji_plus_once():
    true = square((8, 8), 0, 4, 0, 4, 1) + square((8, 8), 0, 4, 4, 8, 2)
    pred = square((8, 8), 0, 4, 0, 8, 5)  # IoU 0.5 with each: no PQ match
    c = image_counts(pred, true)
    assert c[:3] == (0, 1, 2)
    assert (c.aji_inter, c.aji_union) == (32, 64)
    assert (c.ajip_inter, c.ajip_union) == (16, 48)


def test_class_split_per_pixel_and_fp_only_class():
    true = np.zeros((1, 20, 20, 2), np.int64)
    true[0, 2:8, 2:8] = (4, 1)
    pred = true.copy()
    pred[0, 12:18, 12:18] = (9, 3)  # class 3 only as a false positive
    out = score_arrays(pred, true, num_classes=3, tissues=["x"])
    assert out["per_class"]["3"] == {"tp": 0, "fp": 1, "fn": 0, "iou_sum": 0.0, "dq": 0.0, "sq": 0.0, "pq": 0.0}
    assert out["per_class"]["2"]["pq"] is None
    assert out["summary"]["mpq_plus"] == pytest.approx(1 / 3)  # classes 2 and 3 count 0
    assert out["pannuke"]["per_class"] == {"1": 1.0, "2": None, "3": None}  # FPs without GT ignored
    assert out["pannuke"]["mpq"] == 1.0
    assert out["pannuke"]["bpq"] == pytest.approx(2 / 3)  # binary: 1 TP, 1 FP
    pred[0, 2:8, 2:5, 1] = 2  # half the cell typed 2: class 1 part IoU 0.5 -> no match
    out = score_arrays(pred, true, num_classes=3)
    assert out["per_class"]["1"]["tp"] == 0 and out["per_class"]["2"]["fp"] == 1
    assert out["per_image"][0]["tp"] == 1 and out["per_image"][0]["fp"] == 1  # instance channel ignores types


# --- empty images and conventions --------------------------------------------------------------------

def test_empty_images_and_conventions():
    true = np.zeros((3, 10, 10), np.int64)
    pred = np.zeros((3, 10, 10), np.int64)
    true[0, 1:5, 1:5] = 1
    pred[0, 1:5, 1:5] = 7   # image 0 perfect
    pred[1, 1:5, 1:5] = 2   # image 1: GT empty, one FP
    out = score_arrays(pred, true, tissues=["a", "a", "b"])  # image 2: both empty
    im = out["per_image"]
    assert im[0]["pq"] == 1.0 and im[0]["aji"] == 1.0 and im[0]["dice"] == 1.0
    assert (im[1]["pq"], im[1]["dq"], im[1]["aji"], im[1]["dice"], im[1]["recall"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert all(im[2][k] is None for k in ("dq", "sq", "pq", "precision", "recall", "aji", "aji_plus", "dice"))
    assert out["summary"]["pq"] == 1.0                        # only images with GT
    assert out["summary"]["pq_conic"] == pytest.approx(1 / 3)  # every image, empty -> 0
    assert out["summary"]["mpq_plus"] is None and out["per_class"] == {}
    assert out["pannuke"]["bpq"] == 1.0 and out["pannuke"]["per_tissue"]["b"]["bpq"] is None
    json.dumps(out, allow_nan=False)


def test_prediction_empty():
    true = np.zeros((1, 10, 10, 2), np.int64)
    true[0, 2:6, 2:6] = (3, 1)
    im = score_arrays(np.zeros_like(true), true)["per_image"][0]
    assert im["fn"] == 1 and im["pq"] == 0.0 and im["aji"] == 0.0 and im["aji_plus"] == 0.0
    assert im["precision"] == 0.0 and im["recall"] == 0.0 and im["dice"] == 0.0


def test_all_empty_dataset():
    z = np.zeros((2, 8, 8, 2), np.int64)
    out = score_arrays(z, z, num_classes=2, tissues=["a", "b"])
    assert out["summary"]["pq"] is None and out["summary"]["pq_conic"] == 0.0
    assert out["summary"]["mpq_plus"] == 0.0
    assert out["pannuke"]["bpq"] is None and out["pannuke"]["mpq"] is None


def test_aggregations_by_hand():
    size = (20, 20)
    true = np.zeros((3, *size, 2), np.int64)
    pred = np.zeros_like(true)
    true[:, 2:12, 2:12] = (1, 1)
    true[0, 14:18, 14:18] = (2, 2)
    pred[0, 2:12, 2:12] = (1, 1)                       # image 0: class 1 TP (IoU 1), class 2 FN
    pred[1, 2:12, 4:14] = (1, 1)                       # image 1: class 1 TP, IoU 80/120
    # image 2: FN only
    out = score_arrays(pred, true, num_classes=2, tissues=["a", "a", "b"])
    pq0, pq1 = 2 / 3, 80 / 120
    assert out["summary"]["pq"] == pytest.approx((pq0 + pq1 + 0) / 3)
    c1 = out["per_class"]["1"]
    assert (c1["tp"], c1["fp"], c1["fn"]) == (2, 0, 1)
    pq_c1 = (2 / 2.5) * ((1 + pq1) / 2)
    assert c1["pq"] == pytest.approx(pq_c1) and out["per_class"]["2"]["pq"] == 0.0
    assert out["summary"]["mpq_plus"] == pytest.approx(pq_c1 / 2)
    pn = out["pannuke"]
    mpq_img = [np.mean([1.0, 0.0]), pq1, 0.0]           # image 0 has GT of both classes
    assert pn["per_tissue"]["a"]["mpq"] == pytest.approx((mpq_img[0] + mpq_img[1]) / 2)
    assert pn["mpq"] == pytest.approx(((mpq_img[0] + mpq_img[1]) / 2 + 0.0) / 2)  # mean of tissue means
    assert pn["bpq"] == pytest.approx(((pq0 + pq1) / 2 + 0.0) / 2)
    assert pn["per_class"]["1"] == pytest.approx((1 + pq1 + 0) / 3) and pn["per_class"]["2"] == 0.0


# --- properties -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_properties(seed):
    rng = np.random.default_rng(100 + seed)
    pred, true = random_pair(rng, size=64, n_cells=20, n_classes=3)
    c = image_counts(pred, true, 3)
    relabelled = pred.copy()
    ids = np.unique(pred[..., 0])
    ids = ids[ids > 0]
    lut = {0: 0, **dict(zip(ids.tolist(), rng.permutation(ids.size) * 3 + 11))}
    relabelled[..., 0] = np.vectorize(lut.get)(pred[..., 0])
    same_counts(image_counts(relabelled, true, 3), c)
    s = image_counts(true, pred, 3)
    assert (s.tp, s.fp, s.fn, s.part_fp, s.part_fn) == (c.tp, c.fn, c.fp, c.part_fn, c.part_fp)
    assert np.array_equal(s.class_fp, c.class_fn) and np.array_equal(s.class_tp, c.class_tp)
    assert s.iou_sum == pytest.approx(c.iou_sum) and (s.fg_inter, s.fg_true) == (c.fg_inter, c.fg_pred)
    out = score_arrays(true[None], true[None], num_classes=3)
    assert out["summary"]["pq"] == 1.0 and out["summary"]["aji_plus"] == 1.0 and out["summary"]["dice"] == 1.0
    assert out["summary"]["mpq_plus"] == pytest.approx(np.mean([v["pq"] or 0.0 for v in out["per_class"].values()]))


# --- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, true, kwargs, message", [
    (np.zeros((1, 4, 4, 2), int), np.zeros((1, 4, 5, 2), int), {}, "shapes differ"),
    (np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 2)), {}, "integer"),
    (-np.ones((1, 4, 4), int), np.zeros((1, 4, 4), int), {}, "non-negative"),
    (np.zeros((0, 4, 4), int), np.zeros((0, 4, 4), int), {}, "N >= 1"),
    (np.zeros((1, 4, 4, 3), int), np.zeros((1, 4, 4, 3), int), {}, "expected"),
    (np.full((1, 4, 4, 2), 3), np.zeros((1, 4, 4, 2), int), {"num_classes": 2}, "<= num_classes"),
    (np.zeros((1, 4, 4), int), np.zeros((1, 4, 4), int), {"num_classes": 2}, "typed"),
    (np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int), {"tissues": ["a"]}, "tissues"),
])
def test_validation(pred, true, kwargs, message):
    with pytest.raises(ValueError, match=message):
        score_arrays(pred, true, **kwargs)


def test_overlap_wrapper():
    ov, t_ids, p_ids = overlap(np.array([[5, 5], [0, 9]]), np.array([[2, 0], [0, 2]]))
    assert t_ids.tolist() == [0, 5, 9] and p_ids.tolist() == [0, 2]
    assert ov.true.tolist() == [1, 2] and ov.inter.tolist() == [1, 1] and ov.union.tolist() == [3, 2]


def test_images_scored_on_threads_equal_one_by_one():
    """``score_arrays`` splits the images over threads (``counts_many``): same counts, same order."""
    from cellembed.metrics._image import image_counts_unchecked
    from cellembed.metrics._score import counts_many

    rng = np.random.default_rng(7)
    pairs = [random_pair(rng, size=64, n_cells=int(rng.integers(0, 20)), n_classes=4, scramble=False)
             for _ in range(21)]
    pred = np.stack([p for p, _ in pairs]).astype(np.int32)
    true = np.stack([t for _, t in pairs]).astype(np.int32)
    serial = [image_counts_unchecked(pred[i], true[i], 4) for i in range(len(pred))]
    for workers in (2, 3, 40):
        threaded = counts_many(pred, true, 4, workers=workers)
        assert len(threaded) == len(serial)
        for a, b in zip(threaded, serial):
            same_counts(a, b)
    from cellembed.metrics._aggregate import image_values

    assert score_arrays(pred, true, 4)["per_image"] == [image_values(c) for c in serial]
