"""Stage one end to end: extract → shards + manifest, resume, refusal, verify, ranks."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cellembed.cache import CacheError, ExtractConfig, extract, open_cache, read_manifest, verify_cache
from cellembed.data import open_dataset

N_TILES = 10


def config(out, **kw) -> ExtractConfig:
    base = dict(dataset="synthetic", out=str(out), encoder="test_vit", weights="random", blocks="default",
                batch_size=3, num_workers=0, shard_size=4, device="cpu",
                dataset_options={"n_tiles": N_TILES, "seed": 3, "size": 64})
    base.update(kw)
    return ExtractConfig(**base)


def manifest_without_names(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    for s in m["shards"]:
        s.pop("name")
    return m


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One complete single-process cache shared by several tests (read-only)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    result = extract(config(out))
    return out, result


def test_extract_writes_cache_contract(reference):
    out, result = reference
    manifest = read_manifest(out)
    assert result.n_tiles == N_TILES and result.n_written == N_TILES and result.n_skipped == 0
    assert manifest["n_samples"] == N_TILES
    assert [s["n_samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-00-000000.tar", "shard-00-000001.tar",
                                                               "shard-00-000002.tar"]
    assert not list(out.glob(".*.tmp"))
    for level in manifest["levels"]:
        assert len(level["mean"]) == level["channels"] == len(level["std"])
        assert all(s > 0 for s in level["std"])
    assert manifest["identity"]["encoder"]["encoder"] == "test_vit"
    assert len(manifest["cache_key"]) == 24


def test_samples_round_trip_ground_truth_and_features(reference):
    out, _ = reference
    cache = open_cache(out)
    source = open_dataset("synthetic", None, n_tiles=N_TILES, seed=3, size=64)
    samples = list(cache)
    assert [s.key for s in samples] == source.keys
    for sample in samples:
        tile = source[source.keys.index(sample.key)]
        np.testing.assert_array_equal(sample.image, tile.image)
        np.testing.assert_array_equal(sample.inst_map, tile.inst_map)
        np.testing.assert_array_equal(sample.type_map, tile.type_map)
        assert sample.inst_map.dtype == np.int32 and sample.type_map.dtype == np.uint8
        for feat, level in zip(sample.feats, cache.manifest["levels"]):
            assert feat.dtype == torch.float16
            assert tuple(feat.shape) == (level["channels"], *level["grid"])
        assert sample.prefix is not None and sample.prefix[0].shape[0] == cache.manifest["num_prefix_tokens"]


def test_channel_statistics_match_features(reference):
    out, _ = reference
    cache = open_cache(out)
    first = torch.stack([s.feats[0].double() for s in cache])  # (N, C, h, w)
    mean = first.mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(cache.manifest["levels"][0]["mean"], mean, atol=1e-5)


def test_features_match_a_direct_encoder_forward(reference):
    from cellembed.encoders import build_encoder

    out, _ = reference
    cache = open_cache(out)
    sample = next(iter(cache))
    enc = build_encoder("test_vit", weights="random", tile_size=64)
    with torch.inference_mode():
        feats = enc(torch.from_numpy(sample.image.copy()).permute(2, 0, 1)[None]).feats
    for cached, direct in zip(sample.feats, feats):
        torch.testing.assert_close(cached.float(), direct[0].half().float(), atol=1e-3, rtol=1e-3)


def interrupted_extract(out) -> None:
    """An extraction into ``out`` stopped by a KeyboardInterrupt after 5 tiles."""

    def stop_after_five(done, total, nbytes):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(config(out), progress=stop_after_five)


def test_rerun_skips_everything_and_reproduces_manifest(reference, tmp_path):
    out, _ = reference
    again = extract(config(tmp_path / "c"))
    assert manifest_without_names(read_manifest(tmp_path / "c")) == manifest_without_names(read_manifest(out))
    rerun = extract(config(tmp_path / "c"))
    assert rerun.n_written == 0 and rerun.n_skipped == N_TILES
    assert read_manifest(tmp_path / "c") == again.manifest


def test_interrupted_extract_resumes_to_identical_manifest(reference, tmp_path):
    out, _ = reference
    interrupted_extract(tmp_path / "c")
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert not list((tmp_path / "c").glob(".*.tmp"))  # the unfinished shard was dropped
    kept = sorted(p.name for p in (tmp_path / "c").glob("shard-*.tar"))
    assert kept and len(kept) < 3
    resumed = extract(config(tmp_path / "c"))
    assert resumed.n_skipped == 4 * len(kept) and resumed.n_written == N_TILES - 4 * len(kept)
    assert read_manifest(tmp_path / "c") == read_manifest(out)


def test_corrupt_shard_is_rebuilt_on_rerun(reference, tmp_path):
    out, _ = reference
    extract(config(tmp_path / "c"))
    shard = tmp_path / "c" / "shard-00-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_cache(tmp_path / "c")
    assert not report.ok and [(p.shard, p.problem) for p in report.problems] == [(shard.name, "corrupt")]
    again = extract(config(tmp_path / "c"))
    assert again.n_written == 4 and verify_cache(tmp_path / "c").ok
    assert read_manifest(tmp_path / "c") == read_manifest(out)


def test_verify_reports_missing_and_truncated(reference, tmp_path):
    extract(config(tmp_path / "c"))
    (tmp_path / "c" / "shard-00-000000.tar").unlink()
    path = tmp_path / "c" / "shard-00-000002.tar"
    path.write_bytes(path.read_bytes()[:500])
    problems = {p.shard: p.problem for p in verify_cache(tmp_path / "c").problems}
    assert problems == {"shard-00-000000.tar": "missing", "shard-00-000002.tar": "truncated"}


def test_cache_of_another_config_is_refused_naming_the_difference(reference, tmp_path):
    extract(config(tmp_path / "c"))
    with pytest.raises(CacheError, match=r"encoder\.blocks.*--overwrite"):
        extract(config(tmp_path / "c", blocks="0,1"))
    result = extract(config(tmp_path / "c", blocks="0,1", overwrite=True))
    assert result.n_written == N_TILES
    assert read_manifest(tmp_path / "c")["identity"]["encoder"]["blocks"] == [0, 1]


def test_non_cache_directory_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a cellembed cache"):
        extract(config(tmp_path / "c"))
    with pytest.raises(CacheError, match="never other files"):
        extract(config(tmp_path / "c", overwrite=True))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["notes.txt"]


def test_disk_full_keeps_finished_shards(reference, tmp_path, monkeypatch):
    from cellembed.cache import _writer

    original, calls = _writer.ShardWriter.add, {"n": 0}

    def add(self, tile):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, tile)

    monkeypatch.setattr(_writer.ShardWriter, "add", add)
    with pytest.raises(CacheError, match="disk full.*rerun the same command"):
        extract(config(tmp_path / "c"))
    assert [p.name for p in (tmp_path / "c").glob("shard-*.tar")] == ["shard-00-000000.tar"]
    monkeypatch.setattr(_writer.ShardWriter, "add", original)
    assert extract(config(tmp_path / "c")).n_skipped == 4


def test_two_ranks_without_process_group_match_single_process(reference, tmp_path):
    out, _ = reference
    first = extract(config(tmp_path / "c", rank=1, world_size=2))
    assert first.manifest is None  # rank 0 has not written its shards yet
    second = extract(config(tmp_path / "c", rank=0, world_size=2))
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*.tar")) == [
        "shard-00-000000.tar", "shard-00-000002.tar", "shard-01-000001.tar"]
    assert manifest_without_names(second.manifest) == manifest_without_names(read_manifest(out))


SYNTH_CLI = ["--dataset", "synthetic", "-o", f"n_tiles={N_TILES}", "-o", "seed=3", "-o", "size=64",
             "--encoder", "test_vit", "--weights", "random", "--shard-size", "4", "--workers", "0", "--device", "cpu"]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(reference, tmp_path):
    out, _ = reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "cellembed", "extract", *SYNTH_CLI, "--batch-size", "3", "--out", str(tmp_path / "c")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*.tar")) == [
        "shard-00-000000.tar", "shard-00-000002.tar", "shard-01-000001.tar"]
    assert manifest_without_names(read_manifest(tmp_path / "c")) == manifest_without_names(read_manifest(out))
    ref = {s.key: s for s in open_cache(out)}
    for sample in open_cache(tmp_path / "c"):
        for a, b in zip(sample.feats, ref[sample.key].feats):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_killed_cli_extraction_resumes(tmp_path):
    n = 200
    cmd = [sys.executable, "-m", "cellembed", "extract", *SYNTH_CLI, "-o", f"n_tiles={n}", "--batch-size", "1",
           "--out", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: on a starved machine the first shard can take minutes
    while not list((tmp_path / "c").glob("shard-*.tar")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "c" / "manifest.json").exists()
    kept = len(list((tmp_path / "c").glob("shard-*.tar")))
    assert 1 <= kept < n // 4
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"reused {4 * kept}" in " ".join(done.stderr.split())
    fresh = extract(config(tmp_path / "fresh", batch_size=1, dataset_options={"n_tiles": n, "seed": 3, "size": 64}))
    assert read_manifest(tmp_path / "c") == fresh.manifest


def shard_files(out) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def damage(path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:700])
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["corrupt", "truncate", "delete"])
def test_repair_rewrites_only_the_bad_shard(reference, tmp_path, how):
    import os

    ref, _ = reference
    out = tmp_path / "c"
    extract(config(out))
    for path in list(out.glob("shard-*.tar")) + list((out / ".parts").glob("shard-*.json")):
        os.utime(path, ns=(10**18, 10**18))  # any rewrite would move these
    damage(out / "shard-00-000001.tar", how)
    result = extract(config(out, repair=True))
    assert result.rewritten == ("shard-00-000001.tar",) and result.changed == ()
    assert result.n_written == 4 and result.n_skipped == N_TILES - 4
    touched = sorted(p.name for p in list(out.glob("shard-*.tar")) + list((out / ".parts").glob("shard-*.json"))
                     if p.stat().st_mtime_ns != 10**18)
    assert touched == ["shard-00-000001.tar", "shard-00-000001.tar.json"]
    assert read_manifest(out) == read_manifest(ref) and shard_files(out) == shard_files(ref)
    assert verify_cache(out).ok


def test_plain_rerun_also_rebuilds_a_shard_damaged_after_the_manifest(reference, tmp_path):
    ref, _ = reference
    extract(config(tmp_path / "c"))
    damage(tmp_path / "c" / "shard-00-000002.tar", "truncate")
    again = extract(config(tmp_path / "c"))
    assert again.rewritten == ("shard-00-000002.tar",) and shard_files(tmp_path / "c") == shard_files(ref)


def test_repair_rebuilds_lost_shard_records_without_encoding(reference, tmp_path):
    import shutil

    ref, _ = reference
    out = tmp_path / "c"
    extract(config(out))
    records = {p.name: p.read_text() for p in (out / ".parts").glob("shard-*.json")}
    shutil.rmtree(out / ".parts")  # e.g. a copy that skipped hidden folders
    result = extract(config(out, repair=True))
    assert result.n_written == 0 and result.rewritten == ()
    assert {p.name: p.read_text() for p in (out / ".parts").glob("shard-*.json")} == records
    assert read_manifest(out) == read_manifest(ref)


def test_repair_keeps_the_names_other_ranks_wrote(tmp_path):
    out = tmp_path / "c"
    extract(config(out, rank=1, world_size=2))
    extract(config(out, rank=0, world_size=2))
    before, files = read_manifest(out), shard_files(out)
    damage(out / "shard-01-000001.tar", "corrupt")
    result = extract(config(out, repair=True))  # one process repairs what rank 1 wrote
    assert result.rewritten == ("shard-01-000001.tar",)
    assert read_manifest(out) == before and shard_files(out) == files


def test_repair_of_an_unfinished_cache_resumes_it(reference, tmp_path):
    ref, _ = reference
    interrupted_extract(tmp_path / "c")
    result = extract(config(tmp_path / "c", repair=True))
    assert result.n_skipped > 0 and read_manifest(tmp_path / "c") == read_manifest(ref)


def test_repair_refuses_what_it_cannot_repair(reference, tmp_path):
    with pytest.raises(CacheError, match="no cache to repair"):
        extract(config(tmp_path / "missing", repair=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no cache to repair"):
        extract(config(tmp_path / "empty", repair=True))
    with pytest.raises(ValueError, match="--repair.*--overwrite"):
        extract(config(tmp_path / "c", repair=True, overwrite=True))
    extract(config(tmp_path / "c"))
    with pytest.raises(CacheError, match=r"encoder\.blocks"):
        extract(config(tmp_path / "c", blocks="0,1", repair=True))


def test_workers_write_the_same_bytes_as_the_main_process(reference, tmp_path):
    ref, _ = reference
    extract(config(tmp_path / "c", num_workers=1))  # PNG and GT encoded in a worker, not the writer thread
    assert shard_files(tmp_path / "c") == shard_files(ref)


def test_non_finite_features_stop_extraction_keeping_finished_shards(tmp_path, monkeypatch):
    from cellembed.cache import _extract

    forward, calls = _extract._forward, {"n": 0}

    def overflowing(encoder, images, dtype, device):
        output = forward(encoder, images, dtype, device)
        calls["n"] += 1
        if calls["n"] == 3:  # tiles 4-6, the first batch of shard 1
            output.feats[1][1, 0, 0, 0] = 1e6  # finite in float32, inf in fp16
        return output

    monkeypatch.setattr(_extract, "_forward", overflowing)
    with pytest.raises(CacheError, match=r"non-finite features at block_\d+ for tiles \['synth_3_00005'\] "
                                         r"\(values exceed the fp16 range"):
        extract(config(tmp_path / "c"))
    assert [p.name for p in (tmp_path / "c").glob("shard-*.tar")] == ["shard-00-000000.tar"]
    assert not list((tmp_path / "c").glob(".*.tmp"))


def test_png_is_standard_and_lossless():
    import io

    from PIL import Image

    from cellembed.cache._codec import encode_image

    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (3, 7, 3), (64, 64, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        data = encode_image(image)
        Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
        assert encode_image(image) == data
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_channel_statistics_are_exact_for_each_storage_dtype(dtype):
    from cellembed.cache._writer import ChannelStats

    feats = (torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    stats = ChannelStats(["block_0"])
    stats.add({"block_0": feats})
    rec = stats.record()["block_0"]
    f = feats.double().flatten(1)
    assert rec["count"] == 12
    np.testing.assert_allclose(rec["sum"], f.sum(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(rec["sumsq"], (f * f).sum(1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("codec, top, ratio", [("int8", 127, 0.6), ("int4", 7, 0.35)])
def test_quantized_codecs_round_trip_within_half_a_step_and_shrink_the_features(reference, tmp_path, codec, top,
                                                                               ratio):
    """``--codec int8|int4``: every level stored quantized with a per-tile, per-channel scale; read back as fp16
    within scale / 2 (plus fp16 rounding) of the fp16 cache's values; the cache key records the codec."""
    ref_out, _ = reference
    out = tmp_path / codec
    extract(config(out, codec=codec))
    ref, q = open_cache(ref_out), open_cache(out)
    assert q.manifest["identity"]["codec"] == {lv["name"]: codec for lv in q.manifest["levels"]}
    assert "codec" not in ref.manifest["identity"] and q.cache_key != ref.cache_key
    for a, b in zip(ref, q):
        assert a.key == b.key
        for x, y in zip(a.feats, b.feats):
            assert y.dtype == torch.float16 and y.shape == x.shape
            step = x.float().abs().amax(dim=(1, 2)) / top  # the channel's quantization step
            err = (y.float() - x.float()).abs().amax(dim=(1, 2))
            assert (err <= step / 2 + 2e-3 * x.float().abs().amax(dim=(1, 2)) + 1e-6).all()
        np.testing.assert_array_equal(a.inst_map, b.inst_map)
    feats = lambda cache: sum(lv["channels"] * lv["grid"][0] * lv["grid"][1] for lv in cache.manifest["levels"])
    assert feats(q) == feats(ref)
    member = lambda out: next(p for p in out.glob("shard-*.tar"))
    import tarfile
    with tarfile.open(member(ref_out)) as ta, tarfile.open(member(out)) as tb:
        size = lambda tar: sum(m.size for m in tar if m.name.endswith("feats.safetensors"))
        assert size(tb) < ratio * size(ta)
    for lv in q.manifest["levels"]:  # statistics from the dequantized values: close to the fp16 cache's
        r = next(x for x in ref.manifest["levels"] if x["name"] == lv["name"])
        np.testing.assert_allclose(lv["mean"], r["mean"], atol=(2.5 / top) * max(map(abs, r["std"])) + 1e-3)
    assert verify_cache(out).ok


