"""Stage two: train a decoder on a feature cache (or live), validate every epoch, keep the best, resume.

A run directory holds::

    config.json        what was trained on and how (fit config, encoder identity, levels, classes,
                       post-processing); ``cellembed score`` rebuilds the decoder from it
    model.safetensors  the best weights by ``best_metric`` (metadata: epoch and value)
    last-<epoch>.safetensors  resumable state after the last finished epoch (model, optimizer moments, RNG)
    last.json          the rest of that state (epoch, tensor file, optimizer groups, scheduler, history,
                       best); written last, it is the epoch's commit point
    metrics.jsonl      one line per finished epoch
    curves.png         losses and validation PQ per epoch
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from cellembed.cache._manifest import write_json_atomic
from cellembed.evaluate._predict import INSTANCE_HEADS, Postprocess, default_postprocess
from cellembed.train import _ddp as ddp
from cellembed.train._checkpoint import apply_state, read_state, save_model, save_state
from cellembed.train._validate import validate

SOURCES = ("cache", "live")
LOSSES = ("mindthegap", "mindthegap-msge", "cisca", "semantic")  # semantic: CE + Dice, the semantic head's only loss
RUN_FILES = ("last.json", "metrics.jsonl", "model.safetensors", "curves.png")
# the config fields that may change when an interrupted run is resumed
RESUME_FREE = ("overwrite", "num_workers", "device", "memory", "val_cache", "tune")


@dataclass(frozen=True)
class FitConfig:
    """Everything ``cellembed fit-decoder`` needs; recorded in ``<out>/config.json``.

    ``cache`` is the training cache for ``source="cache"``; with ``source="live"`` the encoder runs in the
    loop on ``dataset``/``root`` (``encoder``, ``blocks``, ``weights``, ``input_policy``, ``dtype`` as for
    ``cellembed extract``) with image-space augmentation (``augment="full"``).

    ``seed`` seeds the decoder's initial weights and, unless ``data_seed`` is set, the batch order and
    augmentation draws; ``data_seed`` seeds those alone (``fit_many`` trains seed variants on one data order).
    """

    out: str
    cache: str | None = None
    val_cache: str | None = None
    source: str = "cache"
    decoder: str = "unetr"
    head: str = "cisca"
    loss: str = "mindthegap-msge"
    epochs: int = 20
    batch_size: int = 4
    lr: float = 3e-3
    final_lr: float = 1e-6
    warmup: float = 0.3
    weight_decay: float = 0.01
    memory: str = "auto"
    augment: str = "auto"
    oversample: str = "none"
    magnification: str = "40x"
    postprocess: str | None = None
    image_skip: bool | None = None
    refine: bool = True
    image_levels: int = 2
    full_channels: int | None = None
    level_depth: int = 1
    split_trunks: bool = False
    type_branch: bool = True
    tune: bool = True
    patience: int | None = None
    levels: str | None = None
    best_metric: str = "pq"
    seed: int = 0
    data_seed: int | None = None
    device: str = "auto"
    num_workers: int = 2
    shuffle_buffer: int | str = "auto"
    overwrite: bool = False
    # live source only
    dataset: str | None = None
    root: str | None = None
    split: str = "train"
    folds: str | None = None
    encoder: str | None = None
    blocks: str = "default"
    weights: str = "hub"
    input_policy: str = "auto"
    dtype: str = "fp16"
    dataset_options: dict = field(default_factory=dict)


class FitResult(NamedTuple):
    """How a run went: directory, epochs run now, best checkpoint, per-epoch history, size, time."""

    run_dir: Path
    epochs_run: int
    best: dict | None
    history: list[dict]
    n_params: int
    seconds: float


EpochCallback = Callable[[int, int, dict], None]  # (epoch, epochs, metrics)
StepCallback = Callable[[int], None]  # (samples in the finished step)


def fit_decoder(config: FitConfig, on_epoch: EpochCallback | None = None,
                on_step: StepCallback | None = None) -> FitResult:
    """Train a decoder; resumes from ``<out>/last.*`` when an interrupted run with the same config is there.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this and together they train one model with
    DistributedDataParallel (see ``cellembed.train._ddp``): ``batch_size`` is the global batch, each rank reads
    its own shards, validation scores the union of the ranks' images, and rank 0 alone writes the run.

    Args:
        config: the run's settings.
        on_epoch: called after every finished (and saved) epoch with (epoch, epochs, metrics), on every rank.
        on_step: called after every optimizer step with the number of samples in it (this rank's).

    Raises:
        CacheError: a cache that is incomplete, corrupt, or does not match the run.
        ValueError: invalid settings, or ``out`` holds another run and ``overwrite`` is not set.
        RuntimeError: under DDP, another rank stopped or a collective timed out.
    """
    t0 = time.perf_counter()
    ranks = ddp.env_ranks()
    with ddp.same_on_every_rank(ranks):
        _check_ranks(config, ranks)
        _check_config(config)
        device = _device(config.device)
    device, started = ddp.start(ranks, device)
    try:
        return _fit(config, ranks, device, on_epoch, on_step, t0)
    finally:
        if started:
            ddp.stop()


def _fit(config: FitConfig, ranks: ddp.Ranks, device: torch.device, on_epoch, on_step, t0: float) -> FitResult:
    train, source = _train_source(config, device, ranks)
    model, n_params, post = _build_model(config, source, device)
    num_classes = model.num_classes
    net = ddp.wrap(model, device)  # what trains; ``model`` (no ``module.`` prefix) is saved and validated
    val = _val_loader(config, source, device, train, ranks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _one_cycle(optimizer, config, len(train))
    source["world_size"] = ranks.world_size
    run_dir = ddp.on_main(_prepare_run, config, source, model, n_params, post)
    start, history, best = 0, [], None
    state = ddp.on_main(read_state, run_dir)  # rank 0's checkpoint, loaded on every rank
    if state is not None:
        start, history, best = apply_state(state, model, optimizer, scheduler)
    loss_fn = make_loss(config.head, config.loss)
    for epoch in range(start, config.epochs):
        if _stop_early(config, history, best):
            break
        train.set_epoch(epoch)
        t_epoch = time.perf_counter()
        with ddp.peers_alive():
            metrics = {"epoch": epoch + 1, **_train_epoch(net, train, optimizer, scheduler, loss_fn, device,
                                                          on_step, model.image_skip)}
        metrics["train_seconds"] = time.perf_counter() - t_epoch
        if val is not None:
            metrics.update(validate(model, val, device, post, num_classes, loss_fn))
        history.append(metrics)
        best = ddp.on_main(_commit_epoch, run_dir, model, optimizer, scheduler, config.best_metric, history, best)
        if on_epoch:
            on_epoch(epoch + 1, config.epochs, metrics)
    ddp.barrier()  # every rank is past its last collective before any leaves the group
    if ranks.main:  # the others are done: they need not wait for the plot and the tuning
        _finish_run(config, run_dir, history, best, post)
    return FitResult(run_dir, len(history) - start, best, history, n_params, time.perf_counter() - t0)


def _build_model(config: FitConfig, source: dict, device: torch.device):
    """The decoder seeded with ``config.seed`` (so any two runs of one config start from the same weights), its
    trainable parameter count and its post-processing."""
    from cellembed.decoders import build_decoder

    # nucleus heads predict classes 1..C beside background; the semantic head predicts every class name
    num_classes = len(source["class_names"]) - (0 if config.head == "semantic" else 1)
    torch.manual_seed(config.seed)
    model = build_decoder(config.decoder, source["levels"], source["tile_size"], config.head, num_classes,
                          image_skip=_image_skip(config), **_decoder_options(config)).to(device)
    if device.type == "cuda":  # cuDNN's NHWC kernels under bf16 autocast; same weights and outputs
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    post = (Postprocess(config.head, config.postprocess) if config.postprocess
            else default_postprocess(config.head, {"identity": source["identity"]}, config.magnification))
    return model, n_params, post


def _end_epoch(config: FitConfig, run_dir: Path, model, optimizer, scheduler, metrics: dict, history: list[dict],
               best: dict | None) -> dict | None:
    """Record a finished epoch of a one-process run: history, then ``_commit_epoch``'s writes."""
    history.append(metrics)
    return _commit_epoch(run_dir, model, optimizer, scheduler, config.best_metric, history, best)


def _finish_run(config: FitConfig, run_dir: Path, history: list[dict], best: dict | None, post: Postprocess) -> None:
    """After the last epoch: the curves, and the minimum area tuned on the validation cache."""
    if history:
        _plot_curves(run_dir, history)
    if config.tune and config.val_cache and best is not None and config.head in INSTANCE_HEADS:
        _tune_min_area(config, run_dir, post)


def _check_ranks(c: FitConfig, ranks: ddp.Ranks) -> None:
    """Settings DDP cannot run: the live source, a global batch that does not split evenly over the ranks, more
    ranks than the training cache has shards."""
    if ranks.world_size == 1:
        return
    if c.source == "live":
        raise ValueError(f"--source live trains in one process, not {ranks.world_size}; run it without torchrun, or "
                         "extract a cache (`cellembed extract`) and train from it under torchrun")
    if c.batch_size % ranks.world_size:
        raise ValueError(f"--batch-size {c.batch_size} is the global batch and must split evenly over the "
                         f"{ranks.world_size} processes; use a multiple of {ranks.world_size}")
    if c.cache:
        from cellembed.cache import open_cache
        from cellembed.cache._loader import check_world_size

        check_world_size(open_cache(c.cache), ranks.world_size)


def _commit_epoch(run_dir: Path, model, optimizer, scheduler, metric: str, history: list[dict],
                  best: dict | None) -> dict | None:
    """Rank 0's writes after an epoch: the best checkpoint, the resume state (the epoch's commit point), then
    ``metrics.jsonl``; returns the best so far."""
    best = _keep_best(run_dir, model, metric, history[-1], best)
    save_state(run_dir, model, optimizer, scheduler, history[-1]["epoch"], history, best)
    _write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    return best


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stop_early(config: FitConfig, history: list[dict], best: dict | None) -> bool:
    """Early stopping: ``patience`` finished epochs without a better ``best_metric`` (checked before every epoch,
    so a resumed run stops where the uninterrupted one did)."""
    return bool(config.patience and history and best and history[-1]["epoch"] - best["epoch"] >= config.patience)


def _tune_min_area(config: FitConfig, run_dir: Path, post: Postprocess) -> None:
    """``cellembed tune`` on the validation cache with the best checkpoint: the minimum instance area that
    maximises ``best_metric`` (PQ when that is a loss) among the preset's area × 0, ¼, …, 2, saved with the run.

    The candidates come from the run's preset, not from an earlier tuning, so a rerun tunes the same way.
    """
    from cellembed.evaluate._run import area_candidates, tune_run

    metric = "pq" if "loss" in config.best_metric else config.best_metric
    tune_run(run_dir, config.val_cache, metric=metric, areas=area_candidates(post), device=config.device,
             num_workers=config.num_workers)


def _image_skip(config: FitConfig) -> bool:
    """``image_skip=None`` is the decoder's default: on for unetr (its full-resolution image branch), off for
    light (the FM benchmark's decoder has none)."""
    return config.decoder == "unetr" if config.image_skip is None else bool(config.image_skip)


def _decoder_options(config: FitConfig) -> dict:
    """Decoder-specific build options of the config (unetr: ``refine``, ``image_levels``, ``full_channels``,
    ``type_branch``, ``level_depth``, ``split_trunks``)."""
    from cellembed.evaluate._run import UNETR_OPTIONS

    if config.decoder != "unetr":
        return {}
    return {k: getattr(config, k) for k in UNETR_OPTIONS}


def _check_config(c: FitConfig) -> None:
    from cellembed.decoders import DECODERS, HEADS

    checks = (("source", c.source, SOURCES), ("loss", c.loss, LOSSES), ("decoder", c.decoder, tuple(DECODERS)),
              ("head", c.head, tuple(HEADS)), ("magnification", c.magnification, ("20x", "40x")))
    for name, value, valid in checks:
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    if c.loss == "semantic" and c.head != "semantic":
        raise ValueError(f"loss 'semantic' (CE + Dice over classes) is the semantic head's loss; the {c.head} head "
                         "takes mindthegap, mindthegap-msge or cisca")
    if c.epochs < 1 or c.batch_size < 1 or not c.lr > 0 or not 0 < c.warmup < 1:
        raise ValueError("epochs and batch size must be >= 1, lr > 0 and warmup in (0, 1)")
    if c.patience is not None and c.patience < 1:
        raise ValueError(f"patience must be >= 1 epochs (or unset), got {c.patience}")
    if c.source == "cache" and not c.cache:
        raise ValueError("a training cache is needed (`cellembed fit-decoder CACHE ...`), or use --source live")
    if c.source == "live" and not (c.dataset and c.encoder):
        raise ValueError("--source live needs --dataset (and --root) and --encoder")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but torch sees no GPU; use --device cpu or auto")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def _level_names(levels: str | None) -> list[str] | None:
    return [n.strip() for n in levels.split(",") if n.strip()] if levels else None


def _train_source(c: FitConfig, device: torch.device, ranks: ddp.Ranks = ddp.Ranks()):
    """The training loader (this rank's shards, ``batch_size / world size`` per step) and what the decoder and the
    run record need to know about its features."""
    if c.source == "live":
        from cellembed.train._live import make_live_loader

        loader = make_live_loader(
            c.dataset, c.root, c.encoder, split=c.split, folds=c.folds, blocks=c.blocks, weights=c.weights,
            input_policy=c.input_policy, dtype=c.dtype, dataset_options=dict(c.dataset_options),
            batch_size=c.batch_size, augment=_augment(c), head=c.head,
            magnification=c.magnification, shuffle=True, seed=data_seed(c), num_workers=c.num_workers,
            device=device, levels=_level_names(c.levels))
        return loader, {"kind": "live", "levels": loader.levels, "tile_size": loader.tile_size, "cache_key": None,
                        "class_names": list(loader.class_names), "identity": loader.identity}
    from cellembed.cache import make_loader, open_cache

    cache = open_cache(c.cache)
    loader = make_loader(cache, batch_size=c.batch_size // ranks.world_size, memory=c.memory, augment=_augment(c),
                         head=c.head, magnification=c.magnification, shuffle=True, seed=data_seed(c),
                         num_workers=c.num_workers, device=device, rank=ranks.rank, world_size=ranks.world_size,
                         levels=_level_names(c.levels), shuffle_buffer=c.shuffle_buffer, **_oversample(c))
    levels = [lv for lv in cache.manifest["levels"] if lv["name"] in loader.level_names]
    return loader, {"kind": "cache", "levels": levels, "tile_size": cache.manifest["tile_size"],
                    "cache_key": cache.cache_key, "class_names": cache.manifest["class_names"],
                    "identity": cache.manifest["identity"]}


def data_seed(c: FitConfig) -> int:
    """The seed of the batch order and augmentation draws: ``data_seed``, or ``seed`` when that is unset."""
    return c.seed if c.data_seed is None else c.data_seed


def _augment(c: FitConfig) -> str:
    """"auto": dihedral from a cache (flips and quarter turns of the cached levels, image and GT together: free
    and exact for nuclei, which have no orientation; the paper's cache protocol is ``none``), full image-space
    augmentation live."""
    if c.augment != "auto":
        return c.augment
    return "full" if c.source == "live" else "dihedral"


def _oversample(c: FitConfig) -> dict:
    return {} if c.oversample == "none" else {"oversample": c.oversample}


def _val_loader(c: FitConfig, source: dict, device: torch.device, train, ranks: ddp.Ranks = ddp.Ranks()):
    """The validation cache's loader (every sample of this rank's shards); live runs without one validate live on
    the dataset's val split."""
    if not c.val_cache:
        if c.source != "live":
            return None
        from cellembed.train._live import make_live_loader

        return make_live_loader(
            c.dataset, c.root, train.encoder, split="val", folds=c.folds, blocks=c.blocks, weights=c.weights,
            input_policy=c.input_policy, dtype=c.dtype, dataset_options=dict(c.dataset_options),
            batch_size=c.batch_size, augment="none", head=c.head, magnification=c.magnification, shuffle=False,
            seed=data_seed(c), num_workers=c.num_workers, device=device, levels=[lv["name"] for lv in source["levels"]])
    from cellembed.cache import make_loader, open_cache

    with ddp.same_on_every_rank(ranks):
        cache = open_cache(c.val_cache)
        check_run_cache(cache, source, "validation cache")
    return make_loader(cache, batch_size=max(1, c.batch_size // ranks.world_size), memory=c.memory, augment="none",
                       head=c.head, magnification=c.magnification, shuffle=False, seed=data_seed(c),
                       num_workers=c.num_workers, device=device, rank=ranks.rank, world_size=ranks.world_size,
                       levels=[lv["name"] for lv in source["levels"]], same_steps=False)


def check_run_cache(cache, run: dict, role: str) -> None:
    """Refuse a cache that cannot evaluate the run: another encoder (weights, blocks, input policy), dtype,
    levels, classes or tile size, or the very tiles the run was trained on."""
    from cellembed.cache import CacheError, check_compatible

    ident = run["identity"]
    try:
        check_compatible(cache, {"encoder": ident["encoder"], "dtype": ident["dtype"],
                                 "class_names": run["class_names"], "tile_size": run["tile_size"],
                                 "levels": [lv["name"] for lv in run["levels"]]})
    except CacheError as err:
        raise CacheError(f"{role} {err}") from None
    theirs = cache.manifest["identity"]
    if theirs.get("augment_views"):
        raise CacheError(f"{role} {cache.path}: holds augmented copies of its tiles (extract --augment-views); "
                         "evaluate on a cache extracted without --augment-views")
    if run.get("source", run.get("kind")) == "cache" and theirs.get("tiles") == ident.get("tiles") and \
            theirs.get("dataset") == ident.get("dataset"):
        split = theirs.get("split", {}).get("split")
        raise CacheError(f"{role} {cache.path}: holds the same tiles as the run's training cache (split {split}); "
                         "evaluate on a cache of another split")


def _one_cycle(optimizer, config: FitConfig, steps_per_epoch: int):
    """OneCycleLR: from lr/25 up to ``lr`` over the first ``warmup`` fraction, cosine down to ``final_lr``."""
    start = config.lr / 25.0
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(1, config.epochs * steps_per_epoch), pct_start=config.warmup,
        div_factor=25.0, final_div_factor=start / config.final_lr, anneal_strategy="cos")


def make_loss(head: str, mode: str = "mindthegap"):
    """``(outputs, targets) -> (loss, terms)`` for a head."""
    from cellembed.train import losses

    if head == "cisca":
        return lambda out, tgt: losses.cisca_loss(out, tgt, mode=mode)
    return {"hovernet": losses.hovernet_loss, "semantic": losses.semantic_loss}[head]


def _record(config: FitConfig, source: dict, n_params: int, post: Postprocess, num_classes: int) -> dict:
    return {"config": {k: v for k, v in dataclasses.asdict(config).items() if k != "overwrite"},
            "source": source["kind"], "cache_key": source["cache_key"], "identity": source["identity"],
            "levels": source["levels"], "class_names": source["class_names"], "tile_size": source["tile_size"],
            "decoder": {"name": config.decoder, "head": config.head, "num_classes": num_classes,
                        "image_skip": _image_skip(config), **_decoder_options(config),
                        "trainable_parameters": n_params},
            "postprocess": post.to_dict(), "world_size": source.get("world_size", 1)}


LEGACY_CONFIG = {"full_channels": None, "type_branch": False, "level_depth": 1, "split_trunks": False,
                 "data_seed": None}
"""Fit options that runs recorded before each option existed used (their config.json lacks the key), so a run
interrupted before the upgrade resumes when the option is given its old value, e.g. ``--no-type-branch``."""


def _same_run(old: dict, new: dict) -> bool:
    from cellembed.evaluate._run import LEGACY_DECODER

    legacy = {"config": LEGACY_CONFIG, "decoder": LEGACY_DECODER}
    new = json.loads(json.dumps(new))
    # an option the new record has and the old one lacks took its legacy value (light runs have no unetr options)
    old = {**old, **{part: {**{k: v for k, v in legacy[part].items() if k in new.get(part, {})}, **old[part]}
                     for part in legacy if isinstance(old.get(part), dict)}}
    strip = lambda r: {**r, "config": {k: v for k, v in r["config"].items() if k not in RESUME_FREE},
                       "postprocess": None, "world_size": None}
    return strip(old) == strip(new)


def _prepare_run(config: FitConfig, source: dict, model, n_params: int, post: Postprocess) -> Path:
    """Create ``out``; a different run already there is refused unless ``overwrite``."""
    run_dir = Path(config.out)
    record = _record(config, source, n_params, post, model.num_classes)
    path = run_dir / "config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old is None or not _same_run(old, record):
            if not config.overwrite:
                raise ValueError(f"{run_dir} holds a run with another config or cache; pass --overwrite to "
                                 "replace it, or choose another --out")
            for path in [*(run_dir / name for name in RUN_FILES), *run_dir.glob("last-*.safetensors")]:
                path.unlink(missing_ok=True)
        else:
            _check_same_world(run_dir, old.get("world_size", 1), record["world_size"], config.overwrite)
            record["postprocess"] = old.get("postprocess", record["postprocess"])  # keep a tuned min area
    elif run_dir.exists() and not config.overwrite:
        for tmp in run_dir.glob(".*.tmp"):  # a write killed before its rename (write_json_atomic): no run yet
            tmp.unlink(missing_ok=True)
        if any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} exists and is not a cellembed run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return run_dir


