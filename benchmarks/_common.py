"""Shared helpers for benchmarks: machine description and writing JSON + markdown + PNG results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REALDATA = Path(os.environ.get("CELLEMBED_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": None}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, payload: dict, table: list[dict], plot) -> Path:
    """Write ``results/<name>.json``, ``.md`` (a table of ``table`` rows) and ``.png`` (drawn by ``plot(ax)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    m = payload["machine"]
    head = f"# {name}\n\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, GPU: {m['gpu'] or 'none'}.\n\n"
    (RESULTS / f"{name}.md").write_text(head + payload.get("description", "") + "\n\n" + md_table(table) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    plot(ax)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    return RESULTS / f"{name}.md"


def md_table(rows: list[dict]) -> str:
    """A markdown table of ``rows`` (columns from the first row; a key missing from a row is an empty cell)."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows])