def test_codec_per_level_and_bad_specs(reference, tmp_path):
    from cellembed.cache._codec import parse_codecs

    names = ["block_1", "block_2"]
    assert parse_codecs("none", names, "fp16") == {"block_1": "fp16", "block_2": "fp16"}
    assert parse_codecs("int8", names, "fp16") == {"block_1": "int8", "block_2": "int8"}
    assert parse_codecs("block_2=int8", names, "bf16") == {"block_1": "bf16", "block_2": "int8"}
    with pytest.raises(ValueError, match="unknown level 'block_9'"):
        parse_codecs("block_9=int8", names, "fp16")
    with pytest.raises(ValueError, match="unknown codec 'int2'"):
        parse_codecs("int2", names, "fp16")
    out = tmp_path / "mixed"
    levels = open_cache(reference[0]).level_names  # the same encoder and blocks as the reference cache
    extract(config(out, codec=f"{levels[0]}=int8,{levels[-1]}=fp32"))
    cache = open_cache(out)
    sample = next(iter(cache))
    assert sample.feats[0].dtype == torch.float16 and sample.feats[-1].dtype == torch.float32
    assert cache.manifest["identity"]["codec"][levels[0]] == "int8"


# ---- pca<K> codec ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pca_cache(tmp_path_factory, reference):
    """A cache whose first level is stored as pca<C> (every component), its second as pca8 and the rest as fp16."""
    names = open_cache(reference[0]).level_names
    out = tmp_path_factory.mktemp("pca") / "cache"
    extract(config(out, codec=f"{names[0]}=pca64,{names[1]}=pca8"))
    return out


