"""The report's figures and HTML page: every run's curves, one overlay grid across configurations."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cellembed.sweep._report import (AVERAGING, Record, _label, averaging, collect, compare, compare_markdown, table,
                                     table_markdown, write_csv)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(records: list[Record], path: Path) -> Path:
    """Training loss, validation loss and the validation score each run kept its best epoch by (``score_key``:
    PQ, mDice, ...) per epoch of every run: one colour per configuration, one line style per seed."""
    plt = _plt()
    configs = list(dict.fromkeys(r.config_id for r in records))
    seeds = sorted({r.seed for r in records})
    colours = plt.get_cmap("tab10" if len(configs) <= 10 else "tab20")
    styles = ["-", "--", ":", "-."]
    scores = sorted({r.score_key for r in records})
    keys = [("train_loss", "training loss"), ("val_loss", "validation loss"),
            (None, "validation " + ", ".join(_label(k.removeprefix("val_")) for k in scores))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in records:
        c, s = configs.index(r.config_id), seeds.index(r.seed)
        epochs = [h["epoch"] for h in r.history]
        for ax, (key, _) in zip(axes, keys):
            key = key or r.score_key
            ys = [math.nan if h.get(key) is None else h[key] for h in r.history]
            ax.plot(epochs, ys, styles[s % len(styles)], color=colours(c % colours.N), marker="o", ms=3,
                    label=r.name if s == 0 else None)
    from matplotlib.ticker import MaxNLocator

    for ax, (_, title) in zip(axes, keys):
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best", title="line style = seed " + ", ".join(map(str, seeds)),
                    title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overlay_figure(records: list[Record], path: Path, n_tiles: int = 4) -> Path:
    """The same test tiles (those with the most true nuclei) for every configuration at its lowest seed:
    ground-truth contours, then each configuration's predicted contours, coloured by type.

    Semantic runs (all of ``records`` or none): the tiles with the most true classes, each panel the tile blended
    with a colour per class (ground truth, then each configuration's prediction)."""
    from cellembed.cache import open_cache
    from cellembed.evaluate._run import draw_classes, draw_contours

    semantic = records[0].semantic

    def draw(image, maps):  # semantic panels: classes (a cache's true maps hold them in the type channel)
        if semantic:
            return draw_classes(image, maps[..., 1] if maps.ndim == 3 else maps)
        return draw_contours(image, maps)

    plt = _plt()
    first = {}
    for r in sorted(records, key=lambda r: r.seed):
        first.setdefault((r.dataset, r.config_id), r)
    runs = list(first.values())
    cache = open_cache(runs[0].test_cache)
    tiles = lambda: (s for p in cache.shard_paths for s in cache.iter_shard(p, level_names=[]))  # noqa: E731
    # no features decoded; two passes keep memory low
    nuclei = {s.key: len(np.unique(s.type_map if semantic else s.inst_map)) for s in tiles()}
    keys = sorted(nuclei, key=lambda k: -nuclei[k])[:n_tiles]
    cache = {s.key: s for s in tiles() if s.key in keys}
    preds = {}
    for r in runs:
        order = (r.folder / "score" / "keys.txt").read_text().split()
        arr = np.load(r.folder / "score" / "predictions.npy", mmap_mode="r")
        preds[r.config_id] = {k: np.asarray(arr[order.index(k)]) for k in keys if k in order}
    cols = ["ground truth"] + [r.name for r in runs]
    fig, axes = plt.subplots(len(keys), len(cols), figsize=(2.4 * len(cols), 2.5 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        s = cache[key]
        true = np.stack([s.inst_map, s.type_map.astype(np.int32)], -1)
        panels = [draw(s.image, true)] + [draw(s.image, preds[r.config_id][key])
                                          if key in preds[r.config_id] else np.zeros_like(s.image) for r in runs]
        if semantic:
            counts = [len(np.unique(true[..., 1]))] + [len(np.unique(preds[r.config_id][key]))
                                                       if key in preds[r.config_id] else 0 for r in runs]
        else:
            counts = [len(np.unique(true[..., 0])) - 1] + [len(np.unique(preds[r.config_id][key][..., 0])) - 1
                                                           if key in preds[r.config_id] else 0 for r in runs]
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{counts[j]} {'classes' if semantic else 'nuclei'}", fontsize=7)
            if i == 0:
                ax.set_title(cols[j], fontsize=7, wrap=True)
        axes[i, 0].set_ylabel(key, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _html_table(markdown: str) -> str:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    if not rows:
        return ""
    body = []
    for i, row in enumerate(r for k, r in enumerate(rows) if k != 1):
        tag = "th" if i == 0 else "td"
        cells = []
        for c in row:
            c = c.strip()
            bold = c.startswith("**") and c.endswith("**")
            text = html.escape(c.strip("*"))
            cells.append(f"<{tag}>{'<b>' + text + '</b>' if bold else text}</{tag}>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(body) + "</table>"


def html_page(title: str, sections: list[tuple[str, str]], images: list[Path], footer: str = AVERAGING) -> str:
    """One self-contained page: markdown tables as HTML, notes as paragraphs, PNGs embedded as base64, then
    ``footer`` (the averaging note)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}td:first-child,td:nth-child(2)"
             "{text-align:left}img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, markdown in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{_html_table(markdown)}")
        notes = [line for line in markdown.splitlines() if line.strip() and not line.startswith("|")]
        parts += [f"<p>{html.escape(line)}</p>" for line in notes]
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(image.stem)}</h2><img src='data:image/png;base64,{data}'>")
    parts.append(f"<p><small>{html.escape(footer)}</small></p></body></html>")
    return "\n".join(parts)


class Report(NamedTuple):
    """What ``report`` wrote: the output folder, the files, the table rows and the comparison (if any)."""

    out: Path
    files: list
    rows: list
    comparison: list | None


def report(sweep_dirs: list[str | Path], out: str | Path | None = None, compare_pair: tuple[str, str] | None = None,
           n_tiles: int = 4) -> Report:
    """Write ``table.md`` / ``table.csv`` (Table I, mean ± sd over seeds, best marked), ``compare.md`` /
    ``compare.csv`` (with ``compare_pair``), ``curves.png``, ``overlays.png`` and ``report.html`` (self-contained).

    Args:
        sweep_dirs: folders written by ``cellembed sweep``.
        out: output folder (default ``<first sweep folder>/report``).
        compare_pair: two configuration names (or config ids) to compare over their common seeds.
        n_tiles: test tiles in the overlay grid.
    """
    import csv

    records = collect(sweep_dirs)
    out = Path(out) if out else Path(sweep_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    keys, rows = table(records)
    md = table_markdown(keys, rows)
    (out / "table.md").write_text(md)
    write_csv(out / "table.csv", keys, rows)
    files = [out / "table.md", out / "table.csv"]
    sections = [("Table I: test split, mean ± sd over seeds", md)]
    comparison = None
    if compare_pair:
        comparison = compare(records, *compare_pair)
        cmd = compare_markdown(*compare_pair, comparison)
        (out / "compare.md").write_text(cmd)
        with open(out / "compare.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(comparison[0]))
            w.writeheader()
            w.writerows(comparison)
        files += [out / "compare.md", out / "compare.csv"]
        sections.append(("Paired comparison", cmd))
    images = [curves_figure(records, out / "curves.png")]
    instance, semantic = [r for r in records if not r.semantic], [r for r in records if r.semantic]
    if instance:
        images.append(overlay_figure(instance, out / "overlays.png", n_tiles))
    if semantic:
        images.append(overlay_figure(semantic, out / ("overlays_semantic.png" if instance else "overlays.png"),
                                     n_tiles))
    (out / "report.html").write_text(html_page(f"cellembed sweep report: {', '.join(map(str, sweep_dirs))}",
                                               sections, images, averaging(keys)))
    return Report(out, files + images + [out / "report.html"], rows, comparison)
