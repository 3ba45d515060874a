"""Extract the caches of a sweep file without training (see configs/sweeps/ and `cellembed sweep`).

A thin wrapper over :func:`cellembed.sweep.ensure_caches`: one cache per encoder and split with the union of the
runs' blocks, in ``<out>/caches/``, exactly where ``cellembed sweep`` looks for them. Rerunning skips finished
caches and resumes interrupted ones; a config that fails (e.g. a gated model without HF_TOKEN) is reported and
the others go on.

    python tools/sweep_extract.py configs/sweeps/tiny.yaml --out sweeps/tiny --set extract.batch_size=4
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from cellembed.cache import CacheError
from cellembed.sweep import ensure_caches, load_sweep, parse_sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep YAML (data, extract, fit, seeds, runs / grid)")
    parser.add_argument("--out", default=None, help="sweep folder (default: as `cellembed sweep`)")
    parser.add_argument("--set", action="append", default=[], help="override a field, SECTION.KEY=VALUE")
    args = parser.parse_args()
    console = Console()
    sweep = load_sweep(args.sweep, parse_sets(args.set), args.out)
    table = Table(title=f"caches of {args.sweep} in {sweep.out}")
    for col in ("encoder", "blocks", "status", "encoded now", "tiles/s", "cache"):
        table.add_column(col)
    failures = 0
    for cache in sweep.caches:
        t0 = time.perf_counter()
        blocks = cache.configs["train"].blocks
        try:
            results = ensure_caches(sweep, cache)
        except (CacheError, FileNotFoundError, ValueError, RuntimeError, ImportError, KeyError) as err:
            failures += 1
            table.add_row(cache.encoder, blocks, f"[red]failed[/]: {err}", "", "", str(cache.folder))
            continue
        written = sum(r.n_written for r in results.values())
        rate = written / max(sum(r.encode_seconds for r in results.values()), 1e-9)
        table.add_row(cache.encoder, blocks, "[green]ok[/]", str(written), f"{rate:.1f}", str(cache.folder))
        console.log(f"{cache.folder}: {time.perf_counter() - t0:.1f} s")
    console.print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
