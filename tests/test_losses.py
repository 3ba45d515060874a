"""cellembed.train.losses: perfect predictions, gradients, Tversky asymmetry, weights, CISCA by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from cellembed.data import make_synthetic_tile
from cellembed.targets import cisca_targets, hover_targets
from cellembed.train.losses import (
    CISCA_WEIGHTS_TYPED,
    CISCA_WEIGHTS_UNTYPED,
    cisca_loss,
    derivative_kernels,
    hovernet_loss,
    semantic_loss,
    directional_gradient,
    tversky_loss,
    weighted_mae,
    weighted_msge,
)

SIZE = 48


def logits_of(labels: torch.Tensor, k: int, scale: float = 40.0) -> torch.Tensor:
    """(N, H, W) labels → (N, k, H, W) confident logits."""
    return torch.nn.functional.one_hot(labels.long(), k).permute(0, 3, 1, 2).float() * scale


@pytest.fixture(scope="module")
def tiles():
    return [make_synthetic_tile(11, i, size=SIZE, n_types=3) for i in range(2)]


@pytest.fixture(scope="module")
def cisca_tg(tiles):
    tg = [cisca_targets(t.inst_map, t.type_map, magnification="40x") for t in tiles]
    stack = lambda f: torch.from_numpy(np.stack([getattr(x, f) for x in tg]))
    return {"classes": stack("classes").long(), "directions": stack("directions"), "types": stack("types").long(),
            "weights": stack("weights")}


@pytest.fixture(scope="module")
def hover_tg(tiles):
    tg = [hover_targets(t.inst_map, t.type_map) for t in tiles]
    return {"np": torch.from_numpy(np.stack([x.np for x in tg])), "hv": torch.from_numpy(np.stack([x.hv for x in tg])),
            "nc": torch.from_numpy(np.stack([x.nc for x in tg]))}


def perfect_cisca(tg) -> dict:
    return {"classes": logits_of(tg["classes"], 3), "directions": tg["directions"].clone(),
            "types": logits_of(tg["types"], 4)}


def noisy(outputs: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (0.1 * v + torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in outputs.items()}


def test_mindthegap_perfect_is_zero_and_noisy_positive(cisca_tg):
    loss, terms = cisca_loss(perfect_cisca(cisca_tg), cisca_tg)
    assert float(loss) < 1e-4 and set(terms) == {"classes_ce", "classes_dice", "directions_mae", "types_ce",
                                                 "types_tversky"}
    out = noisy(perfect_cisca(cisca_tg))
    loss, terms = cisca_loss(out, cisca_tg)
    assert float(loss.detach()) > 0.5 and all(v > 0 for v in terms.values())
    loss.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in out.values())


def test_cisca_mode_perfect_leaves_only_its_pixel_tversky(cisca_tg):
    # CISCA's per-pixel Tversky is ~1 on every y = 0 pixel whose p is not ~1e-8: not zero even when perfect.
    loss, terms = cisca_loss(perfect_cisca(cisca_tg), cisca_tg, mode="cisca")
    assert max(v for k, v in terms.items() if k != "types_tversky") < 1e-4
    assert float(loss) == pytest.approx(5 / 14 * terms["types_tversky"], rel=1e-4, abs=1e-6)
    out = noisy(perfect_cisca(cisca_tg))
    loss, _ = cisca_loss(out, cisca_tg, mode="cisca", msge_all=True)
    loss.backward()
    assert float(loss.detach()) > 0 and all(v.grad.abs().sum() > 0 for v in out.values())


def test_untyped_cisca_drops_types(cisca_tg):
    out = {k: v for k, v in noisy(perfect_cisca(cisca_tg)).items() if k != "types"}
    for mode in ("mindthegap", "cisca"):
        _, terms = cisca_loss(out, cisca_tg, mode=mode)
        assert not any(k.startswith("types") for k in terms)
    loss, terms = cisca_loss(out, cisca_tg, mode="cisca")
    w = np.array(CISCA_WEIGHTS_UNTYPED) / 9.0
    parts = [terms[k] for k in ("classes_cce", "dice_boundary", "dice_body", "directions_mae", "directions_msge")]
    assert float(loss.detach()) == pytest.approx(float(np.dot(w, parts)), rel=1e-5)


def test_msge_mode_adds_the_weighted_gradient_error_of_all_four_maps(cisca_tg):
    loss, terms = cisca_loss(perfect_cisca(cisca_tg), cisca_tg, mode="mindthegap-msge")
    assert float(loss) < 1e-4 and "directions_msge" in terms
    out = noisy(perfect_cisca(cisca_tg))
    base, base_terms = cisca_loss(out, cisca_tg)
    loss, terms = cisca_loss(out, cisca_tg, mode="mindthegap-msge")
    # hand computation: (w · (∇ŷ − ∇y)²) averaged over pixels and the 4 maps, / mean(w)
    d = out["directions"].detach()
    diff = directional_gradient(d, (0, 1, 2, 3)) - directional_gradient(cisca_tg["directions"], (0, 1, 2, 3))
    w = cisca_tg["weights"].unsqueeze(1)
    expected = float((w * diff ** 2).mean() / w.mean())
    assert terms["directions_msge"] == pytest.approx(expected, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(base.detach()) + expected, rel=1e-5)
    assert {k: v for k, v in terms.items() if k != "directions_msge"} == pytest.approx(base_terms)
    # a directional map shifted by one pixel keeps most of its MAE small but its gradients wrong
    shifted = cisca_tg["directions"].roll(1, dims=-1)
    assert float(weighted_msge(shifted, cisca_tg["directions"], cisca_tg["weights"])) > 0.01
    loss.backward()
    assert out["directions"].grad.abs().sum() > 0


def test_unknown_mode_and_missing_keys(cisca_tg):
    with pytest.raises(ValueError, match="mindthegap, mindthegap-msge, cisca"):
        cisca_loss(perfect_cisca(cisca_tg), cisca_tg, mode="cellvit")
    with pytest.raises(KeyError, match="directions"):
        cisca_loss({"classes": logits_of(cisca_tg["classes"], 3)}, cisca_tg)


def test_tversky_weights_false_negatives_by_alpha():
    y = torch.zeros(1, 1, 10, 10)
    y[..., :5] = 1.0
    missed = y.clone()
    missed[..., :2] = 0.0                                  # 20 false negatives
    extra = y.clone()
    extra[..., 5:7] = 1.0                                  # 20 false positives
    fn, fp = float(tversky_loss(missed, y, smooth=0.0)), float(tversky_loss(extra, y, smooth=0.0))
    assert fn == pytest.approx(1 - 30 / (30 + 0.7 * 20)) and fp == pytest.approx(1 - 50 / (50 + 0.3 * 20))
    assert fn > fp


def test_weight_map_weights_the_mae():
    target = torch.zeros(1, 4, 8, 8)
    w = torch.full((1, 8, 8), 0.05)
    w[:, :4] = 1.0
    near, far = target.clone(), target.clone()
    near[:, :, 1, 1] = 1.0
    far[:, :, 6, 6] = 1.0
    assert float(weighted_mae(near, target, w)) == pytest.approx(20 * float(weighted_mae(far, target, w)))
    tg = {"classes": torch.zeros(1, 8, 8, dtype=torch.long), "directions": target, "weights": w}
    base = {"classes": logits_of(tg["classes"], 3)}
    near_loss = cisca_loss({**base, "directions": near}, tg)[1]["directions_mae"]
    far_loss = cisca_loss({**base, "directions": far}, tg)[1]["directions_mae"]
    assert near_loss == pytest.approx(20 * far_loss)


def correlate_same(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Zero-padded 'same' correlation of (H, W) with a 5×5 kernel, by explicit loops."""
    h, w = a.shape
    p = np.pad(a, 2)
    return np.array([[(p[r:r + 5, c:c + 5] * k).sum() for c in range(w)] for r in range(h)])