def eigenvalues(out, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(out / "pca.safetensors"))[f"{name}.eigenvalues"]


def test_pca_levels_reconstruct_the_features_and_lose_the_discarded_variance(reference, pca_cache):
    """K = C reconstructs the fp16 features to fp16 precision; K < C loses, per position, the sum of the discarded
    eigenvalues of the channel covariance (the fit saw every tile here, so the two agree up to rounding)."""
    ref, pca = open_cache(reference[0]), open_cache(pca_cache)
    names, channels = pca.level_names, [lv["channels"] for lv in pca.manifest["levels"]]
    assert channels[0] == 64 and pca.cache_key != ref.cache_key and "pca" not in ref.manifest["identity"]
    assert pca.manifest["identity"]["pca"]["fit_tiles"] == N_TILES
    assert pca.manifest["identity"]["codec"] == {names[0]: "pca64", names[1]: "pca8", names[2]: "fp16"}
    squared, positions = 0.0, 0
    for a, b in zip(ref, pca):
        x, y = [f.float() for f in a.feats], [f.float() for f in b.feats]
        assert [f.shape for f in b.feats] == [f.shape for f in a.feats] and b.feats[0].dtype == torch.float16
        assert (y[0] - x[0]).abs().max() <= 4e-3 * x[0].abs().max()
        assert torch.equal(y[2], x[2])
        squared += float(((y[1] - x[1]) ** 2).sum())
        positions += x[1].shape[1] * x[1].shape[2]
    values = eigenvalues(pca_cache, names[1])
    assert values[8:].sum() > 0.01 * values.sum()  # the test is not trivial: something is discarded
    np.testing.assert_allclose(squared / positions, float(values[8:].sum()), rtol=1e-3)
    levels = pca.manifest["levels"]
    assert levels[0]["pca"] == {"k": 64, "explained_variance": pytest.approx(1.0)} and "pca" not in levels[2]
    assert levels[1]["pca"]["explained_variance"] == pytest.approx(float(values[:8].sum() / values.sum()), abs=1e-6)


