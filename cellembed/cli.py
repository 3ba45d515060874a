"""The ``cellembed`` command line: thin wrappers that parse options, call the library, render with rich."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Frozen vision foundation models for cell segmentation: extract features once, "
                       "train decoders from the cache.")
console = Console(stderr=True)


def _stdout() -> Console:
    """Stdout console made at call time; wide and unwrapped when stdout is a file or pipe, so rows stay whole."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=200, soft_wrap=True)

# Errors a user can fix: printed as one red line with exit code 2, never as a traceback.
USER_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError)


def _version(value: bool) -> None:
    if value:
        from cellembed import __version__

        typer.echo(f"cellembed {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors "
                                     "(also CELLEMBED_DEBUG=1).")):
    """Frozen vision foundation models for cell segmentation: extract features once, train decoders from the cache."""
    global _DEBUG
    _DEBUG = debug


_DEBUG = False  # set by --debug for this invocation


def _fail(err: BaseException) -> None:
    if _DEBUG or os.environ.get("CELLEMBED_DEBUG"):
        raise err
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _progress_bar(disable: bool = False):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=False, disable=disable)


class _TileRate:
    """Tiles counted since the last ``restart`` and their rate, as the progress bars show it (" 12.3 tiles/s")."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> str:
        self.n += n
        return f"{self.n / max(time.perf_counter() - self.t0, 1e-9):6.1f} tiles/s"


class _ExtractProgress:
    """Renders extract progress: tiles done, tiles/s and MB/s written."""

    def __init__(self, bar):
        self.bar, self.task, self.t0, self.first = bar, None, None, None

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task("extract", total=total, rate="")
            self.t0, self.first = time.perf_counter(), done
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = f"{(done - self.first) / dt:6.1f} tiles/s  {nbytes / dt / 1e6:6.1f} MB/s"
        self.bar.update(self.task, completed=done, rate=rate)


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r} is not KEY=VALUE")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


# CLI option name → ExtractConfig / FitConfig field, where they differ.
_CLI_FIELDS = {"workers": "num_workers", "option": "dataset_options"}


@app.command()
def extract(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, help="YAML file with any of these options (field names of "
                                          "cellembed.cache.ExtractConfig); options given here win."),
    dataset: str | None = typer.Option(None, help="pannuke | conic | cytodark0 | folder | semantic_folder | "
                                       "synthetic [required]"),
    out: Path | None = typer.Option(None, help="Cache directory to write. [required]"),
    encoder: str | None = typer.Option(None, help="Encoder preset (see `cellembed encoders`). [required]"),
    root: Path | None = typer.Option(None, help="Dataset root (not needed for synthetic)."),
    split: str = typer.Option("all", help="all | train | val | test"),
    folds: Path | None = typer.Option(None, help="A folds.csv (img_id,fold with 0/1/2 = train/val/test)."),
    scheme: str | None = typer.Option(None, help="Split scheme: pannuke-official[:T,V,E] | cisca | folds-csv | all."),
    blocks: str = typer.Option("default", help="shallow | deep | mixed | stages | default | all (every block; every "
                               "stage end of hierarchical models: pick subsets at fit time with fit-decoder --levels) "
                               "| explicit list like 2,5,10,20"),
    weights: str = typer.Option("hub", help="hub | random | packaged | PATH to a weights file"),
    input_policy: str = typer.Option("auto", help="auto (native-grid for CNN / hierarchical encoders, resize for "
                                     "ViTs) | resize (to the encoder's native size) | native-grid (keep the tile's scale)"),
    dtype: str = typer.Option("fp16", help="Storage dtype: fp16 | bf16 | fp32"),
    codec: str = typer.Option("none", help="Per-level storage: none (every level in --dtype) | int8 | int4 (every "
                              "level quantized with a per-tile, per-channel absmax scale: about 1/2 and 1/4 of the "
                              "fp16 feature bytes) | pcaK (K principal-component coefficients per position in "
                              "--dtype, 1 <= K <= channels; basis fitted on --pca-tiles tiles first and kept in "
                              "pca.safetensors) | level=codec pairs, e.g. block_1=int8,block_6=pca64 (codecs "
                              "fp16 | bf16 | fp32 | int8 | int4 | pcaK). Read back transparently (dequantized or "
                              "reconstructed to all channels in --dtype)."),
    pca_tiles: int = typer.Option(256, min=1, help="pcaK codecs: fit the basis on the first N tiles of the cache."),
    pca_basis: str | None = typer.Option(None, help="pcaK codecs: project on this cache's basis (its folder or its "
                                         "pca.safetensors) instead of fitting one, e.g. the training cache's for "
                                         "the validation and test caches."),
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes decoding tiles."),
    shard_size: int = typer.Option(256, min=1, help="Tiles per shard."),
    augment_views: int = typer.Option(0, min=0, help="Training caches: store K augmented copies of every tile "
                                      "(CISCA's stain, blur, colour, elastic steps; encoded once); fit-decoder "
                                      "then serves one of the K + 1 views per tile per epoch, so an epoch costs "
                                      "the same and the run sees image-space augmentation a cache cannot apply "
                                      "to features. K + 1 times the extraction time and disk."),
    option: list[str] = typer.Option([], "--option", "-o", help="Dataset option KEY=VALUE, repeatable "
                                     "(synthetic: n_tiles, seed, size; cytodark0: magnification, size; folder: "
                                     "group_regex, e.g. '(.+)_\\d+$' to group tiles by source image)."),
    overwrite: bool = typer.Option(False, help="Replace a different cache already in --out."),
    repair: bool = typer.Option(False, help="Check a finished cache against its manifest and re-extract only the "
                                "missing, truncated or corrupt shards (same options as the run that made it)."),
    rank: int | None = typer.Option(None, help="This process's rank (default: $RANK or 0)."),
    world_size: int | None = typer.Option(None, help="Number of processes (default: $WORLD_SIZE or 1)."),
):
    """Run a frozen encoder once over every tile and write a WebDataset feature cache."""
    from cellembed.cache import CacheError, ExtractConfig
    from cellembed.cache import extract as run_extract

    try:
        cfg = _merge_config(ctx, config, ExtractConfig, _CLI_FIELDS)
    except USER_ERRORS as err:
        _fail(err)
    try:
        with _progress_bar() as bar:
            result = run_extract(cfg, progress=_ExtractProgress(bar))
    except (CacheError, *USER_ERRORS) as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished shards are kept; rerun the same command to resume")
        raise typer.Exit(130)
    rate = result.n_written / max(result.encode_seconds, 1e-9)
    console.print(f"[green]cache[/] {result.out}  key {result.cache_key}  tiles {result.n_tiles}  "
                  f"encoded now {result.n_written} ({rate:.1f} tiles/s)  reused {result.n_skipped}")
    if cfg.repair:
        console.print(f"[green]repaired[/] {len(result.rewritten)} shard(s): {', '.join(result.rewritten) or 'none needed'}"
                      + (f"; [yellow]bytes differ from the old manifest:[/] {', '.join(result.changed)}"
                         if result.changed else ""))
    if result.manifest is None:
        console.print("[yellow]manifest pending:[/] other ranks are still writing; the last to finish writes it")


def _merge_config(ctx: typer.Context, path: Path | None, cls, fields: dict, skip: tuple[str, ...] = ()):
    """Merge a YAML config with the options given on the command line (those win) into a config dataclass
    (options in ``skip`` are the command's own, not fields)."""
    from cellembed._config import from_dict, load_yaml

    data = load_yaml(path) if path else {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        explicit = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        if name == "config" or name in skip or (path and not explicit):
            continue
        if name == "option":
            value = {**data.get("dataset_options", {}), **_parse_options(value)}
        elif isinstance(value, Path):
            value = str(value)
        if value is not None or explicit:
            data[fields.get(name, name)] = value
    return from_dict(cls, data, str(path) if path else "command line")


@app.command("fit-decoder")
def fit_decoder(
    ctx: typer.Context,
    cache: str | None = typer.Argument(None, help="Training cache (from `cellembed extract`): a directory, or a remote "
                                        "location (s3://bucket/cache, pipe:cat /data/cache/{}); not with --source live."),
    out: Path | None = typer.Option(None, help="Run directory: model.safetensors (best), config.json, "
                                       "metrics.jsonl, curves.png, last.* (resume state). [required]"),
    val_cache: str | None = typer.Option(None, help="Validation cache (directory or remote location) from the same "
                                         "encoder and blocks: losses, PQ and mPQ+ every epoch."),
    config: Path | None = typer.Option(None, help="YAML file with any of these options (field names of "
                                          "cellembed.train.FitConfig); options given here win."),
    decoder: str = typer.Option("unetr", help="unetr (Mind the Gap) | light (FM benchmark, ~2.6 M parameters)"),
    head: str = typer.Option("cisca", help="cisca | hovernet | semantic"),
    loss: str = typer.Option("mindthegap-msge", help="mindthegap-msge (Mind the Gap's + the MSGE of the directional "
                             "maps) | mindthegap | cisca (CISCA's exact weighting) | semantic (CE + Dice; the "
                             "semantic head uses it whatever is named)"),
    epochs: int = typer.Option(20, min=1, help="Epochs (Mind the Gap: 100 at --lr 1e-4 --batch-size 16)."),
    batch_size: int = typer.Option(4, min=1, help="Global batch: under torchrun each of the N processes takes "
                                   "batch-size / N per step (must divide), so N processes train like one with this "
                                   "batch."),
    lr: float = typer.Option(3e-3, help="OneCycle peak learning rate (30% warm-up, down to 1e-6)."),
    memory: str = typer.Option("auto", help="stream | ram | gpu | auto (gpu if it fits, else ram, else stream)"),
    augment: str = typer.Option("auto", help="auto | none | dihedral (flip/rot90 of every level and the GT) | "
                                "full (live only: flips, rot90, colour, elastic); auto = dihedral from a cache, full live"),
    oversample: str = typer.Option("none", help="none | cisca-pannuke | cisca-conic (CISCA's rare-class "
                                   "oversampling of the training list)"),
    magnification: str = typer.Option("40x", help="20x | 40x: CISCA target footprints and post-processing"),
    postprocess: str | None = typer.Option(None, help="Post-processing preset (cisca: 40x, 20x, pannuke, conic, "
                                              "monuseg, cytodark0_40x, cytodark0_20x). Default: the dataset's."),
    levels: str | None = typer.Option(None, help="Subset of cached levels, e.g. block_17,block_23."),
    image_skip: bool | None = typer.Option(None, "--image-skip/--no-image-skip", help="Feed the raw tile kept in the "
                                           "cache to the decoder (default: on for unetr, off for light)."),
    refine: bool = typer.Option(True, "--refine/--no-refine", help="unetr: BatchNorm fuse convs and a "
                                "full-resolution refinement (with --image-skip: image features at full and half "
                                "resolution); --no-refine: Mind the Gap's narrow 16-channel full-resolution conv."),
    patience: int | None = typer.Option(None, min=1, help="Stop after this many epochs without a better "
                                        "--best-metric (early stopping; default: run every epoch)."),
    image_levels: int = typer.Option(2, min=2, max=3, help="unetr --refine --image-skip: image features at full "
                                     "and 1/2 resolution (2), or also at 1/4 (3)."),
    full_channels: int | None = typer.Option(None, min=1, help="unetr: width of the full-resolution layers "
                                             "(default: 16 with --refine and --no-refine). Wider fits CoNSeP "
                                             "better and costs more per step (README, accuracy)."),
    level_depth: int = typer.Option(1, min=1, help="unetr: 3×3 conv blocks per decoder level at reductions 2 to "
                                    "16 (the deepest level gets level_depth - 1 of its own)."),
    split_trunks: bool = typer.Option(False, "--split-trunks/--shared-trunk", help="unetr --refine: each "
                                      "full-resolution map (3-class, directional) gets its own refinement stack, "
                                      "as CISCA's separate heads (default: one shared stack)."),
    type_branch: bool = typer.Option(True, "--type-branch/--no-type-branch", help="unetr: predict the type map "
                                     "from its own half-resolution branch (default); --no-type-branch: from the "
                                     "shared full-resolution features, as before (the demo's type head collapsed "
                                     "to one class that way)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="After training, pick the minimum instance area on "
                              "--val-cache (as `cellembed tune`) and save it with the run."),
    best_metric: str = typer.Option("pq", help="Validation value that picks model.safetensors: pq | mpq_plus | "
                                    "aji | mdice | loss ... (lower is better for losses; a semantic run's default pq means mdice)."),
    seed: int = typer.Option(0, help="Seeds the initial weights, and the batch order unless --data-seed is given."),
    data_seed: int | None = typer.Option(None, help="Seed of the batch order and augmentation draws (default: "
                                         "--seed)."),
    variant: list[str] = typer.Option([], "--variant", help="Train several decoders from one read of the cache per "
                                      "epoch: one per --variant 'KEY=VALUE ...' (FitConfig fields over these options, "
                                      "e.g. 'levels=block_2,block_4 lr=1e-3', 'seed=1', 'decoder=light name=L'; '' "
                                      "for these options alone); each a normal run in --out/<name>."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(2, min=0, help="Loader worker processes."),
    shuffle_buffer: str = typer.Option("auto", callback=lambda v: int(v) if v.isdigit() else v, help="Samples each stream-mode reader holds to shuffle: auto "
                                       "(as many as fit in 64 MB, 16..512) or a number. Part of the batch order."),
    overwrite: bool = typer.Option(False, help="Replace another run in --out."),
    source: str = typer.Option("cache", help="cache | live (the encoder runs in the loop; needs --dataset, "
                               "--encoder)"),
    dataset: str | None = typer.Option(None, help="live: pannuke | conic | cytodark0 | folder | semantic_folder | synthetic"),
    root: Path | None = typer.Option(None, help="live: dataset root."),
    split: str = typer.Option("train", help="live: the training split."),
    folds: Path | None = typer.Option(None, help="live: a folds.csv."),
    encoder: str | None = typer.Option(None, help="live: encoder preset."),
    blocks: str = typer.Option("default", help="live: block preset or list."),
    weights: str = typer.Option("hub", help="live: hub | random | packaged | PATH"),
    input_policy: str = typer.Option("auto", help="live: auto | resize | native-grid (as for extract)"),
    dtype: str = typer.Option("fp16", help="live: feature dtype, as the cache would store it"),
    option: list[str] = typer.Option([], "--option", "-o", help="live: dataset option KEY=VALUE, repeatable."),
):
    """Train a decoder from a feature cache at the speed of the decoder (resumes an interrupted run).

    Several processes train one model with DDP: torchrun --standalone --nproc_per_node=N -m cellembed fit-decoder
    ... (gloo on CPU, nccl on GPU LOCAL_RANK; rank 0 writes the run; rerun the same command to resume).
    """
    from cellembed.cache import CacheError
    from cellembed.train import FitConfig
    from cellembed.train import fit_decoder as run_fit
    from cellembed.train._ddp import reported_by_rank0

    main, world = int(os.environ.get("RANK", 0)) == 0, int(os.environ.get("WORLD_SIZE", 1))

    try:
        cfg = _merge_config(ctx, config, FitConfig, _CLI_FIELDS, skip=("variant",))
    except USER_ERRORS as err:
        _fail(err)
    if variant:
        return _fit_many(cfg, variant)
    try:
        with _progress_bar(disable=not main) as bar:
            task = bar.add_task("fit", total=None, rate="")
            state, tiles = {"epoch": ""}, _TileRate()

            def on_step(size):
                rate = tiles.add(size * world)  # every rank steps with the same share of the global batch
                bar.update(task, advance=1, rate=f"{rate}  {state['epoch']}")

            def on_epoch(epoch, total, metrics):
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                  if k in ("train_loss", "val_loss", "val_pq", "val_mpq_plus", "val_mdice")
                                  and v is not None)
                state["epoch"] = f"epoch {epoch}/{total}  {shown}"
                bar.update(task, description="fit", rate=state["epoch"])

            result = run_fit(cfg, on_epoch=on_epoch, on_step=on_step)
    except (CacheError, FloatingPointError, *USER_ERRORS) as err:
        if reported_by_rank0(err):
            raise typer.Exit(2) from None
        _fail(err)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished epochs are kept; rerun the same command to resume")
        raise typer.Exit(130)
    if not main:
        return
    best = result.best or {}
    value = best.get("value")
    console.print(f"[green]run[/] {result.run_dir}  decoder parameters {result.n_params:,}  epochs run now "
                  f"{result.epochs_run}  best {best.get('metric')} "
                  f"{'-' if value is None else format(value, '.4f')} at epoch {best.get('epoch')}  "
                  f"({result.seconds:.1f} s)")


def _fit_many(base, variants: list[str]) -> None:
    """``fit-decoder --variant ...``: the decoders of one pass, a progress bar with the pass's rate, a table."""
    from cellembed.cache import CacheError
    from cellembed.train import fit_many, variant_configs

    try:
        configs = variant_configs(base, variants)
        with _progress_bar() as bar:
            task = bar.add_task(f"fit x{len(configs)}", total=None, rate="")
            state, tiles = {"epoch": ""}, _TileRate()

            def on_step(size):
                bar.update(task, advance=1, rate=f"{tiles.add(size)} x {len(configs)} decoders  {state['epoch']}")

            def on_epoch(index, epoch, total, metrics):
                pq = metrics.get("val_pq")
                state["epoch"] = f"epoch {epoch}/{total}" + ("" if pq is None else f"  {Path(configs[index].out).name} "
                                                             f"val_pq {pq:.4f}")

            results = fit_many(configs, on_epoch=on_epoch, on_step=on_step)
    except (CacheError, FloatingPointError, *USER_ERRORS) as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished epochs of every run are kept; rerun the same command to resume")
        raise typer.Exit(130)
    table = Table(title=f"{len(results)} decoders, one pass per epoch ({results[0].seconds:.1f} s)")
    for col in ("run", "levels", "parameters", "epochs run now", "best", "value", "at epoch"):
        table.add_column(col, justify="left" if col in ("run", "levels", "best") else "right")
    for c, r in zip(configs, results):
        best = r.best or {}
        value = best.get("value")
        table.add_row(str(r.run_dir), c.levels or "all", f"{r.n_params:,}", str(r.epochs_run), str(best.get("metric")),
                      "-" if value is None else f"{value:.4f}", str(best.get("epoch")))
    _stdout().print(table)


@app.command("search-blocks")
def search_blocks(
    ctx: typer.Context,
    cache: str = typer.Argument(..., help="Training cache holding the levels to combine (e.g. `extract --blocks "
                                "all`)."),
    val_cache: str = typer.Option(..., help="Validation cache of the same encoder: candidates are ranked by its "
                                  "score."),
    out: Path = typer.Option(..., help="Search folder: runs/<levels>/ (one normal run per candidate), search.json, "
                             "search.md, search.png."),
    strategy: str = typer.Option("greedy", help="greedy (forward selection: best single level, then add the level "
                                 "that helps most, until none helps) | halving (successive halving over the subsets "
                                 "of 1..--max-levels levels, trained in one pass)"),
    budget: int | None = typer.Option(None, min=1, help="The most decoders trained (greedy: stop before a round that "
                                      "would exceed it; halving: a seeded sample of this many subsets). Default: no "
                                      "limit / every subset."),
    max_levels: int = typer.Option(4, min=1, help="The largest combination tried."),
    min_gain: float = typer.Option(0.0, help="greedy: how much an added level must raise the score to be kept."),
    min_rung: int | None = typer.Option(None, min=1, help="halving: the earliest epoch after which candidates are "
                                        "dropped (default: the end of the OneCycle warmup, ceil(0.3 x --epochs); "
                                        "validation scores during the warmup rank little)."),
    levels: str | None = typer.Option(None, help="The levels to combine, e.g. block_2,block_5,block_8 (default: "
                                      "every cached level)."),
    config: Path | None = typer.Option(None, help="YAML file with any FitConfig field for every candidate (decoder, "
                                          "loss, augment, ...); options given here win."),
    epochs: int = typer.Option(20, min=1, help="Epochs per candidate (halving: of the candidates that survive)."),
    batch_size: int = typer.Option(4, min=1),
    lr: float = typer.Option(3e-3, help="OneCycle peak learning rate of every candidate."),
    decoder: str = typer.Option("unetr", help="unetr | light"),
    best_metric: str = typer.Option("pq", help="The validation value that scores a candidate: pq | mpq_plus | aji | "
                                    "loss ... (lower is better for losses)."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Tune the best run's minimum area on --val-cache."),
    seed: int = typer.Option(0, help="Seeds every candidate's weights and the shared batch order."),
    memory: str = typer.Option("auto", help="stream | ram | gpu | auto"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(2, min=0, help="Loader worker processes."),
    overwrite: bool = typer.Option(False, help="Replace runs in --out/runs trained with other settings."),
):
    """Rank combinations of cached levels (blocks) by validation score, many decoders per pass over the cache."""
    from cellembed.cache import CacheError
    from cellembed.train import FitConfig
    from cellembed.train import search_blocks as run_search

    try:
        cfg = _merge_config(ctx, config, FitConfig, _CLI_FIELDS, skip=("strategy", "budget", "max_levels", "min_gain",
                                                                              "min_rung"))
    except USER_ERRORS as err:
        _fail(err)
    try:
        with _progress_bar() as bar:
            state, tiles = {"task": None, "k": 0}, _TileRate()

            def on_round(round_, combos):
                state.update(task=bar.add_task(f"round {round_}: {len(combos)} decoders", total=None, rate=""),
                             k=len(combos))
                tiles.restart()

            def on_step(size):
                bar.update(state["task"], advance=1, rate=f"{tiles.add(size)} x {state['k']} decoders")

            result = run_search(cfg, strategy=strategy, budget=budget, max_levels=max_levels, min_gain=min_gain,
                                min_rung=min_rung, on_round=on_round, on_step=on_step)
    except (CacheError, FloatingPointError, *USER_ERRORS) as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] finished epochs are kept; rerun the same command to resume")
        raise typer.Exit(130)
    table = Table(title=f"search-blocks ({strategy}) by {best_metric}: {result.stopped}")
    for col in ("rank", "levels", "round", best_metric, "epochs", "parameters"):
        table.add_column(col, justify="left" if col == "levels" else "right")
    for r in result.table:
        table.add_row(str(r["rank"]), "+".join(r["levels"]), str(r["round"]), f"{r['score']:.4f}", str(r["epochs"]),
                      f"{r['parameters']:,}")
    _stdout().print(table)
    console.print(f"[green]best[/] {'+'.join(result.best['levels'])}  run {result.best['run']}  "
                  f"({result.seconds:.1f} s); wrote {result.out}/search.json, search.md, search.png")


@app.command()
def info(cache: str = typer.Argument(..., help="Cache directory, or a remote location (s3://bucket/cache, "
                                               "pipe:cat /data/cache/{}).")):
    """Print a cache's manifest as tables."""
    from cellembed.cache import CacheError, read_manifest

    try:
        manifest = read_manifest(cache)
    except CacheError as err:
        _fail(err)
    ident = manifest["identity"]
    enc = ident["encoder"]
    summary = Table(title=f"cache {cache}", show_header=False)
    for name, value in [
        ("cache_key", manifest["cache_key"]), ("encoder", enc.get("encoder")), ("weights", enc.get("weights_id")),
        ("blocks", enc.get("blocks")), ("input", f"{enc.get('input_policy')} {enc.get('input_hw')}"),
        ("dtype / compute", f"{ident['dtype']} / {ident['compute']}"),
        ("codec", ", ".join(f"{k}={v}" for k, v in ident["codec"].items()) if "codec" in ident else "none"),
        *([("pca basis", f"{ident['pca']['file']} (sha256 {ident['pca']['sha256'][:12]}…, fitted on "
                         f"{ident['pca']['fit_tiles']} tiles)")] if "pca" in ident else []),
        ("dataset", json.dumps(ident["dataset"])),
        ("split", f"{ident['split']['split']} ({ident['split']['scheme']})"),
        ("tiles", f"{manifest['n_samples']} of {manifest['n_tiles']}, {manifest['tile_size']} px"),
        ("classes", ", ".join(manifest["class_names"])), ("shards", len(manifest["shards"])),
        ("size", f"{manifest['n_bytes'] / 1e6:.1f} MB"), ("versions", json.dumps(manifest["versions"])),
    ]:
        summary.add_row(name, str(value))
    levels = Table(title="levels")
    for col in ("name", "block", "channels", "grid", "stride", "mean of channel means", "mean of channel stds",
                "pca (K, explained var.)"):
        levels.add_column(col)
    for lv in manifest["levels"]:
        mean = sum(lv.get("mean", [0])) / max(len(lv.get("mean", [0])), 1)
        std = sum(lv.get("std", [0])) / max(len(lv.get("std", [0])), 1)
        levels.add_row(lv["name"], str(lv["block"]), str(lv["channels"]), "x".join(map(str, lv["grid"])),
                       f"{lv['stride']:.2f}", f"{mean:.4f}", f"{std:.4f}",
                       f"{lv['pca']['k']}, {lv['pca']['explained_variance']:.4f}" if "pca" in lv else "-")
    out = _stdout()
    out.print(summary)
    out.print(levels)


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache directory, or a remote location (each shard streamed and "
                                                 "hashed).")):
    """Re-hash every shard and report any that is missing, truncated or corrupt."""
    from cellembed.cache import CacheError, verify_cache
    from cellembed.cache._location import is_remote, member_url

    try:
        with _progress_bar() as bar:
            task = bar.add_task("verify", total=None, rate="")
            report = verify_cache(cache, progress=lambda d, t: bar.update(task, completed=d // 2**20,
                                                                           total=t // 2**20, rate="MiB"))
    except CacheError as err:
        _fail(err)
    for p in report.problems:
        colour = "yellow" if p.problem == "unlisted" else "red"
        where = member_url(cache, p.shard) if is_remote(cache) else Path(cache) / p.shard
        _stdout().print(f"[{colour}]{p.problem:9s}[/] {where}: {p.detail}")
    if report.ok:
        _stdout().print(f"[green]ok[/] {report.n_shards} shards, {report.n_samples} tiles, "
                          f"{report.n_bytes / 1e6:.1f} MB verified")
    else:
        _stdout().print(f"[red]{sum(p.problem != 'unlisted' for p in report.problems)} bad shard(s)[/]: rerun "
                          "the same `cellembed extract` command to rebuild them")
        raise typer.Exit(1)


@app.command()
def score(
    run: Path | None = typer.Argument(None, help="A run from `cellembed fit-decoder` (with --cache)."),
    cache: str | None = typer.Option(None, help="Test cache of the run's encoder (directory or remote location): "
                                      "predict, post-process, score."),
    out: Path | None = typer.Option(None, help="With RUN: output folder (default RUN/score-<cache name>)."),
    pred: Path | None = typer.Option(None, help="Predictions .npy: (N, H, W, 2) instance + type, or (N, H, W) "
                                        "instances."),
    true: Path | None = typer.Option(None, help="Ground truth .npy, same layout as --pred."),
    num_classes: int | None = typer.Option(None, help="With --pred: number of nucleus classes K (CoNIC 6, "
                                              "PanNuke 5); mPQ+ averages over all K. Default: the largest type present."),
    tissues: Path | None = typer.Option(None, help="With --pred: .npy of N tissue names: adds PanNuke's bPQ / mPQ."),
    json_out: Path | None = typer.Option(None, "--json", help="With --pred: write the full metrics JSON here."),
    device: str = typer.Option("auto", help="With RUN: auto | cpu | cuda"),
    batch_size: int = typer.Option(16, min=1, help="With RUN: decoder batch size."),
    workers: int = typer.Option(2, min=0, help="With RUN: cache reader worker processes."),
    overwrite: bool = typer.Option(False, help="With RUN: replace earlier scores in the output folder."),
    tta: bool = typer.Option(False, help="With RUN: average the decoder's maps over the 8 flips / quarter turns "
                             "(not in the CISCA / Mind the Gap protocol; CoNSeP: +0.001 PQ, README)."),
):
    """Score a run on a test cache (RUN --cache), or any two label arrays (--pred --true): official PQ, mPQ+, AJI;
    a semantic run: Dice and IoU per class and their means."""
    from cellembed.cache import CacheError
    from cellembed.cache._location import location_name

    if run is not None:
        if cache is None or pred is not None or true is not None:
            _fail(ValueError("give RUN with --cache TEST_CACHE, or --pred P.npy --true T.npy without RUN"))
        try:
            with _progress_bar() as bar:
                task = bar.add_task("score", total=None, rate="")
                tiles = _TileRate()

                def progress(n):
                    bar.update(task, advance=n, rate=tiles.add(n))

                from cellembed.evaluate import score_run

                result = score_run(run, cache, out, device=device, batch_size=batch_size, num_workers=workers,
                                   on_progress=progress, overwrite=overwrite, tta=tta)
        except (CacheError, *USER_ERRORS) as err:
            _fail(err)
        title = f"{run.name} on {location_name(cache)} ({result.metrics['protocol']['n_images']} images)"
        if "mdice" in result.metrics["summary"]:
            _print_semantic(result.metrics, title)
        else:
            _print_scores(result.metrics, title)
        console.print(f"[green]wrote[/] {result.out}: predictions.npy, keys.txt, metrics.json, table.md, overlays "
                      f"({result.seconds:.1f} s)")
        return
    if pred is None or true is None or cache is not None:
        _fail(ValueError("give --pred P.npy --true T.npy, or RUN --cache TEST_CACHE"))
    from cellembed.metrics import score_arrays

    try:
        arrays = [_load_npy(p) for p in (pred, true)]
        names = None if tissues is None else [str(t) for t in _load_npy(tissues)]
        result = score_arrays(arrays[0], arrays[1], num_classes=num_classes, tissues=names)
    except USER_ERRORS as err:
        _fail(err)
    _print_scores(result, f"{pred.name} vs {true.name} ({len(result['per_image'])} images)")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        console.print(f"[green]wrote[/] {json_out}")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="A run from `cellembed fit-decoder` (cisca or hovernet head)."),
    inputs: list[Path] = typer.Argument(..., help="Images (PNG, JPEG, TIFF) of any size and / or whole-slide images "
                                        "(.svs, .ndpi, pyramidal TIFF, ... read with tiffslide)."),
    out: Path = typer.Option(..., help="Output folder: per input <name>.geojson, <name>.cells.csv, "
                             "<name>.overlay.png; predictions.npy for same-sized images; predict.json."),
    mpp: str | None = typer.Option(None, help="Input pixel size in µm (overrides the file's), or 'run': already at "
                                   "the run's pixel size. Needed for PNG / JPEG (no metadata)."),
    target_mpp: float | None = typer.Option(None, help="The run's pixel size in µm (default: 0.25 for a 40x run, "
                                            "0.5 for 20x); inputs are resampled to it."),
    tissue: str = typer.Option("auto", help="auto | on | off: skip tiles without tissue (found on a thumbnail); "
                               "auto = on for whole slides, off for images."),
    region: int = typer.Option(2048, min=64, help="Side of the regions post-processed one at a time (memory)."),
    batch_size: int = typer.Option(16, min=1, help="Tiles per encoder + decoder batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    weights: str | None = typer.Option(None, help="Encoder weights file, when the run's encoder came from one."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out."),
):
    """Predict cells on images of any size and whole slides: seam-free tiled inference, GeoJSON, cell table, overlay."""
    from cellembed.predict import InputError, PredictConfig
    from cellembed.predict import predict as run_predict

    if mpp is not None and mpp != "run":
        try:
            mpp = float(mpp)
        except ValueError:
            _fail(ValueError(f"--mpp {mpp!r}: give microns per pixel (e.g. 0.25) or 'run'"))
    config = PredictConfig(run=str(run), inputs=[str(p) for p in inputs], out=str(out), mpp=mpp,
                           target_mpp=target_mpp, tissue=tissue, region=region, batch_size=batch_size,
                           device=device, weights=weights, overwrite=overwrite)
    try:
        with _progress_bar() as bar:
            task = {"id": None, "t0": 0.0}

            def progress(done: int, total: int) -> None:
                if task["id"] is None:
                    task["id"], task["t0"] = bar.add_task("predict", total=total, rate=""), time.perf_counter()
                rate = done / max(time.perf_counter() - task["t0"], 1e-9)
                bar.update(task["id"], completed=done, rate=f"{rate:6.1f} tiles/s")

            result = run_predict(config, on_progress=progress, log=lambda line: bar.console.print(line, highlight=False))
    except (InputError, FileExistsError, *USER_ERRORS) as err:
        _fail(err)
    cells = sum(i["cells"] for i in result.images)
    console.print(f"[green]wrote[/] {result.out}: {cells} cells from {len(result.images)} input(s) "
                  f"({result.seconds:.1f} s): *.geojson, *.cells.csv, *.overlay.png, predict.json")


def _print_scores(result: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("aggregation")
    rules = {"pq_conic": "mean over all images (empty → 0)", "mpq_plus": "pooled per class, mean over classes"}
    for key, value in result["summary"].items():
        table.add_row(key, "-" if value is None else f"{value:.4f}", rules.get(key, "mean over images with GT"))
    if result.get("pannuke"):
        for key in ("bpq", "mpq"):
            value = result["pannuke"][key]
            table.add_row(f"pannuke {key}", "-" if value is None else f"{value:.4f}", "mean per tissue, then over tissues")
    if result.get("run"):
        table.add_row("decoder params", f"{result['run']['decoder_parameters']:,}", "trainable")
    _stdout().print(table)


def _print_semantic(result: dict, title: str) -> None:
    """Dice and IoU per class, then the means (semantic runs)."""
    table = Table(title=title, caption="pixel counts pooled over the split; means over the classes present")
    for col in ("class", "Dice", "IoU", "true pixels", "predicted pixels"):
        table.add_column(col, justify="left" if col == "class" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for v in result["per_class"].values():
        table.add_row(v["name"], fmt(v["dice"]), fmt(v["iou"]), f"{v['true']:,}", f"{v['predicted']:,}")
    s = result["summary"]
    table.add_row("[b]mean[/]", f"[b]{fmt(s['mdice'])}[/]", f"[b]{fmt(s['miou'])}[/]", "", "")
    table.add_row("pixel accuracy", fmt(s["pixel_accuracy"]), "", "", "")
    table.add_row("decoder params", f"{result['run']['decoder_parameters']:,}", "", "", "")
    _stdout().print(table)


@app.command()
def tune(
    run: Path = typer.Argument(..., help="A run from `cellembed fit-decoder`."),
    cache: str = typer.Option(..., help="Validation cache of the run's encoder (directory or remote location)."),
    metric: str = typer.Option("pq", help="Summary metric to maximise: pq | mpq_plus | aji | ..."),
    areas: str | None = typer.Option(None, help="Candidate minimum areas, e.g. 0,20,40,80 (default: the "
                                        "preset's area x 0..2)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(16, min=1),
    workers: int = typer.Option(2, min=0),
):
    """Pick the run's minimum instance area on a validation cache (saved with the run, used by `score`)."""
    from cellembed.cache import CacheError
    from cellembed.cache._location import location_name
    from cellembed.evaluate import tune_run

    try:
        candidates = [int(a) for a in areas.split(",")] if areas else None
        with _progress_bar() as bar:
            task = bar.add_task("tune", total=None, rate="")
            result = tune_run(run, cache, metric=metric, areas=candidates, device=device, batch_size=batch_size,
                              num_workers=workers, on_progress=lambda n: bar.update(task, advance=n))
    except (CacheError, *USER_ERRORS) as err:
        _fail(err)
    table = Table(title=f"minimum area on {location_name(cache)} (by {metric})")
    for col in ("min_area", "pq", "mpq_plus", "aji"):
        table.add_column(col, justify="right")
    for row in result["table"]:
        mark = " *" if row["min_area"] == result["min_area"] else ""
        table.add_row(f"{row['min_area']}{mark}", *("-" if row[k] is None else f"{row[k]:.4f}"
                                                     for k in ("pq", "mpq_plus", "aji")))
    _stdout().print(table)
    console.print(f"[green]saved[/] min_area {result['min_area']} to {run / 'config.json'}")


def _load_npy(path: Path):
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a plain .npy array ({err})") from None


@app.command()
def encoders():
    """List encoder presets: blocks, input size, dims, licence."""
    from cellembed.encoders import list_specs

    table = Table(title="encoder presets")
    for col in ("preset", "source", "depth x dim", "patch / prefix", "input", "blocks (default first)", "licence"):
        table.add_column(col, overflow="fold")
    table.columns[0].no_wrap = True
    for spec in list_specs():
        names = [spec.default_blocks] + [k for k in spec.block_presets if k != spec.default_blocks]
        presets = "\n".join(f"{k} {list(spec.block_presets[k])}" for k in names if k in spec.block_presets)
        patch = f"{spec.patch_size or '-'} / {spec.num_prefix_tokens}"
        licence = spec.licence + (" (gated)" if spec.gated else "")
        table.add_row(spec.name, spec.source, f"{spec.depth} x {spec.embed_dim}", patch, str(spec.input_size),
                      presets, licence)
    _stdout().print(table)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write (folder format: images/, labels/, classes.txt)."),
    tiles: int = typer.Option(64, min=1, help="Number of tiles."),
    seed: int = typer.Option(0, help="Generator seed."),
    size: int = typer.Option(256, min=32, help="Tile side in pixels."),
    overwrite: bool = typer.Option(False, help="Replace an existing folder."),
):
    """Write a seeded synthetic H&E-like nuclei dataset in the folder format."""
    from cellembed.data import write_synthetic_dataset

    try:
        with _progress_bar() as bar:
            task = bar.add_task("synth", total=tiles, rate="")
            path = write_synthetic_dataset(out, tiles, seed, size=size, overwrite=overwrite,
                                           progress=lambda n: bar.update(task, completed=n))
    except USER_ERRORS as err:
        _fail(err)
    console.print(f"[green]wrote[/] {tiles} tiles to {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("cellembed-demo"), help="Folder for the demo's outputs."),
    tiles: int = typer.Option(64, min=8, help="Synthetic tiles to generate (split 72/8/20)."),
    epochs: int = typer.Option(20, min=0, help="Decoder epochs (0: stop after extraction)."),
):
    """Run the pipeline end to end: synthetic tiles → EfficientNet-Lite0 caches → decoder → test scores."""
    from cellembed.demo import run_demo

    try:
        with _progress_bar() as bar:
            fit_task = {}

            def on_epoch(epoch, total, metrics):
                if "task" not in fit_task:
                    fit_task["task"] = bar.add_task("fit", total=total, rate="")
                shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                  if k in ("train_loss", "val_loss", "val_pq") and v is not None)
                bar.update(fit_task["task"], completed=epoch, rate=shown)

            result = run_demo(out, tiles=tiles, epochs=epochs, progress=_ExtractProgress(bar), warn=console.print,
                              on_epoch=on_epoch)
    except USER_ERRORS as err:
        _fail(err)
    info(result.cache)
    if result.metrics is not None:
        _print_scores(result.metrics, f"test split: {result.metrics['protocol']['n_images']} tiles")
        _stdout().print((result.score / "table.md").read_text())
    console.print(f"[green]demo finished[/] in {result.seconds:.1f} s. Outputs: dataset {result.dataset}, caches "
                  f"{result.cache.parent}, run {result.run}, scores {result.score}")


class _SweepProgress:
    """One bar for the whole sweep: runs done / total (a run's epochs advance it in fractions, for the ETA)."""

    def __init__(self, bar):
        self.bar, self.task, self.t0, self.part, self.n_run = bar, None, time.perf_counter(), {}, 0

    def __call__(self, kind: str, run, info: dict) -> None:
        if kind == "plan":
            self.task = self.bar.add_task("sweep", total=info["total"], completed=info["done"], rate="")
            return
        key = None if run is None else (run.config_id, run.seed)
        label = "" if run is None else f"{run.name} s{run.seed}"
        if kind == "epoch":
            step = 0.9 * info["epoch"] / info["epochs"] - self.part.get(key, 0.0)
            self.part[key] = self.part.get(key, 0.0) + step
            self.bar.update(self.task, advance=step, rate=self._rate(f"{label}: epoch {info['epoch']}/{info['epochs']}"))
        elif kind == "stage":
            self.bar.update(self.task, rate=self._rate(f"{label}: {info['stage']}"))
        elif kind in ("done", "failed", "busy"):
            self.n_run += kind == "done"
            self.bar.update(self.task, advance=1.0 - self.part.pop(key, 0.0), rate=self._rate(f"{label}: {kind}"))
            if kind == "failed":
                console.print(f"[red]failed[/] {label}: {info['error']}", highlight=False, soft_wrap=True)

    def _rate(self, text: str) -> str:
        if not self.n_run:
            return text
        return f"{(time.perf_counter() - self.t0) / 60 / self.n_run:5.1f} min/run  {text}"


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML (configs/sweeps/): data, extract, fit, seeds, runs/grid."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: SECTION.KEY=VALUE (data.root=/data, "
                                   "fit.epochs=2, extract.batch_size=8, seeds=[0,1]); a bare KEY=VALUE is a fit field."),
    out: Path | None = typer.Option(None, help="Sweep folder (default: the file's `out`, else sweeps/<file name>)."),
    part: str | None = typer.Option(None, help="Run share I of N (1 <= I <= N), e.g. 2/4; default: the SLURM array "
                                    "task (SLURM_ARRAY_TASK_ID - MIN) / STEP + 1 of SLURM_ARRAY_TASK_COUNT, else 1/1."),
    stale: float = typer.Option(600.0, help="Seconds after which a lock no job refreshes (a crashed job's) is taken "
                                "over."),
):
    """Run every configuration of a sweep: extract (one shared cache per encoder) → fit → tune → score; resumable."""
    from cellembed._config import ConfigError
    from cellembed.sweep import load_sweep, parse_part, parse_sets, run_sweep

    try:
        index = parse_part(part, dict(os.environ))
        plan = load_sweep(sweep_file, parse_sets(set_), out)
        with _progress_bar() as bar:
            result = run_sweep(plan, index, on_event=_SweepProgress(bar), stale=stale)
    except (ConfigError, *USER_ERRORS) as err:
        _fail(err)
    table = Table(title=f"sweep {sweep_file} part {index[0]}/{index[1]} in {result.out} ({result.seconds:.0f} s)")
    for col in ("configuration", "seed", "status"):
        table.add_column(col)
    rows = ([(r, "[green]ran[/]") for r in result.ran] + [(r, "done before") for r in result.skipped]
            + [(r, "[yellow]held by another job[/]") for r in result.busy]
            + [(r, f"[red]failed[/]: {e}") for r, e in result.failed])
    for run, status in rows:
        table.add_row(run.name, str(run.seed), status)
    _stdout().print(table)
    if result.failed:
        raise typer.Exit(1)


@app.command()
def report(
    sweep_dirs: list[Path] = typer.Argument(..., help="Sweep folder(s) written by `cellembed sweep`."),
    out: Path | None = typer.Option(None, help="Output folder (default SWEEP_DIR/report)."),
    compare: tuple[str, str] | None = typer.Option(None, help="Two configuration names (or ids) to compare over "
                                                   "their common seeds: mean difference, sd, paired t-test."),
    tiles: int = typer.Option(4, min=1, help="Test tiles in the overlay grid."),
):
    """Table I over a sweep (mean ± sd over seeds, best marked), a paired test, curves, overlays, an HTML page."""
    from cellembed.sweep import report as run_report

    try:
        result = run_report(sweep_dirs, out, compare if compare and compare[0] else None, n_tiles=tiles)
    except USER_ERRORS as err:
        _fail(err)
    _stdout().print((result.out / "table.md").read_text())
    if result.comparison:
        _stdout().print((result.out / "compare.md").read_text())
    console.print(f"[green]wrote[/] {', '.join(str(p) for p in result.files)}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