def cisca_by_hand(cl, dirs, ty, y_cls, y_dir, y_ty, w) -> float:
    """CISCA.md §2.2 written out in numpy, for N = 1, float64."""
    eps, a = 1e-8, 0.7
    soft = lambda z: np.exp(z) / np.exp(z).sum(0)
    p, q = soft(cl), soft(ty)
    oh, ohq = np.eye(3)[y_cls].transpose(2, 0, 1), np.eye(q.shape[0])[y_ty].transpose(2, 0, 1)
    cce = -(oh * np.log(np.clip(p, eps, 1 - eps))).sum(0).mean()
    dice = [(2 * (oh[c] * p[c]).sum() + 1) / (oh[c].sum() + p[c].sum() + 1) for c in (0, 1)]
    tcce = -(ohq * np.log(np.clip(q, eps, 1 - eps))).sum(0).mean()
    tv = (1 - np.clip((ohq * q + eps) / (a * ohq + (1 - a) * q + eps), eps, 1 - eps)).mean()
    mae = (w * np.abs(y_dir - dirs)).mean() / (w.mean() + eps) + 0.01 * ((1 - w) * np.abs(dirs)).mean()
    r = np.arange(-2, 3)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    n2 = np.where(dx ** 2 + dy ** 2 == 0, 1, dx ** 2 + dy ** 2)
    kernels = {2: (dx + dy) / n2, 3: np.rot90((dx + dy) / n2)}   # bl: the tl kernel rotated 90° (CISCA.md §2.2)
    msge = np.mean([w * (correlate_same(dirs[c], k) - correlate_same(y_dir[c], k)) ** 2
                    for c, k in kernels.items()]) / (w.mean() + eps)
    terms = [cce, 1 - dice[0], 1 - dice[1], tcce + tv, mae, msge]
    return float(np.dot(np.array(CISCA_WEIGHTS_TYPED) / 14, terms))


