"""CUDA paths (skipped where torch sees no GPU): extraction in bf16, the gpu memory mode, decoder training with
bf16 autocast and channels-last weights, scoring, and the GPU variant of the cache-vs-live benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellembed.cache import ExtractConfig, extract, make_loader, open_cache
from cellembed.evaluate import score_run
from cellembed.train import FitConfig, fit_decoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ROOT = Path(__file__).resolve().parents[1]


def _extract(path, device, seed=0):
    extract(ExtractConfig(dataset="synthetic", out=str(path), encoder="test_vit", weights="random", device=device,
                          num_workers=0, shard_size=4, batch_size=4,
                          dataset_options={"n_tiles": 8, "seed": seed, "size": 64}))
    return open_cache(path)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return {"gpu": _extract(root / "gpu", "cuda"), "cpu": _extract(root / "cpu", "cpu"),
            "val": _extract(root / "val", "cuda", seed=1)}


def test_gpu_extraction_matches_cpu_within_bf16(caches):
    """bf16 autocast on the GPU, fp32 on the CPU: the same tiles give the same features within bf16 precision."""
    gpu = make_loader(caches["gpu"], batch_size=8, memory="ram", num_workers=0, shuffle=False)
    cpu = make_loader(caches["cpu"], batch_size=8, memory="ram", num_workers=0, shuffle=False)
    for a, b in zip(next(iter(gpu)).feats, next(iter(cpu)).feats):
        assert a.shape == b.shape
        scale = b.abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 0.05 * scale + 1e-3


def test_gpu_memory_mode_serves_cuda_tensors_equal_to_ram(caches):
    ram = make_loader(caches["gpu"], batch_size=4, memory="ram", num_workers=0, device="cuda", shuffle=False)
    gpu = make_loader(caches["gpu"], batch_size=4, memory="gpu", num_workers=0, device="cuda", shuffle=False)
    for a, b in zip(ram, gpu):
        assert all(f.is_cuda for f in b.feats) and b.image.is_cuda
        for x, y in zip(a.feats, b.feats):
            assert torch.equal(x.to(y.device), y)


def test_fit_and_score_on_cuda(caches, tmp_path):
    """fit-decoder on the GPU (gpu memory mode, bf16 autocast, channels-last decoder) trains, checkpoints,
    resumes after an interruption and scores like the CPU path."""
    cfg = FitConfig(out=str(tmp_path / "run"), cache=str(caches["gpu"].path), val_cache=str(caches["val"].path),
                    epochs=2, batch_size=4, device="cuda", num_workers=0, lr=1e-3, memory="gpu")

    def stop_after_first(epoch, total, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_decoder(cfg, on_epoch=stop_after_first)
    result = fit_decoder(cfg)  # resumes from epoch 1
    assert result.epochs_run == 1 and [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    scores = score_run(result.run_dir, caches["val"].path, device="cuda", num_workers=0)
    assert 0.0 <= scores.metrics["summary"]["pq"] <= 1.0


def test_cache_vs_live_benchmark_runs_on_cuda(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/cache_vs_live.py", "--device", "cuda", "--quick",
                          "--encoders", "test_vit", "--name", "cache_vs_live_cuda_test"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((ROOT / "benchmarks/results/cache_vs_live_cuda_test.json").read_text())
    for name in ("cache_vs_live_cuda_test.json", "cache_vs_live_cuda_test.md", "cache_vs_live_cuda_test.png"):
        (ROOT / "benchmarks/results" / name).unlink(missing_ok=True)
    assert result["device"] == "cuda"
    assert {"bound", "ram", "gpu", "stream"} <= set(result["rows"][0]["median_epoch_seconds"])
