"""SIGKILL at random points of an extraction, alone or as one of two ranks: rerunning finishes the cache with
the manifest and every shard's bytes equal to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time

import pytest

from cellembed.cache import ExtractConfig, extract, read_manifest

N_TILES = 24
OPTIONS = {"n_tiles": N_TILES, "seed": 11, "size": 64}
CLI = [sys.executable, "-m", "cellembed", "extract", "--dataset", "synthetic", "-o", f"n_tiles={N_TILES}", "-o",
       "seed=11", "-o", "size=64", "--encoder", "test_vit", "--weights", "random", "--shard-size", "4",
       "--batch-size", "2", "--workers", "0", "--device", "cpu"]


def _config(out, **kw):
    return ExtractConfig(dataset="synthetic", out=str(out), encoder="test_vit", weights="random", batch_size=2,
                         num_workers=0, shard_size=4, device="cpu", dataset_options=dict(OPTIONS), **kw)


def _shards(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "cache"
    extract(_config(out))
    return out


def _kill_when(proc, out, n_shards: int, extra_delay: float, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob("shard-*.tar"))) < n_shards and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(2))
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(whole, tmp_path, trial):
    rng = random.Random(trial)
    out = tmp_path / "cache"
    proc = subprocess.Popen(CLI + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, out, rng.randint(0, 4), rng.uniform(0, 0.3))
    done = subprocess.run(CLI + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_manifest(out) == read_manifest(whole)
    assert _shards(out) == _shards(whole)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name]


@pytest.mark.slow
def test_one_of_two_ranks_killed_then_rerun_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    for rank in (0, 1):
        extract(_config(ref, rank=rank, world_size=2))
    out = tmp_path / "cache"
    ranks = [subprocess.Popen(CLI + ["--out", str(out), "--rank", str(r), "--world-size", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in (0, 1)]
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shard-01-*.tar")):
        time.sleep(0.005)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[1].wait()
    assert ranks[0].wait(timeout=300) == 0
    assert not (out / "manifest.json").exists()  # rank 1's shards are missing, so no manifest yet
    done = subprocess.run(CLI + ["--out", str(out), "--rank", "1", "--world-size", "2"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_manifest(out) == read_manifest(ref)
    assert _shards(out) == _shards(ref)


def test_a_manifest_temp_file_left_by_a_killed_run_is_removed_on_rerun(whole, tmp_path):
    # SIGKILL between write_json_atomic's open and its rename leaves ".manifest.json.<pid>.tmp" behind
    out = tmp_path / "cache"
    extract(_config(out))
    stale = out / ".manifest.json.999999.tmp"
    stale.write_text('{"half": ')
    extract(_config(out))
    assert not stale.exists() and read_manifest(out) == read_manifest(whole)
