"""Stage one against its limit: full ``extract`` throughput vs the bare encoder forward, side by side.

The bare forward runs on tiles already decoded in memory, batched exactly as ``extract`` batches them,
under inference_mode: no reading, no PNG/safetensors encoding, no disk. ``extract`` does all of that
(DataLoader workers or not, background shard writer). The ratio extract / bare says how much of the
encoder's speed the pipeline keeps (target: 0.85). Passes alternate bare / extract and the best of the
rounds is kept for each, so that other load on a shared machine is filtered out (short CNN passes get more
rounds than long ViT passes).

Also written: what each pipeline stage costs per tile on one core, the cache size per tile in each storage
dtype, and the projected size of a PanNuke cache (7,901 tiles of 256²) for every encoder preset, computed
from the preset's levels (channels, grid at its input size, prefix tokens): no weights are needed.

    python benchmarks/extract.py [--tiles 128] [--rounds N] [--device auto]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cellembed.cache import ExtractConfig, extract
from cellembed.cache._codec import encode_feats, encode_gt, encode_image, encode_meta
from cellembed.cache._extract import _collate
from cellembed.cache._writer import ChannelStats, EncodedTile, ShardWriter
from cellembed.data import open_dataset, resolve_split
from cellembed.encoders import LevelInfo, build_encoder, list_specs, resolve_blocks
from cellembed.encoders._build import input_hw_for
from cellembed.encoders._frozen import make_levels

try:
    from benchmarks._common import REALDATA, machine, md_table, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _common import REALDATA, machine, md_table, write_results

# a CNN and a ViT-B/16 (weights do not change speed), with their default number of rounds
ENCODERS = [("efficientnet_lite0_in1k", "packaged", 8), ("phikon", "random", 3)]
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
PANNUKE_TILES, PANNUKE_SIZE, SHARD_SIZE = 7901, 256, 256
TARGET = 0.85


def dataset(n_tiles: int, tmp: Path) -> tuple[str, dict, str]:
    """Real CoNSeP tiles when ../shared is there (a folds.csv picks n_tiles), else synthetic."""
    consep = REALDATA / "consep_tiles256"
    if (consep / "labels.npz").is_file():
        names = sorted(p.stem for p in (consep / "images").glob("*.jpg"))
        folds = tmp / "folds.csv"
        folds.write_text("img_id,fold\n" + "".join(f"{n},{2 if i < n_tiles else 0}\n" for i, n in enumerate(names)))
        return "folder", {"root": str(consep), "split": "test", "folds": str(folds)}, f"CoNSeP 256² tiles ({n_tiles})"
    return "synthetic", {"dataset_options": {"n_tiles": n_tiles, "seed": 0}}, f"synthetic 256² tiles ({n_tiles})"


class _Selected:
    """The tiles ``extract`` sees with these options, in its order."""

    def __init__(self, source, kwargs: dict):
        split = resolve_split(source, kwargs.get("split", "all"), folds=kwargs.get("folds"))
        self.source, self.indices = source, split.indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[i]]


def bare_pass(enc, images: torch.Tensor, batch: int, shard: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds of one forward pass over ``images``, batched as extract does (batches stop at
    shard ends)."""
    autocast = device.type == "cuda"
    starts = [s + b for s in range(0, len(images), shard) for b in range(0, min(shard, len(images) - s), batch)]
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        t0, c0 = time.perf_counter(), time.process_time()
        for s in starts:
            stop = min(s + batch, (s // shard + 1) * shard, len(images))
            enc(images[s:stop].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


class _LoopClock:
    """Progress callback noting CPU time (this process and its finished DataLoader workers) over the loop."""

    def __init__(self):
        self.start = self.stop = None

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        now = time.process_time() + ru.ru_utime + ru.ru_stime
        self.start = now if self.start is None else self.start
        self.stop = now

    @property
    def cpu(self) -> float:
        return self.stop - self.start


def run_extract(out: Path, encoder: str, weights: str, name: str, kwargs: dict, workers: int, batch: int,
                device: torch.device, dtype: str = "fp16"):
    cfg = ExtractConfig(dataset=name, out=str(out), encoder=encoder, weights=weights, batch_size=batch,
                        num_workers=workers, device=str(device.type), shard_size=64, dtype=dtype, **kwargs)
    clock = _LoopClock()
    result = extract(cfg, progress=clock)
    shutil.rmtree(out)
    return result, clock.cpu


def throughput(encoder: str, weights: str, rounds: int, images: torch.Tensor, name: str, kwargs: dict, args, device,
               tmp: Path) -> tuple[dict, list[dict]]:
    """Alternate bare and extract passes ``rounds`` times; keep the best of each."""
    enc = build_encoder(encoder, weights=weights, tile_size=images.shape[-1], device=device)
    with torch.inference_mode():
        enc(images[:args.batch_size].to(device))  # warm-up
    bare, ext, runs = [], {w: [] for w in args.workers}, []
    for r in range(rounds):
        bare.append(bare_pass(enc, images, args.batch_size, 64, device))
        for w in args.workers:
            res, cpu = run_extract(tmp / f"{encoder}-{w}-{r}", encoder, weights, name, kwargs, w, args.batch_size,
                                   device)
            ext[w].append((res.encode_seconds, cpu, res))
            runs.append({"encoder": encoder, "workers": w, "round": r, "bare_seconds": bare[-1][0],
                         "bare_cpu_seconds": bare[-1][1], "seconds": res.seconds, "encode_seconds": res.encode_seconds,
                         "encode_cpu_seconds": cpu, "tiles": res.n_written, "MB": res.manifest["n_bytes"] / 1e6})
    n = len(images)
    row = {"encoder": encoder, "bare forward (tiles/s)": round(n / min(b[0] for b in bare), 1)}
    for w in args.workers:
        seconds, _, best = min(ext[w], key=lambda e: e[0])
        row[f"extract w={w} (tiles/s)"] = round(n / seconds, 1)
        row[f"MB/s w={w}"] = round(best.manifest["n_bytes"] / 1e6 / seconds, 1)
        row[f"ratio w={w}"] = round(n / seconds / row["bare forward (tiles/s)"], 2)
        row[f"CPU ratio w={w}"] = round(min(b[1] for b in bare) / min(e[1] for e in ext[w]), 2)
    row["MB per tile (fp16)"] = round(best.manifest["n_bytes"] / 1e6 / best.n_tiles, 3)
    row["spread max/min (bare" + "".join(f", w={w}" for w in args.workers) + ")"] = " / ".join(
        [f"{max(b[0] for b in bare) / min(b[0] for b in bare):.2f}"]
        + [f"{max(e[0] for e in ext[w]) / min(e[0] for e in ext[w]):.2f}" for w in args.workers])
    return row, runs


def stage_costs(source, n: int, encoder: str, weights: str, images: torch.Tensor, batch: int, tmp: Path) -> dict:
    """CPU milliseconds per tile of each pipeline stage on one thread (what the pipeline adds to the forward)."""
    from PIL import Image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc = build_encoder(encoder, weights=weights, tile_size=images.shape[-1])
        tiles = [source[i] for i in range(n)]
        cost = {"tile read + decode": _per_tile(lambda: [source[i] for i in range(n)], n),
                "PNG, Pillow level 1 (before)": _per_tile(lambda: [_pil_png(Image, t.image) for t in tiles], n),
                "PNG, Up filter + zlib 1 RLE (now)": _per_tile(lambda: [encode_image(t.image) for t in tiles], n),
                "GT safetensors": _per_tile(lambda: [encode_gt(t.inst_map, t.type_map) for t in tiles], n),
                "batch NHWC → NCHW, torch (before)": _per_tile(lambda: _torch_collate(tiles), n),
                "batch NHWC → NCHW, numpy (now)": _per_tile(lambda: _collate([{"image": t.image} for t in tiles]), n)}
        with torch.inference_mode():
            out = enc(images[:batch])
            cost["encoder forward, 1 thread"] = _per_tile(lambda: enc(images[:batch]), batch)
        feats = [{f"block_{i}": f[j].half().contiguous() for i, f in enumerate(out.feats)} for j in range(batch)]
        if out.prefix is not None:
            for j, d in enumerate(feats):
                d.update({f"prefix_{i}": p[j].half().contiguous() for i, p in enumerate(out.prefix)})
        cost["features safetensors"] = _per_tile(lambda: [encode_feats(d) for d in feats], batch)
        names = [f"block_{i}" for i in range(len(out.feats))]
        cost["channel statistics"] = _per_tile(lambda: [ChannelStats(names).add(d) for d in feats], batch)
        png, gt = encode_image(tiles[0].image), encode_gt(tiles[0].inst_map, tiles[0].type_map)
        (tmp / ".parts").mkdir(exist_ok=True)

        def write():
            w = ShardWriter(tmp, "shard-00-000000.tar", 0, "k", [])
            for j, d in enumerate(feats):
                w.add(EncodedTile(f"t{j}", j, d, gt, png, {}))
            w.close()
        cost["tar + sha256 + write (encoded tile)"] = _per_tile(write, batch)
    finally:
        torch.set_num_threads(threads)
    return {k: round(v, 2) for k, v in cost.items()}


def _torch_collate(tiles) -> torch.Tensor:
    return torch.stack([torch.from_numpy(t.image) for t in tiles]).permute(0, 3, 1, 2).contiguous()


def _pil_png(Image, image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _per_tile(fn, n: int, repeats: int = 3) -> float:
    """CPU milliseconds per tile (process time: waiting on fsync or on a busy machine is not counted)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / n * 1e3


def tile_bytes(levels, prefix_tokens: int, nbytes: int, png: float, meta: float, tile: int,
               int8: bool = False) -> float:
    """Bytes of one cache sample: tar members (512-byte headers, 512-byte blocks) of its four files. ``int8``:
    the levels as ``extract --codec int8`` stores them (int8 values and a (C,) scale in the ``nbytes`` dtype)."""
    dtype = {2: torch.float16, 4: torch.float32}[nbytes]
    shapes = {lv.name: ((lv.channels, *lv.grid), torch.int8 if int8 else dtype) for lv in levels}
    if int8:
        shapes.update({f"{lv.name}.scale": ((lv.channels,), dtype) for lv in levels})
    if prefix_tokens:
        shapes.update({"prefix_" + lv.name.split("_", 1)[1]: ((prefix_tokens, lv.channels), dtype) for lv in levels})
    feats = len(encode_feats({k: torch.zeros((1,) * len(s), dtype=t).expand(*s).contiguous()
                              for k, (s, t) in shapes.items()}))
    gt = len(encode_gt(np.zeros((tile, tile), np.int32), np.zeros((tile, tile), np.uint8)))
    return sum(512 + 512 * math.ceil(b / 512) for b in (feats, gt, png, meta))


def projections(png: float, meta: float) -> list[dict]:
    """Cache size per tile and for PanNuke (7,901 × 256²) for every preset's default blocks, each dtype."""
    rows = []
    for spec in list_specs():
        if spec.name.startswith("test_"):
            continue
        blocks = resolve_blocks(spec, "default")
        prefix = spec.num_prefix_tokens if spec.is_vit else 0
        row = {"preset": spec.name, "blocks": ",".join(map(str, blocks))}
        sizes = {}
        for policy in ("resize", "native-grid"):
            levels = make_levels(spec, blocks, input_hw_for(spec, policy, PANNUKE_SIZE), PANNUKE_SIZE)
            if policy == "resize":
                row["channels × grid"] = ", ".join(f"{lv.channels}×{lv.grid[0]}²" for lv in levels)
                row["prefix"] = prefix
            for dtype, nb in DTYPE_BYTES.items():
                sizes[policy, dtype] = tile_bytes(levels, prefix, nb, png, meta, PANNUKE_SIZE)
        for dtype in DTYPE_BYTES:
            row[f"MB/tile {dtype}"] = round(sizes["resize", dtype] / 1e6, 3)
        for dtype in ("fp16", "fp32"):
            row[f"PanNuke GB {dtype}"] = round(_cache_bytes(sizes["resize", dtype]) / 1e9, 2)
        int8 = tile_bytes(make_levels(spec, blocks, input_hw_for(spec, "resize", PANNUKE_SIZE), PANNUKE_SIZE), prefix,
                          2, png, meta, PANNUKE_SIZE, int8=True)
        row["PanNuke GB int8 (--codec int8)"] = round(_cache_bytes(int8) / 1e9, 2)
        row["PanNuke GB fp16 native-grid"] = round(_cache_bytes(sizes["native-grid", "fp16"]) / 1e9, 2)
        rows.append(row)
    return rows


def _cache_bytes(per_tile: float) -> float:
    """PanNuke in shards of 256: samples, end-of-archive blocks and tar record padding of each shard."""
    full, last = divmod(PANNUKE_TILES, SHARD_SIZE)
    shards = [SHARD_SIZE] * full + ([last] if last else [])
    return sum(10240 * math.ceil((n * per_tile + 1024) / 10240) for n in shards)


def dtype_sizes(encoder: str, weights: str, name: str, kwargs: dict, device, tmp: Path, png: float,
                meta: float, tile: int) -> dict:
    """Measured MB per tile in each storage dtype, next to the projection from the levels."""
    row = {"encoder": encoder}
    for dtype in DTYPE_BYTES:
        res, _ = run_extract(tmp / f"size-{encoder}-{dtype}", encoder, weights, name, kwargs, 0, 16, device, dtype)
        m = res.manifest
        levels = [LevelInfo(lv["name"], lv["block"], lv["channels"], tuple(lv["grid"]), lv["stride"])
                  for lv in m["levels"]]
        projected = tile_bytes(levels, m["num_prefix_tokens"], DTYPE_BYTES[dtype], png, meta, tile)
        row[f"{dtype} measured"] = round(m["n_bytes"] / 1e6 / m["n_samples"], 3)
        row[f"{dtype} projected"] = round(projected / 1e6, 3)
    return row


def sample_sizes(source, n: int) -> tuple[float, float]:
    """Mean PNG and meta.json bytes of the benchmark tiles (the content-dependent part of a sample)."""
    tiles = [source[i] for i in range(n)]
    png = statistics.mean(len(encode_image(t.image)) for t in tiles)
    meta = statistics.mean(len(encode_meta(t.key, i, t.meta)) for i, t in enumerate(tiles))
    return png, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per encoder (default: 8 CNN, 3 ViT)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    tmp = Path(tempfile.mkdtemp(prefix="cellembed-bench-"))
    name, kwargs, data_label = dataset(args.tiles, tmp)
    source = _Selected(open_dataset(name, kwargs.get("root"), **kwargs.get("dataset_options", {})), kwargs)
    n = len(source)
    images = torch.from_numpy(np.stack([source[i].image for i in range(n)])).permute(0, 3, 1, 2).contiguous()
    rows, runs, costs, sizes = [], [], {}, []
    png, meta = sample_sizes(source, n)
    for encoder, weights, rounds in ENCODERS:
        row, r = throughput(encoder, weights, args.rounds or rounds, images, name, kwargs, args, device, tmp)
        row["rounds"] = args.rounds or rounds
        rows.append(row)
        runs += r
        costs[encoder] = stage_costs(source, min(n, 32), encoder, weights, images, args.batch_size, tmp)
        sizes.append(dtype_sizes(encoder, weights, name, kwargs, device, tmp, png, meta, images.shape[-1]))
    projected = projections(png, meta)
    shutil.rmtree(tmp, ignore_errors=True)
    payload = {"machine": machine(), "device": str(device), "data": data_label, "batch_size": args.batch_size,
               "target_ratio": TARGET, "rows": rows, "runs": runs,
               "stage_ms_per_tile": costs, "dtype_sizes": sizes, "mean_png_bytes": png, "mean_meta_bytes": meta,
               "pannuke_projection": projected,
               "description": f"Data: {data_label}; batch {args.batch_size}; shards of 64; device {device}; best "
                              f"of alternating rounds. `extract` includes reading tiles, PNG + "
                              "safetensors encoding, tar writing, sha256, fsync and the manifest; rates use the "
                              "encode-and-write loop's time (start-up excluded; it is in `runs`). Ratio = extract "
                              f"/ bare forward (target {TARGET}). MB/s = cache bytes written per second. CPU "
                              "ratio = CPU seconds of the bare pass / of the extract loop (all threads and "
                              "DataLoader workers): the share of extract's CPU work that is the encoder's. Spread = "
                              "slowest / fastest round: other load on this shared machine."}

    def plot(ax):
        x = np.arange(len(rows))
        keys = ["bare forward (tiles/s)"] + [f"extract w={w} (tiles/s)" for w in args.workers]
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            ax.bar(x + (k - (len(keys) - 1) / 2) * width, [r[key] for r in rows], width=width, label=key)
        ax.set_xticks(x, [r["encoder"] for r in rows])
        ax.set_ylabel("tiles / s")
        ax.set_title(f"stage one vs bare encoder ({device})")
        ax.legend()

    md = write_results(f"extract_{device.type}", payload, rows, plot)
    cost_rows = [{"stage (CPU ms per tile, 1 thread)": k, **{e: c[k] for e, c in costs.items()}}
                 for k in next(iter(costs.values()))]
    md.write_text(md.read_text() + "\n## Where the time goes\n\n" + md_table(cost_rows) + "\n\n## Cache size per "
                  "tile by storage dtype (MB; measured vs projected from the levels)\n\n" + md_table(sizes)
                  + f"\n\n## Projected cache size for PanNuke ({PANNUKE_TILES:,} tiles of {PANNUKE_SIZE}², shards "
                  f"of {SHARD_SIZE})\n\nEvery preset's default blocks (the 4-block ViT presets shallow / deep / "
                  "mixed all have the same size), `--input-policy resize` unless noted, prefix tokens (CLS + "
                  f"registers) stored per level; PNG {png / 1e3:.1f} kB and meta {meta:.0f} B per tile as "
                  "measured on the benchmark tiles; bf16 is the size of fp16.\n\n" + md_table(projected) + "\n")
    print(md.read_text())
    print(json.dumps(costs, indent=1))


if __name__ == "__main__":
    main()
