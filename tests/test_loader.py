"""The training-time cache reader: memory modes, dihedral augmentation, refusal, DDP split, corrupt shards,
CISCA oversampling."""

import os
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cellembed.cache import (
    CacheError,
    ExtractConfig,
    check_compatible,
    extract,
    make_loader,
    open_cache,
)
from cellembed.cache._augment import (
    TargetMemo,
    allowed_variants,
    dihedral_batch,
    dihedral_np,
    dihedral_targets,
    sample_targets,
)
from cellembed.cache._loader import auto_shuffle_buffer
from cellembed.cache._oversample import (
    OVERSAMPLE_SCHEMES,
    OversampleScheme,
    cisca_oversample,
    extra_classes,
    instance_class_counts,
)
from cellembed.data import make_synthetic_tile
from cellembed.targets import cisca_targets, hover_targets
from cellembed.targets._common import check_inst_map
from cellembed.targets._directions import dihedral_safe

REALDATA = Path(os.environ.get("CELLEMBED_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))


def _extract(out, encoder):
    extract(ExtractConfig(dataset="synthetic", out=str(out), encoder=encoder, weights="random", device="cpu",
                          num_workers=0, shard_size=4, batch_size=4,
                          dataset_options={"n_tiles": 10, "seed": 0, "size": 64}))
    return open_cache(out)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _extract(tmp_path_factory.mktemp("vit") / "cache", "test_vit")


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    return _extract(tmp_path_factory.mktemp("cnx") / "cache", "test_convnext")


@pytest.fixture(scope="module")
def raw(vit):
    return {s.key: s for s in vit}


def _by_hand(a: np.ndarray, v: int) -> np.ndarray:
    """Variant v over the last two axes written out with explicit indices: mirror columns, then k CCW turns."""
    if v >= 4:
        a = a[..., :, ::-1]
    for _ in range(v % 4):  # one CCW quarter turn: out[i, j] = in[j, W - 1 - i]
        a = np.swapaxes(a, -1, -2)[..., ::-1, :]
    return np.ascontiguousarray(a)


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def _assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys == y.keys
        assert all(torch.equal(a, b) for a, b in zip(x.feats, y.feats))
        assert torch.equal(x.image, y.image)
        assert x.targets.keys() == y.targets.keys()
        assert all(torch.equal(x.targets[k], y.targets[k]) for k in x.targets)


@pytest.mark.parametrize("augment", ["none", "dihedral"])
def test_memory_modes_give_identical_batches(vit, raw, augment):
    runs = {mode: _epoch(make_loader(vit, batch_size=3, memory=mode, augment=augment, seed=3, num_workers=2), 1)
            for mode in ("stream", "ram", "gpu")}
    _assert_same_batches(runs["stream"], runs["ram"])
    _assert_same_batches(runs["stream"], runs["gpu"])
    keys = [k for b in runs["stream"] for k in b.keys]
    assert sorted(keys) == sorted(raw) and [len(b.keys) for b in runs["stream"]] == [3, 3, 3, 1]
    if augment == "none":  # served values are the cached ones, targets computed from the cached maps
        for b in runs["ram"]:
            for i, key in enumerate(b.keys):
                s = raw[key]
                assert all(torch.equal(f[i], g.float()) for f, g in zip(b.feats, s.feats))
                assert np.array_equal(b.image[i].permute(1, 2, 0).numpy(), s.image)
                t = cisca_targets(s.inst_map, s.type_map, magnification="40x")
                assert np.array_equal(b.targets["classes"][i].numpy(), t.classes)
                assert np.array_equal(b.targets["directions"][i].numpy(), t.directions)
                assert np.array_equal(b.targets["weights"][i].numpy(), t.weights)
                assert np.array_equal(b.targets["inst_map"][i].numpy(), s.inst_map)


def test_stream_readers_persist_across_epochs_and_follow_set_epoch(vit):
    """Stream mode keeps its reader processes between epochs; each epoch (also after one abandoned part-way)
    is the epoch a fresh RAM loader serves for that epoch number."""
    stream = make_loader(vit, batch_size=3, memory="stream", augment="dihedral", seed=5, num_workers=2)
    ram = make_loader(vit, batch_size=3, memory="ram", augment="dihedral", seed=5, num_workers=2)
    _assert_same_batches(_epoch(stream, 1), _epoch(ram, 1))
    workers = [w.pid for w in stream._stream._iterator._workers]
    stream.set_epoch(2)
    next(iter(stream))                                   # abandoned after one batch
    for e in (2, 0):
        _assert_same_batches(_epoch(stream, e), _epoch(ram, e))
    assert [w.pid for w in stream._stream._iterator._workers] == workers
    assert _epoch(ram, 0)[0].keys != _epoch(ram, 1)[0].keys or not torch.equal(_epoch(ram, 0)[0].image,
                                                                               _epoch(ram, 1)[0].image)


def test_auto_shuffle_buffer_is_a_byte_budget(vit):
    """"auto" = decoded samples per 64 MB, 16..512, from the manifest (so every mode agrees)."""
    assert auto_shuffle_buffer(vit) == 512          # tiny test_vit samples: capped
    auto = make_loader(vit, batch_size=3, memory="ram", seed=2, num_workers=2)
    _assert_same_batches(_epoch(auto, 1), _epoch(make_loader(vit, batch_size=3, memory="ram", seed=2, num_workers=2,
                                                             shuffle_buffer=512), 1))
    giant = SimpleNamespace(manifest={"identity": {"dtype": "fp16"}, "tile_size": 256,
                                      "levels": [{"channels": 1536, "grid": [16, 16]}] * 4})   # ViT-g/14 deep
    sample = 4 * 1536 * 16 * 16 * 2 + 256 * 256 * 8
    assert auto_shuffle_buffer(giant) == (64 << 20) // sample == 18
    huge = SimpleNamespace(manifest={**giant.manifest, "levels": [{"channels": 1536, "grid": [64, 64]}] * 4})
    assert auto_shuffle_buffer(huge) == 16
    for bad in (0, -3, "big", 2.5, True):
        with pytest.raises(ValueError, match="shuffle_buffer"):
            make_loader(vit, batch_size=3, memory="stream", shuffle_buffer=bad)


def test_batch_dtypes_and_shapes(vit):
    b = next(iter(make_loader(vit, batch_size=4, memory="ram", num_workers=0)))
    assert [tuple(f.shape) for f in b.feats] == [(4, 64, 10, 10)] * 3 and b.feats[0].dtype == torch.float32
    assert b.image.shape == (4, 3, 64, 64) and b.image.dtype == torch.uint8
    t = b.targets
    assert t["classes"].dtype == t["types"].dtype == t["type_map"].dtype == torch.int64
    assert t["directions"].shape == (4, 4, 64, 64) and t["weights"].dtype == torch.float32
    assert t["inst_map"].dtype == torch.int32 and len(b.keys) == 4


def test_dihedral_transforms_levels_image_and_gt_jointly(convnext):
    raw = {s.key: s for s in convnext}
    loader = make_loader(convnext, batch_size=5, memory="ram", augment="dihedral", seed=0, num_workers=0)
    seen = set()
    for epoch in range(3):
        for b in _epoch(loader, epoch):
            for i, key in enumerate(b.keys):
                s = raw[key]
                image = b.image[i].numpy()
                hwc = s.image.transpose(2, 0, 1)
                (v,) = [v for v in range(8) if np.array_equal(_by_hand(hwc, v), image)]
                seen.add(v)
                for f, g in zip(b.feats, s.feats):  # levels of grids 40, 20, 10, 5: each turned like the tile
                    assert np.array_equal(f[i].numpy(), _by_hand(g.float().numpy(), v))
                inst = _by_hand(s.inst_map, v)
                assert np.array_equal(b.targets["inst_map"][i].numpy(), inst)
                assert np.array_equal(b.targets["type_map"][i].numpy(), _by_hand(s.type_map, v))
                t = cisca_targets(inst, _by_hand(s.type_map, v), magnification="40x")
                assert np.array_equal(b.targets["classes"][i].numpy(), t.classes)
                assert np.array_equal(b.targets["directions"][i].numpy(), t.directions)
                assert np.array_equal(b.targets["types"][i].numpy(), t.types)
                assert np.array_equal(b.targets["weights"][i].numpy(), t.weights)
    assert len(seen) >= 5 and seen & {1, 3, 5, 7}  # quarter turns included


def _dihedral_cases():
    cases = [(t.inst_map, t.type_map, mag) for mag in ("20x", "40x")
             for t in (make_synthetic_tile(7, i, size=96) for i in range(4))]
    consep = REALDATA / "consep_tiles256" / "labels.npz"
    if consep.exists():
        data = np.load(consep)
        cases += [(data["inst"][i], data["cls"][i].astype(np.uint8), "40x") for i in range(0, 432, 27)]
    return cases


def test_flipped_cisca_targets_equal_targets_of_the_flipped_maps():
    """The memo derives a variant's targets by flipping the unaugmented ones: same as recomputing them."""
    for inst, typ, mag in _dihedral_cases():
        assert dihedral_safe(check_inst_map(inst))
        base = sample_targets(inst, typ, "cisca", mag)
        for v in range(8):
            want = sample_targets(dihedral_np(inst, v), dihedral_np(typ, v), "cisca", mag)
            got = dihedral_targets(base, v)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (mag, v)


def test_diagonal_line_instance_is_recomputed_per_variant():
    """An instance on one diagonal gets -1 on that diagonal map; flipping would give +1, so the memo
    recomputes such tiles per variant and still serves exactly the recomputed targets."""
    inst = np.zeros((24, 24), np.int32)
    inst[4:12, 4:12] = 1
    inst[15, 16] = inst[16, 15] = 2                  # r + c constant, 2 rows x 2 columns
    typ = (inst > 0).astype(np.uint8)
    assert not dihedral_safe(check_inst_map(inst))
    base = sample_targets(inst, typ, "cisca", "40x")
    flipped = [v for v in range(8) if not torch.equal(dihedral_targets(base, v)["directions"],
                                                      sample_targets(dihedral_np(inst, v), typ, "cisca",
                                                                     "40x")["directions"])]
    assert flipped                                   # the check is needed
    memo = TargetMemo("cisca", "40x", 1 << 30, torch.device("cpu"))
    for v in range(8):
        want = sample_targets(dihedral_np(inst, v), dihedral_np(typ, v), "cisca", "40x")
        got = memo.get(0, v, inst, typ)
        assert all(torch.equal(got[k], want[k]) for k in want)
    safe = TargetMemo("cisca", "40x", 1 << 30, torch.device("cpu"))
    tile = make_synthetic_tile(7, 0, size=96)
    for v in range(8):
        safe.get(0, v, tile.inst_map, tile.type_map)
    assert list(safe.store) == [(0, 0)]              # only the unaugmented targets are kept


def test_non_square_grids_only_get_shape_keeping_variants():
    assert allowed_variants([(8, 8), (4, 4)]) == list(range(8))
    assert allowed_variants([(8, 8), (4, 6)]) == [0, 2, 4, 6]
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    out = dihedral_batch(x, torch.tensor([2, 4]))
    assert out.shape == x.shape
    assert np.array_equal(out[0].numpy(), _by_hand(x[0].numpy(), 2))
    assert np.array_equal(out[1].numpy(), _by_hand(x[1].numpy(), 4))


def test_seeded_order_and_augmentation(vit):
    def draw(seed, epoch):
        return _epoch(make_loader(vit, batch_size=4, memory="gpu", augment="dihedral", seed=seed, num_workers=1), epoch)

    a, b = draw(7, 0), draw(7, 0)
    _assert_same_batches(a, b)
    order = lambda run: [k for x in run for k in x.keys]
    images = lambda run: torch.cat([x.image for x in run])
    c = draw(7, 1)
    assert order(c) != order(a) or not torch.equal(images(c), images(a))
    d = draw(8, 0)
    assert order(d) != order(a) or not torch.equal(images(d), images(a))
    unshuffled = make_loader(vit, batch_size=4, memory="ram", shuffle=False, num_workers=0)
    assert order(_epoch(unshuffled)) == sorted(s.key for s in vit)


def test_other_encoder_is_refused_naming_the_difference(vit, convnext):
    check_compatible(vit, vit.manifest)
    check_compatible(vit, vit.cache_key)
    check_compatible(vit, {"encoder": vit.manifest["identity"]["encoder"], "levels": ["block_5"]})
    check_compatible(vit, {"encoder": {"encoder": "test_vit"}})
    with pytest.raises(CacheError, match=r"encoder\.encoder: test_convnext → test_vit") as err:
        check_compatible(convnext, {"encoder": vit.manifest["identity"]["encoder"], "dtype": "fp16"})
    assert str(convnext.path) in str(err.value)
    with pytest.raises(CacheError, match="cache_key"):
        check_compatible(convnext, vit.cache_key)
    with pytest.raises(CacheError, match="block_9 not cached"):
        check_compatible(vit, {"levels": ["block_9"]})
    with pytest.raises(CacheError, match="not cached"):
        make_loader(vit, batch_size=2, levels=["block_9"])


def test_stream_ddp_ranks_split_shards(vit):
    shard_of = {}
    for s_idx, path in enumerate(vit.shard_paths):
        shard_of.update({s.key: s_idx for s in vit.iter_shard(path)})
    keys = []
    for rank in (0, 1):
        loader = make_loader(vit, batch_size=3, memory="stream", rank=rank, world_size=2, num_workers=2, seed=1)
        assert len(loader) == 2
        keys.append([k for b in _epoch(loader, 2) for k in b.keys])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(shard_of)
    assert {shard_of[k] for k in keys[0]} == {0, 2} and {shard_of[k] for k in keys[1]} == {1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_names_file_and_fix(vit, tmp_path, num_workers):
    bad = tmp_path / "cache"
    shutil.copytree(vit.path, bad)
    shard = bad / vit.manifest["shards"][1]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    loader = make_loader(bad, batch_size=2, memory="stream", num_workers=num_workers)
    with pytest.raises(CacheError, match=shard.name) as err:
        list(loader)
    assert "extract" in str(err.value) and "verify" in str(err.value)
    assert "Traceback" not in str(err.value)


def test_heads_levels_and_auto(vit, raw):
    loader = make_loader(vit, batch_size=5, memory="auto", head="hovernet", levels=["block_5"], num_workers=0)
    assert loader.memory == "ram" and loader.level_names == ["block_5"]
    b = next(iter(loader))
    assert len(b.feats) == 1 and torch.equal(b.feats[0][0], raw[b.keys[0]].feats[2].float())
    h = hover_targets(raw[b.keys[0]].inst_map, raw[b.keys[0]].type_map)
    assert np.array_equal(b.targets["hv"][0].numpy(), h.hv) and np.array_equal(b.targets["nc"][0].numpy(), h.nc)
    sem = next(iter(make_loader(vit, batch_size=2, memory="ram", head="semantic", num_workers=0)))
    assert torch.equal(sem.targets["semantic"], sem.targets["type_map"])
    with pytest.raises(ValueError, match="memory"):
        make_loader(vit, batch_size=2, memory="disk")


# ---- CISCA oversampling (CISCA.md §4.3) ------------------------------------------------------------------------


def _reference_oversample(counts, multipliers, percentile):
    """The recipe as the text writes it, on numpy's global stream after ``np.random.seed(5)``."""
    totals = counts.sum(0)
    extra = [c for c in np.argsort(totals, kind="stable") if c != 0][:-1]
    n = np.sqrt(totals.sum() / totals[extra])
    n = (n / n.max() * len(counts) * np.array(multipliers)).astype(int)
    state = np.random.get_state()
    try:
        np.random.seed(5)
        rows = list(range(len(counts)))
        for c, n_c in zip(extra, n):
            w = np.clip(counts[:, c], None, np.percentile(counts[:, c], percentile))
            rows += list(np.random.choice(len(counts), n_c, p=w / w.sum()))
        np.random.shuffle(rows)
    finally:
        np.random.set_state(state)
    return extra, n, np.array(rows)


def _count_table(n_tiles=40, seed=0):
    """(n, 6) counts: background 0, class 1 commonest, then 3, 5, 4, 2 from commonest to rarest."""
    rng = np.random.default_rng(seed)
    lam = np.array([0.0, 12.0, 0.2, 4.0, 0.8, 2.0])
    return rng.poisson(lam, size=(n_tiles, 6))


def test_oversample_extra_classes_and_draw_counts():
    counts = _count_table()
    totals = counts.sum(0)
    assert totals[0] == 0 and np.argmax(totals) == 1
    out = cisca_oversample(counts, "cisca-pannuke")
    assert out.classes.tolist() == [2, 4, 5, 3]  # rarest → commonest; neither background nor class 1
    assert list(extra_classes(counts)) == [2, 4, 5, 3]
    n = len(counts)
    assert out.n_draws[0] == n  # the rarest extra class gets N_train (multiplier 1)
    expected = [int(n * np.sqrt(totals[2] / totals[c])) for c in (2, 4, 5, 3)]
    assert out.n_draws.tolist() == expected and expected == sorted(expected, reverse=True)
    assert len(out.indices) == n + sum(expected)
    copies = np.bincount(out.indices, minlength=n)
    assert copies.min() >= 1  # every tile kept once
    drawn = copies - 1
    extra_counts = counts[:, [2, 3, 4, 5]].sum(1)
    assert not drawn[extra_counts == 0].any()  # a tile with no instance of an extra class is never drawn
    # CoNIC: six classes, the two rarest get 1.6 N_train before truncation, the others 0.9 of their share
    conic = np.concatenate([counts, np.random.default_rng(2).poisson(0.5, (n, 1))], axis=1)
    out = cisca_oversample(conic, "cisca-conic")
    t = conic.sum(0)
    share = np.sqrt(t[out.classes[0]] / t[out.classes])
    assert out.n_draws.tolist() == (share * n * np.array([1.6, 1.6, 0.9, 0.9, 0.9])).astype(int).tolist()
    assert out.n_draws[0] == int(1.6 * n) and len(out.classes) == 5 and 1 not in out.classes


def test_oversample_matches_the_recipe_on_np_random_seed_5():
    for scheme, counts in (("cisca-pannuke", _count_table(seed=3)),
                           ("cisca-conic", _count_table(30, seed=4)[:, [0, 1, 2, 3, 4, 5, 3]])):
        mult, pct = OVERSAMPLE_SCHEMES[scheme]
        extra, n, rows = _reference_oversample(counts, mult, pct)
        out = cisca_oversample(counts, scheme)
        assert out.classes.tolist() == list(extra) and out.n_draws.tolist() == n.tolist()
        assert np.array_equal(out.indices, rows)


def test_oversample_clips_counts_at_the_percentile():
    n = 100
    counts = np.zeros((n, 4), np.int64)
    counts[:, 1] = 50  # the commonest class (5000)
    counts[:, 3] = 1  # the rarest (100)
    counts[60:, 2] = 1
    counts[0, 2] = 1000  # class 2 (1040): one outlier tile would take 96 % of the class's draws unclipped
    out = cisca_oversample(counts, OversampleScheme((1.0, 1.0), 98.5))
    assert out.classes.tolist() == [3, 2] and out.n_draws.tolist() == [100, int(100 * np.sqrt(100 / 1040))]
    # sorted class-2 counts: 59 zeros, 40 ones, 1000; the 98.5th percentile (position 97.5) is 1, so the
    # outlier weighs like each of the 40 other tiles holding class 2: about 31/41 + 100/100 copies expected
    assert np.percentile(counts[:, 2], 98.5) == 1
    assert np.bincount(out.indices, minlength=n)[0] - 1 < 8
    unclipped = cisca_oversample(counts, OversampleScheme((1.0, 1.0), 100.0))
    assert np.bincount(unclipped.indices, minlength=n)[0] - 1 > 0.8 * unclipped.n_draws[1]


def test_oversample_is_deterministic_and_validates():
    counts = _count_table()
    a, b = cisca_oversample(counts, "cisca-pannuke"), cisca_oversample(counts, "cisca-pannuke")
    assert np.array_equal(a.indices, b.indices)
    c = cisca_oversample(counts, "cisca-pannuke", seed=6)
    assert not np.array_equal(a.indices, c.indices) and np.array_equal(a.n_draws, c.n_draws)
    with pytest.raises(ValueError, match="4 multipliers"):
        cisca_oversample(counts[:, :5], "cisca-pannuke")
    with pytest.raises(ValueError, match="valid: cisca-pannuke, cisca-conic"):
        cisca_oversample(counts, "cisca-monuseg")
    absent = counts.copy()
    absent[:, 2] = 0
    with pytest.raises(ValueError, match=r"classes \[2\] have no instance"):
        cisca_oversample(absent, "cisca-pannuke")
    with pytest.raises(ValueError, match="non-negative integers"):
        cisca_oversample(counts - 1, "cisca-pannuke")


def test_instance_class_is_the_max_type_over_its_pixels():
    inst = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [3, 0, 0, 0], [9, 9, 0, 0]], np.int32)
    typ = np.array([[0, 2, 0, 1], [3, 1, 0, 1], [0, 0, 0, 0], [4, 4, 0, 0]], np.uint8)
    assert instance_class_counts(inst, typ, 4).tolist() == [1, 1, 0, 1, 1]  # ids 3 / 2 / 1 / 9
    assert instance_class_counts(np.zeros((4, 4), np.int32), typ, 4).tolist() == [0] * 5


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    out = tmp_path_factory.mktemp("typed") / "cache"
    extract(ExtractConfig(dataset="synthetic", out=str(out), encoder="test_vit", weights="random", device="cpu",
                          num_workers=0, shard_size=4, batch_size=4,
                          dataset_options={"n_tiles": 12, "seed": 0, "size": 64, "n_types": 5}))
    return open_cache(out)


def test_oversampled_loader_serves_the_list_in_every_mode(typed):
    raw = list(typed)
    k = len(typed.manifest["class_names"]) - 1
    runs, loaders = {}, {}
    for mode in ("stream", "ram", "gpu"):
        loaders[mode] = make_loader(typed, batch_size=5, memory=mode, augment="dihedral", seed=2, num_workers=2,
                                    oversample="cisca-pannuke")
        runs[mode] = _epoch(loaders[mode], 1)
    _assert_same_batches(runs["stream"], runs["ram"])
    _assert_same_batches(runs["stream"], runs["gpu"])
    loader = loaders["stream"]
    expected = np.stack([instance_class_counts(s.inst_map, s.type_map, k) for s in raw])
    assert np.array_equal(loader.class_counts, expected)
    plan = cisca_oversample(expected, "cisca-pannuke")
    assert np.array_equal(loader.oversampled.indices, plan.indices) and len(plan.indices) > 2 * len(raw)
    served = sorted(k for b in runs["stream"] for k in b.keys)
    assert served == sorted(raw[i].key for i in plan.indices)  # duplicates included
    assert loader.n_samples == len(plan.indices) and len(loader) == -(-len(plan.indices) // 5)
    assert [len(b.keys) for b in runs["stream"]] == [5] * (len(loader) - 1) + [len(plan.indices) % 5 or 5]
    other = [k for b in _epoch(loader, 2) for k in b.keys]
    assert sorted(other) == served and other != [k for b in runs["stream"] for k in b.keys]
    dup = {k for k in served if served.count(k) > 1}  # copies of one tile get their own dihedral variants
    images = {}
    for b in runs["ram"]:
        for i, key in enumerate(b.keys):
            images.setdefault(key, set()).add(b.image[i].numpy().tobytes())
    assert any(len(images[key]) > 1 for key in dup)


def test_oversampled_loader_ranks_unshuffled_and_refusals(typed, tmp_path):
    raw = list(typed)
    loaders = [make_loader(typed, batch_size=4, memory="stream", rank=r, world_size=2, num_workers=1,
                           oversample="cisca-pannuke", drop_last=True) for r in (0, 1)]
    reps = np.bincount(loaders[0].oversampled.indices)
    for r, loader in enumerate(loaders):  # 3 shards of 4 tiles: rank 0 owns shards 0 and 2, rank 1 shard 1
        mine = [i for s in range(r, 3, 2) for i in range(4 * s, 4 * s + 4)]
        assert loader.n_samples == reps[mine].sum() and loader.n_tiles == len(mine)
        assert len(loader) == min(x.n_samples for x in loaders) // 4
        keys = [k for b in _epoch(loader, 0) for k in b.keys]
        assert len(keys) == 4 * len(loader)
        assert Counter(keys) <= Counter({raw[i].key: int(reps[i]) for i in mine})
    plain = make_loader(typed, batch_size=4, memory="ram", shuffle=False, num_workers=0, oversample="cisca-pannuke")
    assert [k for b in _epoch(plain) for k in b.keys] == [raw[i].key for i in np.repeat(np.arange(12), reps)]
    with pytest.raises(ValueError, match=r"oversample='cisca-conic'.*5 multipliers.*background, epithelial"):
        make_loader(typed, batch_size=2, oversample="cisca-conic")
    with pytest.raises(ValueError, match="valid: none, cisca-pannuke, cisca-conic"):
        make_loader(typed, batch_size=2, oversample="balanced")
    bad = tmp_path / "cache"
    shutil.copytree(typed.path, bad)
    shard = bad / typed.manifest["shards"][2]["name"]
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(CacheError, match=shard.name):
        make_loader(bad, batch_size=2, memory="stream", oversample="cisca-pannuke")


def test_undo_dihedral_maps_brings_variant_targets_back():
    """Test-time augmentation's inverse: the targets of a flipped / turned tile, undone, are the tile's own
    (CISCA exactly; HoVer-Net's maps up to its rounded centres); the wrong sign would be far off."""
    from cellembed.cache._augment import dihedral_inverse, undo_dihedral_maps

    for inst, typ, mag in _dihedral_cases()[:3]:
        base = sample_targets(inst, typ, "cisca", mag)
        hv = hover_targets(inst, typ).hv
        for v in range(8):
            assert torch.equal(dihedral_inverse(dihedral_batch(base["classes"][None], torch.tensor([v])), v)[0],
                               base["classes"])
            t = sample_targets(dihedral_np(inst, v), dihedral_np(typ, v), "cisca", mag)
            back = undo_dihedral_maps({"directions": t["directions"][None], "types": t["types"][None, None]}, v)
            assert torch.equal(back["directions"][0], base["directions"]), (mag, v)
            assert torch.equal(back["types"][0, 0], base["types"])
            h = torch.from_numpy(hover_targets(dihedral_np(inst, v), dihedral_np(typ, v)).hv)[None]
            err = np.abs(undo_dihedral_maps({"hv": h}, v)["hv"][0].numpy() - hv).mean()
            naive = np.abs(dihedral_inverse(h, v)[0].numpy() - hv).mean()  # un-rotated, channels left as they are
            assert err < 0.05 and (v == 0 or err < 0.3 * naive), (mag, v, err, naive)


def test_decoder_maps_tta_averages_back_in_the_tile_frame():
    """A fake decoder that outputs the exact CISCA targets of the (transformed) instance map it is given:
    every variant's maps, undone, agree, so the TTA average equals the plain prediction."""
    from cellembed.evaluate._predict import decoder_maps

    inst, typ, _ = _dihedral_cases()[0]

    class Exact(torch.nn.Module):
        head, image_skip = "cisca", True

        def forward(self, feats, image):
            outs = [sample_targets(m.numpy().astype(np.int32), (m.numpy() > 0).astype(np.uint8), "cisca", "20x")
                    for m in image[:, 0]]
            logits = lambda key, k: torch.stack([torch.nn.functional.one_hot(o[key].long(), k).permute(2, 0, 1)
                                                 for o in outs]).float() * 10
            return {"classes": logits("classes", 3), "directions": torch.stack([o["directions"] for o in outs]),
                    "types": logits("types", 2)}

    image = torch.from_numpy(inst.astype(np.float32))[None, None].repeat(1, 3, 1, 1)
    batch = SimpleNamespace(feats=[torch.randn(1, 4, 8, 8)], image=image)
    _, plain = decoder_maps(Exact(), batch, torch.device("cpu"))
    _, avg = decoder_maps(Exact(), batch, torch.device("cpu"), tta=True)
    assert plain.keys() == avg.keys() and all(np.allclose(plain[k], avg[k], atol=1e-5) for k in plain)
    assert np.abs(plain["directions"]).max() > 0.5


def test_cache_at_a_pipe_url_reads_like_the_directory(tmp_path):
    """A cache given as a location WebDataset opens (here ``pipe:cat DIR/{}``): manifest and shards are read
    through the command; samples, loaders, fit-decoder, score and info behave as with the directory."""
    from typer.testing import CliRunner

    from cellembed.cache import ExtractConfig, extract
    from cellembed.cli import app
    from cellembed.evaluate import score_run
    from cellembed.train import FitConfig, fit_decoder

    for name, seed in (("cache", 2), ("val", 3)):
        extract(ExtractConfig(dataset="synthetic", out=str(tmp_path / name), encoder="test_vit", weights="random",
                              device="cpu", num_workers=0, shard_size=3, batch_size=4,
                              dataset_options={"n_tiles": 7, "seed": seed, "size": 64}))
    local, url, val = tmp_path / "cache", f"pipe:cat {tmp_path}/cache/{{}}", f"pipe:cat {tmp_path}/val/{{}}"
    a, b = open_cache(local), open_cache(url)
    assert b.remote and b.manifest == a.manifest and len(b.shard_paths) == 3
    for x, y in zip(a, b):
        assert x.key == y.key and all(torch.equal(f, g) for f, g in zip(x.feats, y.feats))
        assert np.array_equal(x.inst_map, y.inst_map)
    for memory in ("stream", "ram"):
        for batch_a, batch_b in zip(make_loader(a, batch_size=4, memory=memory, num_workers=1, shuffle=False),
                                    make_loader(url, batch_size=4, memory=memory, num_workers=1, shuffle=False)):
            assert batch_a.keys == batch_b.keys and torch.equal(batch_a.feats[0], batch_b.feats[0])
    fit = fit_decoder(FitConfig(out=str(tmp_path / "run"), cache=url, val_cache=val, epochs=1, batch_size=4,
                                device="cpu", num_workers=0, lr=1e-3))
    scores = score_run(fit.run_dir, val, device="cpu", num_workers=0, n_overlays=0)
    assert scores.out.name == "score-val" and 0.0 <= scores.metrics["summary"]["pq"] <= 1.0
    info = CliRunner().invoke(app, ["info", url])
    assert info.exit_code == 0 and a.cache_key in info.output
    assert CliRunner().invoke(app, ["verify", url]).exit_code == 0
    shard = sorted(local.glob("shard-*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:400])
    bad = CliRunner().invoke(app, ["verify", url])
    assert bad.exit_code == 1 and "truncated" in bad.output and shard.name in bad.output
    missing = CliRunner().invoke(app, ["info", f"pipe:cat {tmp_path}/nowhere/{{}}"])
    assert missing.exit_code == 2 and "cannot read the cache's manifest" in missing.output
    assert "Traceback" not in missing.output
