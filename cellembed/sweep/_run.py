"""Run a sweep: extract (shared, locked) → fit-decoder (validation every epoch, min area tuned) → score on test.

Layout of a sweep folder::

    caches/<encoder>-<hash>/{train,val,test}/   one cache per encoder and split (the union of the runs' blocks)
    caches/<encoder>-<hash>/<role>.done          written once that cache is complete
    runs/<name>-<hash>/seed<k>/sweep.json        the resolved configuration (written first)
    runs/<name>-<hash>/seed<k>/run/              the ``fit-decoder`` run (resumable)
    runs/<name>-<hash>/seed<k>/score/            ``score`` on the test cache (metrics.json, predictions.npy)
    runs/<name>-<hash>/seed<k>/done.json         written last: the run is finished
    runs/<name>-<hash>/seed<k>/failed.json       the error of the last failed attempt (retried on a rerun)
    locks/                                       one lock per run and per cache while a job works on it
    log.jsonl                                    one line per run started / finished / failed (host, pid, part)
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from cellembed.cache._manifest import write_json_atomic
from cellembed.sweep._lock import STALE_SECONDS, Lock
from cellembed.sweep._plan import CacheJob, RunJob, Sweep, share

Event = Callable[[str, "RunJob | None", dict], None]
"""(kind, run, info): kind is "plan" (info: total, done), "stage" (info: stage), "epoch" (info: epoch, epochs),
"done", "failed" (info: error), "busy" (another job holds the run's lock)."""


class SweepResult(NamedTuple):
    """What this job of a sweep did: runs finished now, found finished, failed (with errors), held elsewhere."""

    out: Path
    ran: list
    skipped: list
    failed: list
    busy: list
    seconds: float


def is_done(run: RunJob) -> bool:
    return (run.folder / "done.json").is_file()


def run_sweep(sweep: Sweep, part: tuple[int, int] = (1, 1), on_event: Event | None = None,
              stale: float = STALE_SECONDS) -> SweepResult:
    """Run this part's share of a sweep, skipping finished runs and runs another job holds.

    Every stage resumes: caches skip finished shards, ``fit_decoder`` resumes from its last epoch, and a run
    with ``done.json`` is not touched again. A run that fails is recorded (``failed.json``, ``log.jsonl``) and
    the sweep goes on.

    Args:
        sweep: from :func:`~cellembed.sweep.load_sweep`.
        part: (I, N): run every N-th configuration from the I-th (all seeds of a configuration together).
        on_event: progress callback (see :data:`Event`).
        stale: seconds after which a lock that is no longer refreshed is taken over.
    """
    t0 = time.perf_counter()
    emit = on_event or (lambda kind, run, info: None)
    mine = share([r.config_id for r in sweep.runs], part)
    runs = [r for r in sweep.runs if r.config_id in mine]
    emit("plan", None, {"total": len(runs), "done": sum(is_done(r) for r in runs)})
    ran, skipped, failed, busy = [], [], [], []
    for run in runs:
        if is_done(run):
            skipped.append(run)
            continue
        lock = Lock(sweep.out / "locks" / f"{run.config_id}-seed{run.seed}.lock", stale)
        if not lock.acquire():
            busy.append(run)
            emit("busy", run, {"holder": lock.holder()})
            continue
        try:
            if is_done(run):  # finished by another job between the check and the lock
                skipped.append(run)
                continue
            _log(sweep, run, "started", part)
            _one(sweep, run, part, emit, stale)
            ran.append(run)
            emit("done", run, {})
        except Exception as err:  # noqa: BLE001 - one failed config must not stop the sweep
            failed.append((run, err))
            run.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run.folder / "failed.json", {"error": f"{type(err).__name__}: {err}",
                                                           "traceback": traceback.format_exc()})
            _log(sweep, run, "failed", part, error=f"{type(err).__name__}: {err}")
            emit("failed", run, {"error": f"{type(err).__name__}: {err}"})
        finally:
            lock.release()
    return SweepResult(sweep.out, ran, skipped, failed, busy, time.perf_counter() - t0)


def _one(sweep: Sweep, run: RunJob, part: tuple[int, int], emit: Event, stale: float) -> None:
    from cellembed.evaluate import score_run
    from cellembed.train import fit_decoder

    t0 = time.perf_counter()
    _claim_folder(run)
    emit("stage", run, {"stage": "extract"})
    ensure_caches(sweep, run.cache, stale)
    emit("stage", run, {"stage": "fit"})
    fit_decoder(run.fit, on_epoch=lambda e, n, m: emit("epoch", run, {"epoch": e, "epochs": n}))
    emit("stage", run, {"stage": "score"})
    fit = run.fit
    scores = score_run(fit.out, run.cache.paths["test"], run.folder / "score", device=fit.device,
                       num_workers=fit.num_workers, n_overlays=0, overwrite=True).metrics
    write_json_atomic(run.folder / "done.json", {"config_id": run.config_id, "name": run.name, "seed": run.seed,
                                                 "summary": scores["summary"], "per_class": scores.get("per_class"),
                                                 "seconds": time.perf_counter() - t0})
    (run.folder / "failed.json").unlink(missing_ok=True)
    _log(sweep, run, "finished", part)


def _claim_folder(run: RunJob) -> None:
    """Write ``sweep.json`` (or check the one there): a folder never mixes two configurations."""
    path = run.folder / "sweep.json"
    record = json.loads(json.dumps(run.resolved, default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise ValueError(f"{run.folder} holds another configuration (differs in {diff}); delete the folder or "
                             "sweep into another --out")
        return
    run.folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def ensure_caches(sweep: Sweep, cache: CacheJob, stale: float = STALE_SECONDS,
                  progress: Callable | None = None) -> dict:
    """Extract an encoder's train / val / test caches once, under a lock (other jobs wait for it); resumable.

    Returns:
        role → ExtractResult for the caches extracted now (empty when all were finished already).
    """
    from cellembed.cache import extract

    done = {role: cache.folder / f"{role}.done" for role in cache.configs}
    if all(p.is_file() for p in done.values()):
        return {}
    results = {}
    with Lock(sweep.out / "locks" / f"cache-{cache.folder.name}.lock", stale):
        for role, config in cache.configs.items():
            if done[role].is_file():
                continue
            result = extract(config, progress=progress)
            results[role] = result
            write_json_atomic(done[role], {"cache_key": result.cache_key, "n_tiles": result.n_tiles})
    return results


def _log(sweep: Sweep, run: RunJob, what: str, part: tuple[int, int], **extra) -> None:
    line = json.dumps({"time": time.time(), "event": what, "run": f"{run.config_id}/seed{run.seed}",
                       "host": socket.gethostname(), "pid": os.getpid(), "part": f"{part[0]}/{part[1]}", **extra})
    sweep.out.mkdir(parents=True, exist_ok=True)
    with open(sweep.out / "log.jsonl", "a") as f:  # one short line per write: appends do not interleave
        f.write(line + "\n")
