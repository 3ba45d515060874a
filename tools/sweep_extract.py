"""Extract one cache per encoder/block configuration of a sweep file (see configs/sweeps/).

Each run is an ordinary `cellembed extract`: rerunning the sweep skips finished caches and resumes
interrupted ones. A config that fails (e.g. a gated model without HF_TOKEN) is reported and the sweep
goes on.

    python tools/sweep_extract.py configs/sweeps/tiny.yaml --set out=cache/tiny
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from cellembed._config import ConfigError, from_dict, load_yaml
from cellembed.cache import CacheError, ExtractConfig, extract


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r} is not KEY=VALUE")
        out[key] = int(value) if value.isdigit() else value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep YAML with `common` and `runs`")
    parser.add_argument("--set", action="append", default=[], help="override a common field, KEY=VALUE")
    args = parser.parse_args()
    console = Console()
    sweep = load_yaml(args.sweep)
    common = {**sweep.get("common", {}), **parse_sets(args.set)}
    parent = common.pop("out", "cache/sweep")
    table = Table(title=f"sweep {args.sweep}")
    for col in ("encoder", "blocks", "status", "tiles", "encoded", "tiles/s", "cache"):
        table.add_column(col)
    failures = 0
    for run in sweep["runs"]:
        out = f"{parent}/{run['encoder']}-{run['blocks']}"
        t0 = time.perf_counter()
        try:
            cfg = from_dict(ExtractConfig, {**common, **run, "out": out}, args.sweep)
            result = extract(cfg)
        except (CacheError, ConfigError, FileNotFoundError, ValueError, RuntimeError, ImportError) as err:
            failures += 1
            table.add_row(run["encoder"], run["blocks"], f"[red]failed[/]: {err}", "", "", "", out)
            continue
        rate = result.n_written / max(result.encode_seconds, 1e-9)
        table.add_row(run["encoder"], run["blocks"], "[green]ok[/]", str(result.n_tiles), str(result.n_written),
                      f"{rate:.1f}", out)
        console.log(f"{out}: {time.perf_counter() - t0:.1f} s")
    console.print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