def test_pca_shards_hold_coefficients_and_every_reader_serves_channels(pca_cache):
    import tarfile

    from cellembed.cache import make_loader
    from cellembed.cache._codec import load_tensors

    cache = open_cache(pca_cache)
    names = cache.level_names
    with tarfile.open(next(pca_cache.glob("shard-*.tar"))) as tar:
        member = next(m for m in tar if m.name.endswith("feats.safetensors"))
        stored = load_tensors(tar.extractfile(member).read())
    assert stored[names[0]].shape[0] == 64 and stored[names[1]].shape[0] == 8 and stored[names[1]].dtype == torch.float16
    batch = next(iter(make_loader(cache, batch_size=4, memory="stream", num_workers=0, shuffle=False)))
    assert [f.shape[1] for f in batch.feats] == [lv["channels"] for lv in cache.manifest["levels"]]
    remote = open_cache(f"pipe:cat {pca_cache}/{{}}")  # the basis is read from the same location as the manifest
    a, b = next(iter(cache)), next(iter(remote))
    assert all(torch.equal(x, y) for x, y in zip(a.feats, b.feats))


def test_pca_resume_reuses_the_basis_and_refuses_a_tampered_one(pca_cache, tmp_path, monkeypatch):
    import cellembed.cache._extract as _extract

    out = tmp_path / "c"
    names = open_cache(pca_cache).level_names
    cfg = config(out, codec=f"{names[0]}=pca64,{names[1]}=pca8")
    first = extract(cfg)
    assert first.cache_key == open_cache(pca_cache).cache_key  # the fit is deterministic
    (out / "shard-00-000001.tar").unlink()
    monkeypatch.setattr(_extract, "fit_bases", lambda *a: pytest.fail("a resume must not refit the basis"))
    resumed = extract(cfg)
    assert resumed.n_skipped == 6 and resumed.n_written == 4 and resumed.manifest == first.manifest
    basis = out / "pca.safetensors"
    good = basis.read_bytes()
    basis.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CacheError, match=r"pca\.safetensors: sha256 .* differs .*re-extract with --overwrite"):
        extract(cfg)
    with pytest.raises(CacheError, match=r"pca\.safetensors: sha256 .* differs .*manifest\.json"):
        open_cache(out)
    assert [(p.shard, p.problem) for p in verify_cache(out).problems] == [("pca.safetensors", "corrupt")]
    basis.unlink()
    with pytest.raises(CacheError, match=r"pca\.safetensors: missing.*--overwrite"):
        extract(cfg)
    monkeypatch.undo()
    fixed = extract(config(out, codec=cfg.codec, overwrite=True))  # refits the same basis: the shards are kept
    assert fixed.n_skipped == N_TILES and basis.read_bytes() == good and verify_cache(out).ok
    damage(out / "shard-00-000002.tar", "corrupt")
    (out / ".parts" / "shard-00-000000.tar.json").unlink()  # rebuilt from the shard's bytes, with the basis
    repaired = extract(config(out, codec=cfg.codec, repair=True))  # statistics rebuilt from reconstructed values
    assert repaired.rewritten == ("shard-00-000002.tar",) and read_manifest(out) == first.manifest


