"""The live source: interface, seeding, image-space augmentation (alignment, dtypes), equality with the cache."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from cellembed.cache import ExtractConfig, check_compatible, extract, open_cache
from cellembed.cache._augment import dihedral_np, sample_targets
from cellembed.data import _augment as A
from cellembed.data import make_synthetic_tile, synthetic_class_names
from cellembed.encoders import build_encoder
from cellembed.train._live import make_live_loader

DS = {"n_tiles": 10, "seed": 0, "size": 64}


@pytest.fixture(scope="module")
def vit():
    return build_encoder("test_vit", weights="random", input_policy="native-grid", tile_size=64)  # 4×4 tokens


def _live(encoder, **kw):
    opts = {"split": "all", "dataset_options": DS, "batch_size": 4, "num_workers": 0, "device": "cpu", "seed": 0}
    return make_live_loader("synthetic", None, encoder, **{**opts, **kw})


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        x.keys == y.keys and torch.equal(x.image, y.image) and all(torch.equal(a, b) for a, b in zip(x.feats, y.feats))
        and x.targets.keys() == y.targets.keys() and all(torch.equal(x.targets[k], y.targets[k]) for k in x.targets)
        for x, y in zip(xs, ys))


def test_interface_shapes_and_dtypes(vit):
    loader = _live(vit, split="train", augment="full")
    n = len(loader.keys)
    assert len(loader) == -(-n // 4) and loader.n_samples == n < 10
    assert loader.level_names == ["block_1", "block_3", "block_5"] and loader.tile_size == 64
    assert loader.levels[0] == {"name": "block_1", "block": 1, "channels": 64, "grid": [4, 4], "stride": 16.0}
    assert loader.class_names == list(synthetic_class_names(4))
    assert loader.identity["encoder"] == vit.describe() and loader.identity["split"]["split"] == "train"
    batches = _epoch(loader)
    assert sorted(k for b in batches for k in b.keys) == sorted(loader.keys)
    b = batches[0]
    assert [tuple(f.shape) for f in b.feats] == [(4, 64, 4, 4)] * 3 and b.feats[0].dtype == torch.float32
    assert b.image.shape == (4, 3, 64, 64) and b.image.dtype == torch.uint8
    t = b.targets
    assert t["classes"].dtype == t["types"].dtype == t["type_map"].dtype == torch.int64
    assert t["directions"].shape == (4, 4, 64, 64) and t["weights"].dtype == torch.float32
    assert t["inst_map"].dtype == torch.int32 and t["inst_map"].shape == (4, 64, 64)
    conv = torch.nn.Conv2d(64, 2, 1)  # features are normal tensors: a decoder can backpropagate through them
    conv(b.feats[0]).sum().backward()
    assert conv.weight.grad is not None


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_unaugmented_features_equal_the_cache(tmp_path, dtype):
    same = {"weights": "random", "input_policy": "native-grid", "dtype": dtype, "dataset_options": DS}
    extract(ExtractConfig(dataset="synthetic", out=str(tmp_path / "c"), encoder="test_vit", device="cpu",
                          num_workers=0, shard_size=4, batch_size=4, **same))
    cache = open_cache(tmp_path / "c")
    live = _live("test_vit", augment="none", shuffle=False, batch_size=3, **same)
    check_compatible(cache, live.identity)  # every identity field extract records, bar shard_size, agrees
    base = [{k: lv[k] for k in ("name", "block", "channels", "grid", "stride")} for lv in cache.manifest["levels"]]
    assert live.levels == base and live.class_names == cache.manifest["class_names"]  # (no feature statistics)
    assert live.tile_size == cache.manifest["tile_size"]
    raw = {s.key: s for s in cache}
    batches = _epoch(live)
    assert [k for b in batches for k in b.keys] == [s.key for s in cache]
    tol = {"fp32": 1e-5, "fp16": 2e-3}[dtype]
    for b in batches:
        for i, key in enumerate(b.keys):
            s = raw[key]
            for f, g in zip(b.feats, s.feats):
                assert torch.allclose(f[i], g.float(), rtol=tol, atol=tol)
            assert np.array_equal(b.image[i].permute(1, 2, 0).numpy(), s.image)
            assert np.array_equal(b.targets["inst_map"][i].numpy(), s.inst_map)
            assert np.array_equal(b.targets["type_map"][i].numpy(), s.type_map)


def test_same_seed_same_batches_whatever_the_workers(vit):
    serial = _live(vit, augment="full", seed=5, num_workers=0)
    parallel = _live(vit, augment="full", seed=5, num_workers=2)
    a, b = _epoch(serial, 1), _epoch(serial, 2)
    assert _same(a, _epoch(parallel, 1))
    assert _same(b, _epoch(parallel, 2))  # persistent workers pick up the new epoch
    images = lambda run: {k: x.image[i] for x in run for i, k in enumerate(x.keys)}
    first, other_epoch = images(a), images(b)
    other_seed = images(_epoch(_live(vit, augment="full", seed=6), 1))
    assert sum(not torch.equal(first[k], other_epoch[k]) for k in first) >= 8
    assert sum(not torch.equal(first[k], other_seed[k]) for k in first) >= 8
    assert [k for x in a for k in x.keys] != [k for x in b for k in x.keys]  # reshuffled
    unshuffled = _live(vit, augment="none", shuffle=False)
    assert [k for x in _epoch(unshuffled, 3) for k in x.keys] == unshuffled.keys


@pytest.mark.parametrize("head", ["cisca", "hovernet", "semantic"])
def test_targets_are_those_of_the_augmented_maps(vit, head):
    b = next(iter(_live(vit, augment="full", head=head, seed=1, batch_size=5)))
    for i in range(5):
        inst, types = b.targets["inst_map"][i].numpy(), b.targets["type_map"][i].numpy().astype(np.uint8)
        assert np.all(types[inst == 0] == 0)
        assert set(np.unique(inst)) == set(range(inst.max() + 1))  # ids contiguous
        for name, value in sample_targets(inst, types, head, "40x").items():
            assert np.array_equal(b.targets[name][i].numpy(), value.numpy()), name


def test_dihedral_moves_image_and_maps_together(vit):
    raw = {f"synth_0_{i:05d}": make_synthetic_tile(0, i, size=64) for i in range(10)}
    seen = set()
    for b in _epoch(_live(vit, augment="dihedral", seed=2, batch_size=10)):
        for i, key in enumerate(b.keys):
            t = raw[key]
            chw = t.image.transpose(2, 0, 1)
            (v,) = [v for v in range(8) if np.array_equal(dihedral_np(chw, v), b.image[i].numpy())]
            seen.add(v)
            assert np.array_equal(b.targets["inst_map"][i].numpy(), dihedral_np(t.inst_map, v))
            assert np.array_equal(b.targets["type_map"][i].numpy(), dihedral_np(t.type_map, v))
    assert len(seen) >= 4


def test_geometric_steps_keep_image_and_maps_aligned():
    """Image channels hold the maps; after rot90/flip/elastic (nearest) they must still equal the moved maps."""
    t = make_synthetic_tile(3, 0, size=64)
    assert t.inst_map.max() < 256
    image = np.stack([t.inst_map.astype(np.uint8), t.type_map * 50, np.zeros_like(t.type_map)], -1)
    config = A.AugmentConfig(p=1.0, stain=0, blur=0, contrast=0, colour=0, noise=0, elastic_image_order=0)
    moved = deformed = 0
    for seed in range(16):
        img, inst, types = A.augment_tile(image, t.inst_map, t.type_map, np.random.default_rng(seed), config)
        assert img.dtype == np.uint8 and inst.dtype == np.int32 and types.dtype == np.uint8
        assert img.shape == (64, 64, 3) and inst.shape == types.shape == (64, 64)
        assert np.array_equal(img[..., 1], types * 50) and np.all(types[inst == 0] == 0)
        assert np.array_equal(A.relabel(img[..., 0]), inst)  # ids: the surviving ones, relabelled in order
        moved += not np.array_equal(inst, t.inst_map)
        deformed += not any(np.array_equal(np.rot90(inst, k), t.inst_map) or
                            np.array_equal(np.rot90(inst[::-1], k), t.inst_map) for k in range(4))
    assert moved >= 12 and deformed >= 6


def test_flip_codes_and_dihedral_convention():
    a = np.arange(12).reshape(3, 4)
    assert np.array_equal(A.flip([a], 0)[0], a[::-1]) and np.array_equal(A.flip([a], 1)[0], a[:, ::-1])
    assert np.array_equal(A.flip([a], -1)[0], a[::-1, ::-1])
    t = make_synthetic_tile(0, 1, size=64)
    for seed in range(8):
        img, inst, types = A.dihedral_tile(t.image, t.inst_map, t.type_map, np.random.default_rng(seed))
        v = int(np.random.default_rng(seed).integers(8))
        assert np.array_equal(img.transpose(2, 0, 1), dihedral_np(t.image.transpose(2, 0, 1), v))
        assert np.array_equal(inst, dihedral_np(t.inst_map, v)) and np.array_equal(types, dihedral_np(t.type_map, v))


def test_elastic_field_and_warp():
    rng = np.random.default_rng(0)
    f = A.elastic_field((64, 48), rng, grid=5, max_px=10.0)
    assert f.shape == (2, 64, 48) and f.dtype == np.float32 and np.abs(f).max() <= 10.0
    assert f[0, 0].min() >= 0 and f[0, -1].max() <= 0 and f[1, :, 0].min() >= 0 and f[1, :, -1].max() <= 0
    t = make_synthetic_tile(1, 0, size=64)
    same = A.warp(t.image, t.inst_map, t.type_map, np.zeros((2, 64, 64), np.float32))
    assert all(np.array_equal(x, y) for x, y in zip(same, (t.image, t.inst_map, t.type_map)))
    shift = np.zeros((2, 64, 64), np.float32)
    shift[0] = 3  # sample three rows down, the last rows repeat the edge
    img, inst, types = A.warp(t.image, t.inst_map, t.type_map, shift)
    rows = np.minimum(np.arange(64) + 3, 63)
    assert np.array_equal(img, t.image[rows]) and np.array_equal(types, t.type_map[rows])
    assert np.array_equal(inst, A.relabel(t.inst_map[rows]))
    img, inst, types = A.warp(t.image, t.inst_map, t.type_map, A.elastic_field((64, 64), rng))
    assert inst.max() <= t.inst_map.max() and set(np.unique(inst)) == set(range(inst.max() + 1))
    for i in range(1, inst.max() + 1):  # every instance keeps one type
        assert len(np.unique(types[inst == i])) == 1
    assert np.all(types[inst == 0] == 0)


def test_photometric_steps_keep_shape_dtype_and_maps():
    t = make_synthetic_tile(0, 2, size=64)
    for fn in A.BLUR_NOISE + A.CONTRAST + A.COLOUR + (A.stain_jitter,):
        out = fn(t.image, np.random.default_rng(1))
        assert out.dtype == np.uint8 and out.shape == t.image.shape, fn.__name__
        assert not np.array_equal(out, t.image), fn.__name__
    full = A.augment_tile(t.image, t.inst_map, t.type_map, A.tile_rng(0, 0, 2))
    assert all(np.array_equal(x, y) for x, y in zip(full, A.augment_tile(t.image, t.inst_map, t.type_map,
                                                                           A.tile_rng(0, 0, 2))))
    off = A.augment_tile(t.image, t.inst_map, t.type_map, np.random.default_rng(0), A.AugmentConfig(p=0.0))
    assert all(x is y for x, y in zip(off, (t.image, t.inst_map, t.type_map)))


def test_colour_spaces_median_and_clahe_against_references():
    from skimage import color

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.abs(A.rgb_to_lab(image) - color.rgb2lab(image)).max() < 1e-3
    assert np.array_equal(A.lab_to_rgb(A.rgb_to_lab(image)), image)
    assert np.array_equal(A.hsv_to_rgb(*A.rgb_to_hsv(image)), image)
    assert np.allclose(np.stack(A.rgb_to_hsv(image), -1), color.rgb2hsv(image), atol=1e-6)
    assert np.array_equal(A.median3(image, None), ndimage.median_filter(image, size=(3, 3, 1), mode="reflect"))
    grey = image[..., 0]
    cdf = np.cumsum(np.bincount(grey.ravel(), minlength=256))
    assert np.array_equal(A.clahe(grey, np.inf, tiles=(1, 1)), np.rint(cdf * 255 / grey.size)[grey].astype(np.uint8))
    flat = np.full((32, 32), 90, np.uint8)  # a uniform tile keeps one value everywhere
    assert len(np.unique(A.clahe(flat, 1.0, tiles=(4, 4)))) == 1


def test_levels_subset_shared_encoder_and_bad_options(vit):
    full = next(iter(_live(vit, augment="none", shuffle=False)))
    deep = next(iter(_live(vit, augment="none", shuffle=False, levels=["block_5"])))
    assert len(deep.feats) == 1 and torch.equal(deep.feats[0], full.feats[2])
    with pytest.raises(ValueError, match="block_9"):
        _live(vit, levels=["block_9"])
    with pytest.raises(ValueError, match="valid: none, dihedral, full"):
        _live(vit, augment="flips")
    with pytest.raises(ValueError, match="unknown head"):
        _live(vit, head="unet")
    with pytest.raises(ValueError, match="64"):
        _live(build_encoder("test_vit", weights="random", input_policy="native-grid", tile_size=32))
