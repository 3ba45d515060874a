"""Training losses for the decoder heads (DESIGN.md §6, CISCA.md §2.2, HoVer-Net).

Every loss takes the decoder's *raw* outputs (logits for categorical maps, linear regression maps) and
a dict of target tensors, and returns ``(total, terms)``: a scalar tensor to back-propagate and a dict
of the unweighted terms as floats, for logging.

Target tensors (all (N, T, T) unless stated; integer maps may be any integer dtype):
    cisca: "classes" (0 boundary / 1 body / 2 background), "directions" (N, 4, T, T) float,
        "types" (0 background / 1..C), "weights" float (CISCA.md §1.5).
    hovernet: "np" (0/1), "hv" (N, 2, T, T) float (x then y), "nc" (0 background / 1..C).
    semantic: "semantic" (0..C-1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CISCA_MODES = ("mindthegap", "mindthegap-msge", "cisca")
TVERSKY_ALPHA = 0.7
"""Weight on false negatives in the Tversky losses (false positives get 1 - alpha)."""
CISCA_WEIGHTS_TYPED = (2.0, 1.0, 2.0, 5.0, 2.0, 2.0)
"""CISCA.md §2.2: CCE, 1 - Dice boundary, 1 - Dice body, types (CCE + Tversky), MAE_w, MSGE_w; / sum."""
CISCA_WEIGHTS_UNTYPED = (2.0, 1.0, 2.0, 2.0, 2.0)
"""The same without the types term (one-class data such as CytoDArk0)."""
EPS = 1e-8


# ----------------------------------------------------------------------------------------------- helpers
def _one_hot(target: torch.Tensor, k: int) -> torch.Tensor:
    """(N, H, W) integer → (N, k, H, W) float one-hot."""
    return F.one_hot(target.long(), k).permute(0, 3, 1, 2).float()


def _check(outputs: dict, targets: dict, key: str, tkey: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tkey = tkey or key
    if key not in outputs or tkey not in targets:
        raise KeyError(f"loss needs output {key!r} and target {tkey!r}; got outputs {sorted(outputs)}, "
                       f"targets {sorted(targets)}")
    out, tgt = outputs[key].float(), targets[tkey]
    if out.shape[0] != tgt.shape[0] or out.shape[-2:] != tgt.shape[-2:]:
        raise ValueError(f"{key}: output {tuple(out.shape)} does not match target {tuple(tgt.shape)}")
    return out, tgt.to(out.device)


def dice_loss(probs: torch.Tensor, onehot: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-channel soft Dice loss over the whole batch.

    Args:
        probs, onehot: (N, K, H, W).
        smooth: added to numerator and denominator.

    Returns:
        (K,) 1 - (2 Σ y p + s) / (Σ y + Σ p + s).
    """
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    return 1.0 - (2.0 * inter + smooth) / (onehot.sum(dims) + probs.sum(dims) + smooth)


def tversky_loss(probs: torch.Tensor, onehot: torch.Tensor, alpha: float = TVERSKY_ALPHA,
                 smooth: float = 1.0) -> torch.Tensor:
    """Per-channel Tversky loss over the whole batch, alpha on false negatives.

    Args:
        probs, onehot: (N, K, H, W).
        alpha: weight of false negatives Σ y (1 - p); false positives Σ (1 - y) p get 1 - alpha.
        smooth: added to numerator and denominator.

    Returns:
        (K,) 1 - (TP + s) / (TP + alpha FN + (1 - alpha) FP + s).
    """
    dims = (0, 2, 3)
    tp = (probs * onehot).sum(dims)
    fn = ((1.0 - probs) * onehot).sum(dims)
    fp = (probs * (1.0 - onehot)).sum(dims)
    return 1.0 - (tp + smooth) / (tp + alpha * fn + (1.0 - alpha) * fp + smooth)