def _check_same_world(run_dir: Path, old: int, new: int, overwrite: bool) -> None:
    """A run resumes with the number of processes it started with: with another, the steps per epoch (the smallest
    rank's share) and so the OneCycle schedule saved with it may not fit."""
    if old != new and (run_dir / "last.json").is_file() and not overwrite:
        how = "without torchrun" if old == 1 else f"under torchrun --nproc_per_node={old} (or as many in all nodes)"
        raise ValueError(f"{run_dir} was trained by {old} process(es), this is {new}; resume it {how}, or pass "
                         "--overwrite to start it again")


def _step(model, batch, loss_fn, device, image_skip: bool | None = None):
    """Forward and loss of one batch; ``image_skip`` for a wrapped (DDP) model, which hides the decoder's flag."""
    skip = model.image_skip if image_skip is None else image_skip
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        outputs = model(batch.feats, batch.image if skip else None)
    outputs = {k: v.float() for k, v in outputs.items()}
    return loss_fn(outputs, batch.targets)


def _train_epoch(model, loader, optimizer, scheduler, loss_fn, device, on_step,
                 image_skip: bool | None = None) -> dict:
    """One pass; ``train_loss`` is the sample-weighted mean of the batch losses over every rank.

    ``image_skip``: the decoder's flag when ``model`` is its DDP wrapper (default: ``model.image_skip``)."""
    model.train()
    total, n, lr = 0.0, 0, None
    for batch in loader:
        loss, lr = _train_step(model, batch, optimizer, scheduler, loss_fn, device, n, image_skip)
        size = len(batch.image)
        total, n = total + loss * size, n + size
        if on_step:
            on_step(size)
    total, n = ddp.sum_all(total, n)
    return {"train_loss": total / max(n, 1), "lr": lr}


