"""Many decoders per pass: K configs trained from one read of the cache per epoch.

The loader serves the union of the configs' levels; every batch (read, decoded, dihedrally augmented, targets
computed once) goes through each decoder in turn, each taking its own levels, loss, optimizer and OneCycle
schedule. Each config writes a normal run directory (``cellembed score`` / ``tune`` work on it as on a run of
``cellembed fit-decoder``), resumes on its own after a kill, and ends with the same weights, optimizer moments
and loss curve as a separate ``fit_decoder`` run of the same config: its initial weights come from
:func:`~cellembed.train._fit._build_model` seeded with its ``seed``, and the batches are those the separate run
would see, because every setting that defines them must be shared (:data:`SHARED`, checked up front).

The one thing not shared is work after the batch: each decoder validates on its own pass over the validation
loader (the post-processing of its own maps dominates that pass anyway).
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable, Sequence

import torch

from cellembed.train._checkpoint import apply_state, read_state
from cellembed.train._fit import (
    FitConfig,
    FitResult,
    StepCallback,
    _build_model,
    _check_config,
    _device,
    _end_epoch,
    _finish_run,
    _level_names,
    _one_cycle,
    _prepare_run,
    _stop_early,
    _train_source,
    _train_step,
    _val_loader,
    data_seed,
    make_loss,
    validate,
)

SHARED = ("source", "cache", "val_cache", "batch_size", "memory", "augment", "oversample", "magnification", "head",
          "shuffle_buffer", "num_workers", "device")
"""FitConfig fields that define the data stream (with the data seed): equal in every config of ``fit_many``."""

ManyEpochCallback = Callable[[int, int, int, dict], None]  # (config index, epoch, epochs, metrics)
PruneCallback = Callable[[int, list[list[dict]]], Sequence[int]]  # (finished epochs, histories) -> indices to stop


def check_many(configs: Sequence[FitConfig]) -> None:
    """Refuse configs that cannot share one data stream, or that would write to the same run directory.

    Raises:
        ValueError: one line naming the two configs (by index and ``out``), the field and both values.
    """
    if not configs:
        raise ValueError("fit_many needs at least one config")
    first = configs[0]
    seen = {}
    for i, c in enumerate(configs):
        _check_config(c)
        if c.source != "cache":
            raise ValueError(f"config {i} ({c.out}): fit_many trains from a cache only (source 'cache', got "
                             f"{c.source!r}); run live decoders with `cellembed fit-decoder --source live`")
        if c.out in seen:
            raise ValueError(f"configs {seen[c.out]} and {i} both write to {c.out}; give each its own out")
        seen[c.out] = i
        for name in SHARED:
            if getattr(c, name) != getattr(first, name):
                raise ValueError(f"config {i} ({c.out}) has {name}={getattr(c, name)!r} but config 0 ({first.out}) "
                                 f"has {getattr(first, name)!r}; the decoders share one data stream, so set the "
                                 f"same {name} on every config (or train them separately)")
        if data_seed(c) != data_seed(first):
            raise ValueError(f"config {i} ({c.out}) reads the data in order {data_seed(c)} but config 0 "
                             f"({first.out}) in order {data_seed(first)} (data_seed defaults to seed); set the "
                             f"same data_seed on every config, e.g. data_seed={data_seed(first)}")


def union_levels(configs: Sequence[FitConfig], cached: list[str]) -> list[str] | None:
    """The levels the shared loader serves, in cache order: every level any config asks for (``None``: all)."""
    wanted = [_level_names(c.levels) for c in configs]
    if any(w is None for w in wanted):
        return None
    names = {n for w in wanted for n in w}
    unknown = sorted(names - set(cached))
    if unknown:
        raise ValueError(f"levels {', '.join(unknown)} are not cached (the cache holds {', '.join(cached)}); "
                         "pick levels from `cellembed info CACHE`")
    return [n for n in cached if n in names]


class _Member:
    """One decoder of the pass: its config, model, optimizer, schedule, run directory and history."""

    def __init__(self, config: FitConfig, source: dict, served: list[str], steps: int, device: torch.device):
        wanted = _level_names(config.levels)
        mine = [lv for lv in source["levels"] if wanted is None or lv["name"] in wanted]
        self.index = [served.index(lv["name"]) for lv in mine]
        self.config, self.source = config, {**source, "levels": mine}
        self.model, self.n_params, self.post = _build_model(config, self.source, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = _one_cycle(self.optimizer, config, steps)
        self.run_dir = _prepare_run(config, self.source, self.model, self.n_params, self.post)
        self.start, self.history, self.best = 0, [], None
        state = read_state(self.run_dir)
        if state is not None:
            self.start, self.history, self.best = apply_state(state, self.model, self.optimizer, self.scheduler)
        self.loss_fn = make_loss(config.head, config.loss)
        self.device, self.stopped = device, False
        self.total = self.seen = 0.0

    def active(self, epoch: int) -> bool:
        """Trains in ``epoch`` (0-based): not finished, not stopped early, not pruned."""
        c = self.config
        if epoch < len(self.history) or epoch >= c.epochs or self.stopped:
            return False
        self.stopped = _stop_early(c, self.history, self.best)
        return not self.stopped

    def step(self, batch) -> None:
        sub = _pick(batch, self.index)
        loss, self.lr = _train_step(self.model, sub, self.optimizer, self.scheduler, self.loss_fn, self.device,
                                    int(self.seen))
        size = len(batch.image)
        self.total, self.seen = self.total + loss * size, self.seen + size


def fit_many(configs: Sequence[FitConfig], on_epoch: ManyEpochCallback | None = None,
             on_step: StepCallback | None = None, prune: PruneCallback | None = None) -> list[FitResult]:
    """Train one decoder per config from a single read of the training cache per epoch.

    Each config writes its own run directory (as :func:`~cellembed.train.fit_decoder`) and gets the weights,
    optimizer state and history of a separate ``fit_decoder`` run of it: bit for bit on CPU (tested); on a GPU
    as closely as two separate runs there agree (cuDNN may pick other kernels; not tested). Configs may differ
    in levels, decoder and its options, loss, learning rate, schedule, epochs, patience, best metric,
    post-processing, tuning and ``seed`` (the initial weights); they must share :data:`SHARED` and the data
    seed (``data_seed``, or ``seed`` where unset): seed variants of one config need ``data_seed`` set, so that
    their separate runs would read the same batches too.

    Resuming: rerun with the same configs; each run continues from its own last finished epoch (after a kill
    between two runs' saves of one epoch, the runs behind redo that epoch alone).

    Args:
        configs: one per decoder.
        on_epoch: called after every run's finished (and saved) epoch with (config index, epoch, epochs, metrics).
        on_step: called after every batch (all decoders stepped) with its number of samples.
        prune: called before every epoch with (epochs finished, every run's history); the indices it returns
            stop training (their runs keep their state and best checkpoint, as after early stopping). For
            successive halving; it is asked again after a resume, so base its answer on ``history[:epoch]``
            alone and a rerun prunes as the first run did.

    Returns:
        One :class:`FitResult` per config, in order; ``seconds`` is the whole pass's wall time.

    Raises:
        ValueError: configs that cannot share a data stream (see :func:`check_many`), or any ``fit_decoder`` error.
        CacheError: a cache that is incomplete, corrupt, or lacks a config's levels.
    """
    t0 = time.perf_counter()
    check_many(configs)
    first = configs[0]
    device = _device(first.device)
    from cellembed.cache import open_cache

    served = union_levels(configs, open_cache(first.cache).level_names)
    shared = dataclasses.replace(first, levels=None if served is None else ",".join(served))
    train, source = _train_source(shared, device)
    served = [lv["name"] for lv in source["levels"]]
    val = _val_loader(shared, source, device, train)  # a bad validation cache is refused before runs are written
    members = [_Member(c, source, served, len(train), device) for c in configs]
    start = min([len(m.history) for m in members] + [max(c.epochs for c in configs)])
    for epoch in range(start, max(c.epochs for c in configs)):
        for i in prune(epoch, [m.history for m in members]) if prune else ():
            members[i].stopped = True
        active = [m for m in members if m.active(epoch)]
        if not active:
            break
        _train_epoch_many(active, train, epoch, on_step)
        for m in active:
            metrics = {"epoch": epoch + 1, "train_loss": m.total / max(m.seen, 1), "lr": m.lr,
                       "train_seconds": m.seconds}
            if val is not None:
                metrics.update(validate(m.model, _Levels(val, m.index), device, m.post, m.model.num_classes, m.loss_fn))
            m.best = _end_epoch(m.config, m.run_dir, m.model, m.optimizer, m.scheduler, metrics, m.history, m.best)
            if on_epoch:
                on_epoch(members.index(m), epoch + 1, m.config.epochs, metrics)
    for m in members:
        _finish_run(m.config, m.run_dir, m.history, m.best, m.post)
    seconds = time.perf_counter() - t0
    return [FitResult(m.run_dir, len(m.history) - m.start, m.best, m.history, m.n_params, seconds) for m in members]


def _train_epoch_many(active: list[_Member], train, epoch: int, on_step: StepCallback | None) -> None:
    """One pass over the training loader, every batch stepping every active decoder in config order.

    ``train_seconds`` of each run is the pass's wall time (data once, all K decoders), so K runs of one pass
    report the same value.
    """
    t = time.perf_counter()
    for m in active:
        m.model.train()
        m.total = m.seen = 0.0
    train.set_epoch(epoch)
    for batch in train:
        for m in active:
            m.step(batch)
        if on_step:
            on_step(len(batch.image))
    for m in active:
        m.seconds = time.perf_counter() - t


class _Levels:
    """A loader's batches with only the features at ``index`` (one decoder's levels among the served ones)."""

    def __init__(self, loader, index: list[int]):
        self.loader, self.index = loader, index

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield _pick(batch, self.index)


def _pick(batch, index: list[int]):
    """``batch`` with the features at ``index`` of its served levels."""
    return batch._replace(feats=[batch.feats[j] for j in index])


def parse_variant(text: str) -> dict:
    """``"levels=block_2,block_4 lr=1e-3 name=deep"`` → ``{"levels": "block_2,block_4", "lr": 0.001, ...}``.

    Whitespace separates ``KEY=VALUE`` pairs (quote a value holding spaces); values are read as YAML scalars
    (numbers, true / false, null), so they get the types :class:`FitConfig` checks. ``name`` names the run's
    folder.
    """
    import yaml

    out = {}
    for pair in shlex.split(text):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--variant {text!r}: {pair!r} is not KEY=VALUE (e.g. 'levels=block_2,block_4 lr=1e-3')")
        if key == "out":
            raise ValueError(f"--variant {text!r}: a variant's folder is <out>/<name>; give name=... instead of out=")
        out[key] = value if key in ("levels", "name") else _scalar(yaml.safe_load(value), value)
    return out


def _scalar(parsed, raw: str):
    """YAML reads 1e-3 as a string (it wants 1.0e-3); take it as the float it means."""
    if isinstance(parsed, str):
        try:
            return float(raw)
        except ValueError:
            return parsed
    return parsed


def variant_configs(base: FitConfig, variants: Sequence[str | dict], parent: str | None = None) -> list[FitConfig]:
    """One config per variant: ``base`` with the variant's fields, writing to ``<parent>/<name>``.

    The run folder's name is the variant's ``name``, else its pairs (``levels-block_2+block_4_lr-0.001``), else
    ``base``. Every config gets ``data_seed`` = the base's data seed, so seed variants read the same batches
    (and a separate ``fit-decoder --seed S --data-seed D`` reproduces any of them).

    Raises:
        ValueError: an unknown field or a value of the wrong type (named with the variant), or two variants
            with the same folder name.
    """
    from pathlib import Path

    from cellembed._config import from_dict

    parent = Path(parent or base.out)
    base_fields = {k: v for k, v in dataclasses.asdict(base).items()}
    configs, names = [], {}
    for v in variants:
        fields = parse_variant(v) if isinstance(v, str) else dict(v)
        name = str(fields.pop("name", "") or variant_name(fields))
        if name in names:
            raise ValueError(f"--variant {names[name]!r} and {v!r} both write to {parent / name}; add name=... "
                             "to one of them")
        names[name] = v
        data = {**base_fields, "data_seed": data_seed(base), **fields, "out": str(parent / name)}
        configs.append(from_dict(FitConfig, data, f"--variant {v!r}"))
    return configs


def variant_name(fields: dict) -> str:
    """A folder name from a variant's fields: ``{"levels": "a,b", "lr": 0.001}`` → ``levels-a+b_lr-0.001``."""
    if not fields:
        return "base"
    parts = [f"{k}-{str(v).replace(',', '+').replace('/', '_')}" for k, v in fields.items()]
    return "_".join(parts)
