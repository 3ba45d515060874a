"""Property-based tests (hypothesis): metrics and post-processing on arbitrary label maps and decoder outputs.

Metrics: any valid label maps score without error, values stay in [0, 1], and the result does not depend on
how instances are numbered or in which order images come. Post-processing: any probability maps give int32
instance maps with ids 1..n, one type per instance, and the numba path equals its scipy / scikit-image twin.
"""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellembed.data import make_synthetic_tile
from cellembed.metrics import compact_labels, image_counts, score_arrays
from cellembed.postprocess import (
    CISCA_PRESETS,
    cisca_instances,
    cisca_instances_reference,
    hover_instances,
)
from cellembed.targets import cisca_targets, hover_targets

PROPS = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow],
                 derandomize=True, database=None)
LABEL_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int16, np.int32, np.int64]
UNIT_KEYS = ("precision", "recall", "dq", "sq", "pq", "aji", "aji_plus", "dice")

# ---- strategies ------------------------------------------------------------------------------------------------


@st.composite
def blocky(draw, shape: tuple[int, ...], top: int, scales=(1, 2, 4)) -> np.ndarray:
    """(…, H, W) int64 in 0..top: a coarse random grid upscaled by one of ``scales`` (blobs: IoUs above 0.5)."""
    *lead, h, w = shape
    s = draw(st.sampled_from(scales))
    coarse = draw(hnp.arrays(np.int64, (*lead, -(-h // s), -(-w // s)), elements=st.integers(0, top)))
    return np.repeat(np.repeat(coarse, s, axis=-2), s, axis=-1)[..., :h, :w]


@st.composite
def perturbed(draw, true: np.ndarray, top: int) -> np.ndarray:
    """A prediction: ``true`` with a random fraction of pixels redrawn, or an independent map."""
    other = draw(blocky(true.shape, top))
    if draw(st.booleans()):
        return other
    keep = draw(hnp.arrays(np.bool_, true.shape, elements=st.sampled_from([True, True, True, False])))
    return np.where(keep, true, other)


@st.composite
def relabelling(draw, n: int, monotone: bool) -> np.ndarray:
    """(n + 1,) lookup table: 0 → 0 and ids 1..n to distinct positive ids (increasing if ``monotone``)."""
    ids = draw(st.lists(st.integers(1, 2**40), min_size=n, max_size=n, unique=True))
    ids = sorted(ids) if monotone else ids
    return np.array([0, *ids], np.int64)


@st.composite
def scored_pair(draw, typed: bool | None = None):
    """(pred, true, dtype) batches of N <= 3 images, (N, H, W) or (N, H, W, 2) with types 0..3."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 16)), draw(st.integers(1, 16))
    top = draw(st.sampled_from([1, 3, 8, 40]))
    true = draw(blocky((n, h, w), top))
    pred = draw(perturbed(true, top))
    typed = draw(st.booleans()) if typed is None else typed
    if typed:  # types constant on coarse blocks too, so instances may carry one or several types
        true = np.stack([true, draw(blocky((n, h, w), 3)) * (true > 0)], -1)
        pred = np.stack([pred, draw(blocky((n, h, w), 3)) * (pred > 0)], -1)
    dtype = draw(st.sampled_from(LABEL_DTYPES))
    return pred.astype(dtype), true.astype(dtype)


def _relabel(maps, table_pred: np.ndarray, table_true: np.ndarray, typed: bool):
    """Renumber the instance channel of (pred, true): the k-th smallest positive id becomes ``table[k]``."""
    out = []
    for m, table in zip(maps, (table_pred, table_true)):
        m = m.astype(np.int64)
        inst = m[..., 0] if typed else m
        present, inverse = np.unique(inst, return_inverse=True)
        lut = np.zeros(present.size, np.int64)
        lut[present > 0] = table[1:np.count_nonzero(present) + 1]
        new = lut[inverse.reshape(inst.shape)]
        out.append(np.stack([new, m[..., 1]], -1) if typed else new)
    return out


def _n_ids(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(labels)))


def _assert_unit(value, where: str) -> None:
    assert value is None or 0.0 <= value <= 1.0 + 1e-12, f"{where} = {value} outside [0, 1]"


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


# ---- metrics ---------------------------------------------------------------------------------------------------


@PROPS
@given(scored_pair())
def test_scores_stay_in_range_and_count_every_instance(pair):
    pred, true = pair
    typed = pred.ndim == 4
    tissues = [f"t{i % 2}" for i in range(len(pred))]
    out = score_arrays(pred, true, tissues=tissues)
    for i, img in enumerate(out["per_image"]):
        p_inst, t_inst = (pred[i, ..., 0], true[i, ..., 0]) if typed else (pred[i], true[i])
        assert img["tp"] + img["fp"] == _n_ids(p_inst) and img["tp"] + img["fn"] == _n_ids(t_inst)
        assert 0 <= img["iou_sum"] <= img["tp"] + 1e-9
        for key in UNIT_KEYS:
            _assert_unit(img[key], f"image {i} {key}")
        if _n_ids(t_inst) == 0 and _n_ids(p_inst) == 0:
            assert img["pq"] is None
    for key, value in out["summary"].items():
        _assert_unit(value, f"summary {key}")
    for c, row in out["per_class"].items():
        _assert_unit(row["pq"], f"class {c} pq")
    for key in ("bpq", "mpq"):
        _assert_unit(out["pannuke"][key], f"pannuke {key}")
    top = int(max(pred[..., 1].max(), true[..., 1].max())) if typed else 0  # K defaults to the largest type
    assert list(out["per_class"]) == [str(c) for c in range(1, top + 1)]


@PROPS
@given(scored_pair(), st.data())
def test_increasing_relabelling_changes_nothing(pair, data):
    pred, true = pair
    typed = pred.ndim == 4
    ids = lambda m: m[..., 0] if typed else m
    tables = [data.draw(relabelling(max(_n_ids(ids(m)), 1), monotone=True)) for m in (pred, true)]
    new_pred, new_true = _relabel((pred, true), *tables, typed)
    # per image: a fresh table per image would also do; one table over the batch keeps ids distinct per image
    assert score_arrays(new_pred, new_true) == score_arrays(pred, true)


@PROPS
@given(scored_pair(), st.data())
def test_any_relabelling_keeps_the_matching(pair, data):
    """IoU > 0.5 matching is unique, so PQ and its parts ignore ids; AJI breaks ties by id, so it may not."""
    pred, true = pair
    typed = pred.ndim == 4
    ids = lambda m: m[..., 0] if typed else m
    tables = [data.draw(relabelling(max(_n_ids(ids(m)), 1), monotone=False)) for m in (pred, true)]
    a = score_arrays(*_relabel((pred, true), *tables, typed))
    b = score_arrays(pred, true)
    keys = ("tp", "fp", "fn", "iou_sum", "precision", "recall", "dq", "sq", "pq", "dice")
    assert _close([{k: x[k] for k in keys} for x in a["per_image"]], [{k: x[k] for k in keys} for x in b["per_image"]])
    assert _close(a["per_class"], b["per_class"])


@PROPS
@given(scored_pair(), st.randoms(use_true_random=False))
def test_image_order_only_permutes_per_image_results(pair, rnd):
    pred, true = pair
    perm = list(range(len(pred)))
    rnd.shuffle(perm)
    tissues = [f"t{i % 2}" for i in range(len(pred))]
    a = score_arrays(pred[perm], true[perm], tissues=[tissues[i] for i in perm])
    b = score_arrays(pred, true, tissues=tissues)
    assert a["per_image"] == [b["per_image"][i] for i in perm]
    assert _close(a["summary"], b["summary"]) and _close(a["per_class"], b["per_class"])
    assert _close(a["pannuke"], b["pannuke"])


@PROPS
@given(scored_pair())
def test_perfect_prediction_and_swapped_roles(pair):
    pred, true = pair
    typed = pred.ndim == 4
    same = score_arrays(true, true)
    for i, img in enumerate(same["per_image"]):
        if _n_ids(true[i, ..., 0] if typed else true[i]):
            assert img["fp"] == img["fn"] == 0
            assert img["pq"] == pytest.approx(1) and img["aji"] == pytest.approx(1) and img["dice"] == 1
    a, b = score_arrays(pred, true), score_arrays(true, pred)
    for x, y in zip(a["per_image"], b["per_image"]):
        assert (x["tp"], x["fp"], x["fn"]) == (y["tp"], y["fn"], y["fp"])
        assert _close({k: x[k] for k in ("pq", "dq", "sq", "dice")}, {k: y[k] for k in ("pq", "dq", "sq", "dice")})
    for i in range(len(pred)):  # the per-image entry point agrees with the batch one
        c = image_counts(pred[i], true[i])
        assert (c.tp, c.fp, c.fn) == tuple(a["per_image"][i][k] for k in ("tp", "fp", "fn"))


@PROPS
@given(hnp.arrays(st.sampled_from(LABEL_DTYPES), hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
                  elements=st.integers(0, 255)))
def test_compact_labels_is_an_order_keeping_renumbering(labels):
    compact, ids = compact_labels(labels)
    assert compact.shape == labels.shape
    present = np.unique(labels[labels > 0])
    assert np.array_equal(np.unique(compact[compact > 0]), np.arange(1, present.size + 1))
    assert np.array_equal(ids[compact], labels.astype(np.int64)) and np.array_equal(ids[1:], present)


@PROPS
@given(hnp.arrays(st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                            hnp.boolean_dtypes()), (2, 5, 6)),
       hnp.arrays(np.int64, (2, 5, 6), elements=st.integers(0, 4)))
def test_invalid_label_maps_are_refused_with_a_value_error(pred, true):
    try:
        out = score_arrays(pred, true)
    except ValueError as err:
        assert "pred" in str(err)
        return
    assert np.issubdtype(pred.dtype, np.integer) and pred.min() >= 0 and len(out["per_image"]) == 2


# ---- post-processing -------------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


@st.composite
def decoder_maps(draw):
    """(inst (H, W) int32, rng, noise level) for 1 <= H, W <= 64: a crop of a synthetic tile or random blocks."""
    side = st.sampled_from([64, 48, 32]) | st.integers(1, 64)
    h, w = draw(side), draw(side)
    if draw(st.booleans()):
        tile = make_synthetic_tile(draw(st.integers(0, 1000)), 0, 64, 4).inst_map
        y, x = draw(st.integers(0, 64 - h)), draw(st.integers(0, 64 - w))
        inst = tile[y:y + h, x:x + w]
    else:
        inst = draw(blocky((h, w), draw(st.sampled_from([0, 2, 6])), scales=(1, 4, 8)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return inst.astype(np.int32), rng, draw(st.sampled_from([0.0, 0.5, 2.0, 8.0]))


def _check_instances(inst, types, shape, min_area=0):
    assert inst.shape == types.shape == shape and inst.dtype == np.int32 and types.dtype == np.uint8
    ids, areas = np.unique(inst[inst > 0], return_counts=True)
    assert np.array_equal(ids, np.arange(1, ids.size + 1)), "instance ids are not 1..n"
    assert (areas >= min_area).all()
    assert not types[inst == 0].any(), "type outside instances"
    for i in ids:
        assert np.unique(types[inst == i]).size == 1, f"instance {i} has several types"


@PROPS
@given(decoder_maps(), st.sampled_from(["40x", "20x"]), st.integers(0, 30), st.integers(0, 4))
def test_cisca_instances_on_arbitrary_maps(maps, preset, min_area, n_types):
    inst, rng, noise = maps
    h, w = inst.shape
    t = cisca_targets(inst, magnification=preset)
    onehot = (np.arange(3)[:, None, None] == t.classes).astype(np.float32)
    classes = _softmax(6 * onehot + noise * rng.normal(size=(3, h, w)))
    directions = np.clip(t.directions + noise / 8 * rng.normal(size=t.directions.shape), -1, 1).astype(np.float32)
    types = _softmax(rng.normal(size=(n_types + 1, h, w))) if n_types else None
    params = replace(CISCA_PRESETS[preset], min_area=min_area)
    out, out_types = cisca_instances(classes, directions, types, params)
    _check_instances(out, out_types, (h, w), min_area)
    if types is not None and n_types:  # the soft vote never answers background for an instance
        assert (out_types[out > 0] >= 1).all() and out_types.max() <= n_types
    ref, ref_types = cisca_instances_reference(classes, directions, types, params)
    assert np.array_equal(out, ref) and np.array_equal(out_types, ref_types)


@PROPS
@given(decoder_maps(), st.sampled_from(["40x", "20x"]), st.booleans(), st.integers(0, 3))
def test_hover_instances_on_arbitrary_maps(maps, magnification, upsample, n_types):
    inst, rng, noise = maps
    h, w = inst.shape
    t = hover_targets(inst)
    np_prob = np.clip(t.np + noise / 8 * rng.normal(size=(h, w)), 0, 1).astype(np.float32)
    hv = (t.hv + noise / 8 * rng.normal(size=t.hv.shape)).astype(np.float32)
    nc = _softmax(rng.normal(size=(n_types + 1, h, w))) if n_types else None
    out, out_types = hover_instances(np_prob, hv, nc, magnification, upsample)
    _check_instances(out, out_types, (h, w))
    ref, ref_types = hover_instances(np_prob, hv, nc, magnification, upsample, reference=True)
    assert np.array_equal(out, ref) and np.array_equal(out_types, ref_types)


@PROPS
@given(st.integers(1, 24), st.integers(1, 24), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0]))
def test_post_processing_of_degenerate_maps(h, w, fill):
    """Constant, NaN or infinite maps (a diverged decoder) give valid (possibly empty) label maps."""
    classes = np.full((3, h, w), fill, np.float32)
    directions = np.full((4, h, w), fill, np.float32)
    _check_instances(*cisca_instances(classes, directions, None, CISCA_PRESETS["40x"]), (h, w))
    _check_instances(*hover_instances(np.full((h, w), fill), np.full((2, h, w), fill)), (h, w))