def test_cisca_mode_matches_a_hand_computation():
    rng = np.random.default_rng(3)
    h, w_ = 6, 5
    cl, dirs, ty = rng.normal(size=(3, h, w_)), rng.uniform(-1, 1, (4, h, w_)), rng.normal(size=(3, h, w_))
    y_cls, y_ty = rng.integers(0, 3, (h, w_)), rng.integers(0, 3, (h, w_))
    y_dir, w = rng.uniform(-1, 1, (4, h, w_)), np.where(rng.random((h, w_)) < 0.5, 1.0, 0.05)
    t = lambda a, dt=torch.float64: torch.from_numpy(np.ascontiguousarray(a))[None].to(dt)
    outputs = {"classes": t(cl), "directions": t(dirs), "types": t(ty)}
    targets = {"classes": t(y_cls, torch.long), "directions": t(y_dir), "types": t(y_ty, torch.long), "weights": t(w)}
    loss, _ = cisca_loss(outputs, targets, mode="cisca")
    assert float(loss) == pytest.approx(cisca_by_hand(cl, dirs, ty, y_cls, y_dir, y_ty, w), rel=1e-4)


def test_derivative_kernels_are_the_directional_ones():
    k = derivative_kernels().numpy()[:, 0]
    assert k[0, 2, 4] == pytest.approx(0.5) and k[0, 2, 0] == pytest.approx(-0.5) and k[0, 0, 2] == 0  # h: dx
    assert k[1, 4, 2] == pytest.approx(0.5) and k[1, 2, 4] == 0                                          # v: dy
    np.testing.assert_allclose(k[3], np.rot90(k[2]), atol=1e-7)                                      # bl = rot90(tl)


def test_hovernet_loss(hover_tg):
    perfect = {"np": logits_of(hover_tg["np"], 2), "hv": hover_tg["hv"].clone(), "nc": logits_of(hover_tg["nc"], 4)}
    loss, terms = hovernet_loss(perfect, hover_tg)
    assert float(loss) < 1e-4 and set(terms) == {"np_ce", "np_dice", "nc_ce", "nc_dice", "hv_mse", "hv_msge"}
    out = noisy(perfect)
    loss, terms = hovernet_loss(out, hover_tg)
    loss.backward()
    assert all(v > 0 for v in terms.values()) and all(v.grad.abs().sum() > 0 for v in out.values())
    # MSGE looks only at nucleus pixels (and their 5×5 neighbourhood through the kernel): a bump far away is free.
    far = hover_tg["hv"].clone()
    dist = torch.from_numpy(np.stack([ndi.distance_transform_edt(m == 0) for m in hover_tg["np"].numpy()]))
    far[:, 0][dist > 3] += 1.0
    if (dist > 3).any():
        _, t2 = hovernet_loss({**perfect, "hv": far}, hover_tg)
        assert t2["hv_msge"] < 1e-6 and t2["hv_mse"] > 0


def test_semantic_loss():
    y = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    loss, terms = semantic_loss({"semantic": logits_of(y, 4)}, {"semantic": y})
    assert float(loss) < 1e-4
    out = noisy({"semantic": logits_of(y, 4)})
    loss, terms = semantic_loss(out, {"semantic": y})
    loss.backward()
    assert terms["semantic_ce"] > 0 and terms["semantic_dice"] > 0 and out["semantic"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="does not match"):
        semantic_loss({"semantic": logits_of(y, 4)[:, :, :8]}, {"semantic": y})