def weighted_mae(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean(w |y - ŷ|) / (mean(w) + 1e-8) over pixels and channels.

    Args:
        pred, target: (N, K, H, W); weights: (N, H, W), broadcast over K.
    """
    w = weights.float().unsqueeze(1)
    return (w * (pred - target).abs()).mean() / (w.mean() + EPS)


def derivative_kernels(dtype=torch.float32, device=None) -> torch.Tensor:
    """5×5 directional-derivative kernels (CISCA.md §2.2/§3, HoVer-Net's Sobel-5), as a correlation.

    Returns:
        (4, 1, 5, 5): h = dx/(dx²+dy²), v = dy/(…), tl = (dx + dy)/(…), bl = (dx − dy)/(…), with dx the
        column offset and dy the row offset (rows point down) from the centre tap, which is 0.
    """
    r = torch.arange(-2, 3, dtype=torch.float64)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    norm = dx * dx + dy * dy
    norm[2, 2] = 1.0
    k = torch.stack([dx, dy, dx + dy, dx - dy]) / norm
    return k.unsqueeze(1).to(dtype=dtype, device=device)


def directional_gradient(maps: torch.Tensor, channels: tuple[int, ...]) -> torch.Tensor:
    """Correlate each selected map with its own direction's kernel (zero padding, 'same').

    Args:
        maps: (N, K, H, W) with channel c in ``channels`` a map of direction c (0 h, 1 v, 2 tl, 3 bl).
        channels: which channels to differentiate.

    Returns:
        (N, len(channels), H, W).
    """
    k = derivative_kernels(maps.dtype, maps.device)[list(channels)]
    return F.conv2d(maps[:, list(channels)], k, padding=2, groups=len(channels))


# -------------------------------------------------------------------------------------------------- cisca
def cisca_loss(outputs: dict, targets: dict, mode: str = "mindthegap",
               msge_all: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the cisca head.

    ``mindthegap`` (default, DESIGN.md §6): CE + mean-class Dice (+1 smoothing) on the 3-class map,
    MAE weighted by the CISCA weight map on the 4 directional maps, CE + Tversky (alpha 0.7 on false
    negatives, mean over the C + 1 channels) on types; all terms summed with weight 1.
    ``mindthegap-msge``: the same plus the MSGE of all four directional maps (the squared difference of their
    5×5 directional derivatives, weighted by the CISCA weight map as in CISCA.md §2.2), with weight 1. CISCA's
    post-processing cuts nuclei apart where these derivatives are steep, so this term trains exactly what
    it reads.
    ``cisca``: CISCA's exact weighting (CISCA.md §2.2, see ``_cisca_exact``).
    Without a "types" output (one-class data) the type terms are left out.

    Args:
        outputs: "classes" (N, 3, T, T) logits, "directions" (N, 4, T, T), optional "types"
            (N, C+1, T, T) logits.
        targets: see the module docstring.
        mode: "mindthegap", "mindthegap-msge" or "cisca".
        msge_all: cisca mode only: MSGE on all four maps instead of CISCA's two diagonals (§7 item 2).

    Returns:
        (total, terms): scalar tensor, unweighted terms as floats.
    """
    if mode not in CISCA_MODES:
        raise ValueError(f"unknown cisca loss mode {mode!r}; valid: {', '.join(CISCA_MODES)}")
    if mode == "cisca":
        terms = _cisca_exact(outputs, targets, msge_all)
        typed = "types" in outputs
        w = torch.tensor(CISCA_WEIGHTS_TYPED if typed else CISCA_WEIGHTS_UNTYPED)
        w = (w / w.sum()).tolist()
        order = ["classes_cce", "dice_boundary", "dice_body"] + (["types"] if typed else []) + \
                ["directions_mae", "directions_msge"]
        total = sum(wi * terms[name] for wi, name in zip(w, order))
    else:
        terms = _mindthegap(outputs, targets, msge=mode == "mindthegap-msge")
        total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items() if k != "types"}


def weighted_msge(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                  channels: tuple[int, ...] = (0, 1, 2, 3)) -> torch.Tensor:
    """mean(w (∇ŷ − ∇y)²) / (mean(w) + 1e-8): CISCA's MSGE_w (CISCA.md §2.2) on the chosen directional maps.

    Args:
        pred, target: (N, 4, H, W) directional maps (h, v, tl, bl); weights: (N, H, W).
        channels: which maps to differentiate, each along its own direction.
    """
    w = weights.float().unsqueeze(1)
    diff = directional_gradient(pred, channels) - directional_gradient(target, channels)
    return (w * diff * diff).mean() / (w.mean() + EPS)


def _mindthegap(outputs: dict, targets: dict, msge: bool = False) -> dict[str, torch.Tensor]:
    logits, classes = _check(outputs, targets, "classes")
    terms = {"classes_ce": F.cross_entropy(logits, classes.long()),
             "classes_dice": dice_loss(logits.softmax(1), _one_hot(classes, logits.shape[1])).mean()}
    pred, target = _check(outputs, targets, "directions")
    terms["directions_mae"] = weighted_mae(pred, target.float(), targets["weights"].to(pred.device))
    if msge:
        terms["directions_msge"] = weighted_msge(pred, target.float(), targets["weights"].to(pred.device))
    if "types" in outputs:
        logits, types = _check(outputs, targets, "types")
        terms["types_ce"] = F.cross_entropy(logits, types.long())
        terms["types_tversky"] = tversky_loss(logits.softmax(1), _one_hot(types, logits.shape[1])).mean()
    return terms


def _clipped_cce(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Keras categorical CE: softmax, clip to [1e-8, 1 - 1e-8], -Σ_c y log p, mean over pixels."""
    p = logits.softmax(1).clamp(EPS, 1.0 - EPS)
    return -(onehot * p.log()).sum(1).mean()


def pixel_tversky(probs: torch.Tensor, onehot: torch.Tensor, alpha: float = TVERSKY_ALPHA) -> torch.Tensor:
    """CISCA's per-pixel Tversky: mean over pixels and channels of 1 − clip((yp + ε)/(αy + (1−α)p + ε))."""
    ratio = (onehot * probs + EPS) / (alpha * onehot + (1.0 - alpha) * probs + EPS)
    return (1.0 - ratio.clamp(EPS, 1.0 - EPS)).mean()


def _cisca_exact(outputs: dict, targets: dict, msge_all: bool) -> dict[str, torch.Tensor]:
    """CISCA.md §2.2 terms, unweighted ("types" = CCE + Tversky, also reported separately)."""
    logits, classes = _check(outputs, targets, "classes")
    onehot, probs = _one_hot(classes, 3), logits.softmax(1)
    dice = 1.0 - dice_loss(probs, onehot, smooth=1.0)
    terms = {"classes_cce": _clipped_cce(logits, onehot), "dice_boundary": 1.0 - dice[0], "dice_body": 1.0 - dice[1]}
    if "types" in outputs:
        logits, types = _check(outputs, targets, "types")
        onehot = _one_hot(types, logits.shape[1])
        terms["types_cce"] = _clipped_cce(logits, onehot)
        terms["types_tversky"] = pixel_tversky(logits.softmax(1), onehot)
        terms["types"] = terms["types_cce"] + terms["types_tversky"]
    pred, target = _check(outputs, targets, "directions")
    target = target.float()
    w = targets["weights"].to(pred.device).float().unsqueeze(1)
    terms["directions_mae"] = (w * (target - pred).abs()).mean() / (w.mean() + EPS) + \
        0.01 * ((1.0 - w) * pred.abs()).mean()
    channels = (0, 1, 2, 3) if msge_all else (2, 3)
    terms["directions_msge"] = weighted_msge(pred, target, targets["weights"].to(pred.device), channels)
    return terms


# ----------------------------------------------------------------------------------------- hovernet, semantic
SEMANTIC_IGNORE = 255  # = cellembed.data.IGNORE (the loss module does not import the data package)

def hovernet_loss(outputs: dict, targets: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """HoVer-Net's loss: NP CE + Dice, HV MSE + MSGE, NC CE + Dice, all with weight 1.

    Dice is HoVer-Net's: per channel over the batch with smoothing 1e-3, *summed* over channels. MSGE is
    the squared difference of the 5×5 Sobel-style derivatives (x map along columns, y map along rows),
    averaged over nucleus pixels (target NP = 1).

    Args:
        outputs: "np" (N, 2, T, T) logits, "hv" (N, 2, T, T), "nc" (N, C+1, T, T) logits.
        targets: "np", "hv" (N, 2, T, T), "nc".

    Returns:
        (total, terms).
    """
    terms = {}
    for key in ("np", "nc"):
        logits, target = _check(outputs, targets, key)
        terms[f"{key}_ce"] = F.cross_entropy(logits, target.long())
        terms[f"{key}_dice"] = dice_loss(logits.softmax(1), _one_hot(target, logits.shape[1]), smooth=1e-3).sum()
    pred, target = _check(outputs, targets, "hv")
    target = target.float()
    terms["hv_mse"] = F.mse_loss(pred, target)
    focus = (targets["np"].to(pred.device) > 0).float().unsqueeze(1)
    diff = directional_gradient(pred, (0, 1)) - directional_gradient(target, (0, 1))
    terms["hv_msge"] = (focus * diff * diff).sum() / (2.0 * focus.sum() + EPS)
    return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}


def semantic_loss(outputs: dict, targets: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + mean-class soft Dice (+1 smoothing) for the semantic head; pixels of value ``IGNORE`` (255,
    ``cellembed.data.IGNORE``: unlabelled) count in neither term.

    Args:
        outputs: "semantic" (N, C, T, T) logits.
        targets: "semantic" (N, T, T) integer in 0..C-1, or 255 (ignored).

    Returns:
        (total, terms).
    """
    logits, target = _check(outputs, targets, "semantic")
    target = target.long()
    valid = (target != SEMANTIC_IGNORE).unsqueeze(1).float()
    onehot = _one_hot(torch.where(valid[:, 0] > 0, target, 0), logits.shape[1]) * valid
    ce = F.cross_entropy(logits, target, ignore_index=SEMANTIC_IGNORE) if valid.any() else logits.sum() * 0.0
    terms = {"semantic_ce": ce, "semantic_dice": dice_loss(logits.softmax(1) * valid, onehot).mean()}
    return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}