def test_pca_basis_of_the_training_cache_projects_held_out_tiles(pca_cache, tmp_path, monkeypatch):
    """``--pca-basis``: a held-out cache projected on the training cache's basis (no fit, the same file), resumable,
    and read back as that basis reconstructs its own features; a basis of another K or without the level is
    refused in one line."""
    import cellembed.cache._extract as _extract

    names = open_cache(pca_cache).level_names
    codec = f"{names[0]}=pca64,{names[1]}=pca8"
    held_out = {"n_tiles": 6, "seed": 11, "size": 64}
    monkeypatch.setattr(_extract, "fit_bases", lambda *a: pytest.fail("a given basis must not be refitted"))
    out = tmp_path / "test"
    first = extract(config(out, codec=codec, dataset_options=held_out, pca_basis=str(pca_cache)))
    assert (out / "pca.safetensors").read_bytes() == (pca_cache / "pca.safetensors").read_bytes()
    ident = open_cache(out).manifest["identity"]["pca"]
    trained = open_cache(pca_cache).manifest["identity"]["pca"]
    assert ident["given"] is True and ident["sha256"] == trained["sha256"] and "fit_tiles" not in ident
    (out / "shard-00-000001.tar").unlink()
    again = extract(config(out, codec=codec, dataset_options=held_out, pca_basis=str(pca_cache / "pca.safetensors")))
    assert (again.n_skipped, again.n_written, again.cache_key) == (4, 2, first.cache_key)  # the file itself: a resume
    plain = tmp_path / "plain"
    extract(config(plain, dataset_options=held_out))
    for a, b in zip(open_cache(plain), open_cache(out)):  # pca64 keeps every component: lossless up to fp16
        x, y = a.feats[0].float(), b.feats[0].float()
        assert (y - x).abs().max() <= 4e-3 * x.abs().max()
    with pytest.raises(CacheError, match=r"pca\.safetensors: .* K x C = \(8, 64\), this extraction needs pca4"):
        extract(config(tmp_path / "k", codec=f"{names[1]}=pca4", dataset_options=held_out, pca_basis=str(pca_cache)))
    with pytest.raises(CacheError, match=r"pca\.safetensors: .* absent"):
        extract(config(tmp_path / "l", codec=f"{names[2]}=pca4", dataset_options=held_out, pca_basis=str(pca_cache)))
    with pytest.raises(CacheError, match=r"no PCA basis here"):
        extract(config(tmp_path / "m", codec=codec, dataset_options=held_out, pca_basis=str(plain)))
    with pytest.raises(ValueError, match=r"--pca-basis .* stores no pcaK level; add --codec pcaK"):
        extract(config(tmp_path / "n", dataset_options=held_out, pca_basis=str(pca_cache)))


