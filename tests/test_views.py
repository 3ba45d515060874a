"""extract --augment-views: K augmented copies per training tile, one view per tile per epoch in the loader."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from cellembed.cache import CacheError, ExtractConfig, extract, make_loader, open_cache
from cellembed.cache._loader import cache_views
from cellembed.data import open_dataset
from cellembed.data._augment import VIEW_SEP, AugmentedViews, augment_tile, tile_rng
from cellembed.train import FitConfig, fit_decoder

SYNTH = {"n_tiles": 12, "seed": 0, "size": 64, "n_types": 5}


def _extract(out, **kw):
    cfg = dict(dataset="synthetic", out=str(out), encoder="test_vit", weights="random", device="cpu", num_workers=0,
               shard_size=4, batch_size=4, dataset_options=SYNTH)
    extract(ExtractConfig(**{**cfg, **kw}))
    return open_cache(out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    return (_extract(root / "views", split="all", augment_views=2),
            _extract(root / "plain", split="all"), _extract(root / "val", split="val"))


def test_views_are_stored_after_each_tile_with_whole_tiles_per_shard(caches):
    views, plain, _ = caches
    ident = views.manifest["identity"]
    assert ident["augment_views"] == {"copies": 2, "views": 3, "augment": "cisca-full", "seed": 0}
    assert cache_views(views) == 3 and cache_views(plain) == 1 and "augment_views" not in plain.manifest["identity"]
    assert views.cache_key != plain.cache_key and ident["shard_size"] == 6  # 4 rounded up to a multiple of 3
    assert all(s["n_samples"] % 3 == 0 for s in views.manifest["shards"])
    base = [s.key for s in plain]
    keys = [s.key for s in views]
    assert keys == [k if v == 0 else f"{k}{VIEW_SEP}{v}" for k in base for v in range(3)]
    by_key = {s.key: s for s in views}
    source = open_dataset("synthetic", **SYNTH)
    for s in plain:  # view 0 is the tile; view v is augment_tile drawn from (seed 0, v, source index)
        assert np.array_equal(by_key[s.key].image, s.image)
        assert all(torch.equal(a, b) for a, b in zip(by_key[s.key].feats, s.feats))
        i = source.keys.index(s.key)
        tile = source[i]
        image, inst, _ = augment_tile(tile.image, tile.inst_map, tile.type_map, tile_rng(0, 2, i))
        view = by_key[f"{s.key}{VIEW_SEP}2"]
        assert np.array_equal(view.image, image) and view.inst_map.max() == len(np.unique(inst)) - 1
    assert sum(not np.array_equal(by_key[k].image, by_key[f"{k}{VIEW_SEP}1"].image) for k in base) >= len(base) - 2


@pytest.mark.parametrize("oversample", ["none", "cisca-pannuke"])
def test_loader_serves_one_view_per_tile_per_epoch_in_every_mode(caches, oversample):
    views, plain, _ = caches
    base = [s.key for s in plain]
    loaders = {m: make_loader(views, batch_size=4, memory=m, augment="dihedral", seed=1, num_workers=2,
                              oversample=oversample) for m in ("stream", "ram")}
    ref = make_loader(plain, batch_size=4, memory="ram", seed=1, num_workers=0, oversample=oversample)
    assert loaders["stream"].n_samples == ref.n_samples and len(loaders["ram"]) == len(ref)
    picked = []
    for epoch in (0, 1, 2):
        served = {}
        for mode, loader in loaders.items():
            loader.set_epoch(epoch)
            served[mode] = [k for b in loader for k in b.keys]
        assert served["stream"] == served["ram"]
        tiles = Counter(k.split(VIEW_SEP)[0] for k in served["ram"])
        ref.set_epoch(epoch)
        assert tiles == Counter(k for b in ref for k in b.keys)  # each tile as often as without views
        chosen = {k.split(VIEW_SEP)[0]: k for k in served["ram"]}
        assert all(k == chosen[k.split(VIEW_SEP)[0]] for k in served["ram"])  # one view per tile per epoch
        picked.append(chosen)
    assert len({tuple(sorted(p.values())) for p in picked}) > 1  # the views drawn change with the epoch
    assert {k for p in picked for k in p.values()} - set(base)


def test_views_refused_for_evaluation_and_for_val_splits(caches, tmp_path):
    views, _, val = caches
    with pytest.raises(ValueError, match=r"--augment-views 2 with --split val.*extract validation and test"):
        _extract(tmp_path / "bad", split="val", augment_views=2)
    with pytest.raises(CacheError, match=r"validation cache .*augmented copies.*without --augment-views"):
        fit_decoder(FitConfig(cache=str(val.path), val_cache=str(views.path), out=str(tmp_path / "run"), epochs=1,
                              device="cpu", num_workers=0, batch_size=4))


def test_fit_on_a_views_cache_trains_and_records_the_views(caches, tmp_path):
    views, _, val = caches
    fit = fit_decoder(FitConfig(cache=str(views.path), val_cache=str(val.path), out=str(tmp_path / "run"), epochs=2,
                                device="cpu", num_workers=0, batch_size=4, decoder="light"))
    assert fit.best is not None and np.isfinite(fit.best["value"])
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["identity"]["augment_views"]["views"] == 3


def test_augmented_views_source_validates():
    source = open_dataset("synthetic", n_tiles=2, size=32)
    with pytest.raises(ValueError, match="views must be at least 1"):
        AugmentedViews(source, [0], views=0)
    one = AugmentedViews(source, [1], views=1)
    assert one.keys == [source.keys[1]] and np.array_equal(one[0].image, source[1].image)


def test_cli_extract_augment_views(tmp_path):
    from typer.testing import CliRunner

    from cellembed.cli import app

    out = tmp_path / "cache"
    args = ["extract", "--dataset", "synthetic", "--out", str(out), "--encoder", "test_vit", "--weights", "random",
            "--device", "cpu", "--workers", "0", "--split", "train", "--augment-views", "1", "-o", "n_tiles=6",
            "-o", "size=64"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cache = open_cache(out)
    assert cache_views(cache) == 2 and len(cache) % 2 == 0
    bad = CliRunner().invoke(app, [*args[:-8], "--split", "test", "--augment-views", "1", "--overwrite"])
    assert bad.exit_code != 0 and "augmented copies are for training caches" in bad.output
