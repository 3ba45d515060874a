"""Sweeps: many encoder / block / decoder / seed configurations from one YAML, shared caches, resumable, split
over SLURM array tasks; then one report (Table I with mean ± sd over seeds, paired tests, curves, overlays)."""

from cellembed.sweep._figures import Report, report
from cellembed.sweep._lock import Lock
from cellembed.sweep._plan import Sweep, load_sweep, parse_part, parse_sets, share
from cellembed.sweep._report import AVERAGING, collect, compare, table
from cellembed.sweep._run import SweepResult, ensure_caches, run_sweep

__all__ = ["AVERAGING", "Lock", "Report", "Sweep", "SweepResult", "collect", "compare", "ensure_caches",
           "load_sweep", "parse_part", "parse_sets", "report", "run_sweep", "share", "table"]