def test_pca_two_ranks_without_process_group_match_single_process(pca_cache, tmp_path):
    codec = open_cache(pca_cache).manifest["identity"]["codec"]
    spec = ",".join(f"{k}={v}" for k, v in codec.items())
    assert extract(config(tmp_path / "c", codec=spec, rank=1, world_size=2)).manifest is None
    second = extract(config(tmp_path / "c", codec=spec, rank=0, world_size=2))
    assert manifest_without_names(second.manifest) == manifest_without_names(read_manifest(pca_cache))


def test_pca_bad_specs():
    from cellembed.cache._codec import parse_codecs

    names = ["block_1", "block_2"]
    assert parse_codecs("block_2=pca16", names, "fp16", [32, 64]) == {"block_1": "fp16", "block_2": "pca16"}
    for spec in ("pca0", "pca33", "block_1=pca9999"):
        with pytest.raises(ValueError, match="choose pca1 to pca32"):
            parse_codecs(spec, names, "fp16", [32, 64])
    with pytest.raises(ValueError, match="unknown codec 'pcax'"):
        parse_codecs("pcax", names, "fp16", [32, 64])


@pytest.mark.slow
def test_pca_torchrun_two_processes_gloo_end_with_one_basis(tmp_path):
    """Under torchrun rank 0 fits and writes the basis and rank 1 reads it after a barrier: the cache equals a
    single process's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           "-m", "cellembed", "extract", *SYNTH_CLI, "--batch-size", "3", "--codec", "pca8", "--out", str(tmp_path / "c")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = extract(config(tmp_path / "single", codec="pca8"))
    assert manifest_without_names(read_manifest(tmp_path / "c")) == manifest_without_names(single.manifest)
    assert (tmp_path / "c" / "pca.safetensors").read_bytes() == (tmp_path / "single" / "pca.safetensors").read_bytes()
