"""The training-time cache reader: memory modes, dihedral augmentation, refusal, DDP split, corrupt shards."""

import shutil

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
from cellembed.cache._augment import allowed_variants, dihedral_batch
from cellembed.targets import cisca_targets, hover_targets


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
