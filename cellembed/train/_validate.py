"""Validation every epoch: losses and, for instance heads, PQ / mPQ+ / AJI with the run's real post-processing.

Under DDP each rank scores its own images and :func:`reduce_validation` aggregates the shares of every rank once.
"""

from __future__ import annotations

import numpy as np
import torch

from cellembed.evaluate._predict import (
    INSTANCE_HEADS,
    Postprocess,
    batch_instances,
    decoder_maps,
    semantic_counts,
    semantic_summary,
    true_maps,
)
from cellembed.train import _ddp as ddp


@torch.no_grad()
def validate(model, loader, device, post: Postprocess, num_classes: int, loss_fn=None) -> dict:
    """Validation losses and, for instance heads, PQ / mPQ+ / AJI with the run's real post-processing.

    Under DDP each rank scores its own images; the per-image counts of every rank are gathered and aggregated
    once, in tile-key order, so the scores equal a single process's on the same predictions (never a mean of rank
    means). ``val_loss`` is the sample-weighted mean of the batch losses of every rank.
    """
    from cellembed.metrics import image_counts

    model.eval()
    total, n, parts, counts, sem = 0.0, 0, {}, [], np.zeros((max(num_classes, 1), 3), np.int64)
    for batch in loader:
        outputs, maps = decoder_maps(model, batch, device)
        size = len(batch.image)
        if loss_fn is not None:
            loss, terms = loss_fn(outputs, batch.targets)
            total, n = total + float(loss) * size, n + size
            for k, v in terms.items():
                parts[k] = parts.get(k, 0.0) + float(v) * size
        if post.head in INSTANCE_HEADS:
            pred, true = batch_instances(maps, post), true_maps(batch)
            counts += [(key, image_counts(p, t, num_classes)) for key, p, t in zip(batch.keys, pred, true)]
        else:
            sem += semantic_counts(maps, batch, num_classes)
    return reduce_validation(ddp.gather_all([(total, n, parts, counts, sem)]), post.head, num_classes,
                             loss_fn is not None)


def reduce_validation(shares: list[tuple], head: str, num_classes: int, losses: bool = True) -> dict:
    """The validation metrics of every rank's share ``(loss sum, samples, loss-term sums, [(tile key,
    ImageCounts)], semantic (K, 3) counts)``: losses summed, instance counts scored once on their union sorted by
    tile key (the same list whatever the number of ranks or reader workers), semantic counts summed."""
    from cellembed.metrics import score_counts

    total, n = sum(s[0] for s in shares), sum(s[1] for s in shares)
    parts: dict[str, float] = {}
    for share in shares:
        for k, v in share[2].items():
            parts[k] = parts.get(k, 0.0) + v
    out = {}
    if losses:
        out = {"val_loss": total / max(n, 1), **{f"val_{k}": v / max(n, 1) for k, v in parts.items()}}
    counts = [c for _, c in sorted((kc for share in shares for kc in share[3]), key=lambda kc: kc[0])]
    if counts:
        s = score_counts(counts, num_classes)["summary"]
        out.update({f"val_{k}": s[k] for k in ("pq", "dq", "sq", "aji", "mpq_plus")})
    elif head == "semantic":
        out.update({f"val_{k}": v for k, v in semantic_summary(sum(s[4] for s in shares)).items()})
    return out