def _train_step(model, batch, optimizer, scheduler, loss_fn, device, seen: int,
                image_skip: bool | None = None) -> tuple[float, float]:
    """One optimizer and scheduler step on ``batch``; returns (loss, learning rate of the step).

    ``image_skip``: the decoder's flag when ``model`` is its DDP wrapper (``_step``)."""
    loss, _ = _step(model, batch, loss_fn, device, image_skip)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {float(loss)} at sample {seen}; lower --lr, or check "
                                 "the cache with `cellembed verify` (NaN/Inf features)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return loss.item(), lr


def _keep_best(run_dir: Path, model, metric: str, metrics: dict, best: dict | None) -> dict | None:
    """Save ``model.safetensors`` when ``metric`` improves (lower for losses, higher otherwise).

    ``metric`` may be given with or without the ``val_`` prefix; without validation the training loss is used.
    """
    name = metric_key(metric, metrics)
    value = metrics[name]
    value = float("-inf") if value is None else value
    lower = name.endswith("loss")
    if best is None or best["metric"] != name or (value < best["value"] if lower else value > best["value"]):
        best = {"metric": name, "value": value, "epoch": metrics["epoch"]}
        save_model(model, run_dir / "model.safetensors", {"best": best})
    return best


def metric_key(metric: str, metrics: dict) -> str:
    """The epoch record's key that ``metric`` names (``pq`` → ``val_pq``; for a semantic run, which has no PQ, the
    default ``pq`` means its mean Dice, ``val_mdice``); the validation loss, else the training loss, when it has
    none."""
    name = next((k for k in (metric, f"val_{metric}") if k in metrics), None)
    if name is None and metric == "pq" and "val_mdice" in metrics:
        name = "val_mdice"
    if name is None:
        name = "val_loss" if "val_loss" in metrics else "train_loss"
    return name


def _plot_curves(run_dir: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    scores = [k for k in ("val_pq", "val_mpq_plus", "val_mdice", "val_miou") if k in history[-1]]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 5, 3.5), squeeze=False)
    for key in ("train_loss", "val_loss"):
        if key in history[-1]:
            axes[0, 0].plot(epochs, [h.get(key) for h in history], label=key)
    axes[0, 0].set(xlabel="epoch", ylabel="loss")
    axes[0, 0].legend()
    for key in scores:
        axes[0, 1].plot(epochs, [h.get(key) if h.get(key) is not None else math.nan for h in history], label=key)
    if scores:
        axes[0, 1].set(xlabel="epoch", ylabel="validation score")
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
