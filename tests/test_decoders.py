"""cellembed.decoders: shapes for ViT and hierarchical level lists, parameter counts, a tiny overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellembed.data import make_synthetic_tile
from cellembed.decoders import DECODERS, HEADS, activate, assign_slots, build_decoder
from cellembed.targets import cisca_targets
from cellembed.train.losses import cisca_loss

T = 64


def vit_levels(k: int, channels: int = 48, grid: int = 4, tile: int = T) -> list[dict]:
    """k ViT blocks: every level on the same grid."""
    blocks = [round(12 * (i + 1) / k) for i in range(k)]
    return [{"name": f"block_{b}", "block": b, "channels": channels, "grid": [grid, grid], "stride": tile / grid}
            for b in blocks]


def hier_levels(k: int, tile: int = T) -> list[dict]:
    """The last k stages of a 4-stage hierarchical encoder (strides 4, 8, 16, 32)."""
    stages = [(4, 16), (8, 24), (16, 40), (32, 64)][4 - k:]
    return [{"name": f"stage_{i}", "block": i, "channels": c, "grid": [tile // s] * 2, "stride": float(s)}
            for i, (s, c) in enumerate(stages)]


def feats_for(levels: list[dict], n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, lv["channels"], *lv["grid"], generator=g) for lv in levels]


def image_for(n: int = 2, tile: int = T) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, tile, tile), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["vit", "hier"])
@pytest.mark.parametrize("name,skip", [("unetr", False), ("unetr", True), ("light", False)])
def test_output_shapes(name, skip, layout, k):
    levels = vit_levels(k) if layout == "vit" else hier_levels(k)
    dec = build_decoder(name, levels, T, "cisca", num_classes=5, image_skip=skip)
    out = dec(feats_for(levels), image_for() if skip else None)
    assert {k_: tuple(v.shape) for k_, v in out.items()} == {
        "classes": (2, 3, T, T), "directions": (2, 4, T, T), "types": (2, 6, T, T)}
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("k", [5, 6, 8])
def test_more_than_four_levels(k):
    levels = vit_levels(k)
    dec = build_decoder("unetr", levels, T, "hovernet", num_classes=3)
    out = dec(feats_for(levels))
    assert {k_: tuple(v.shape) for k_, v in out.items()} == {"np": (2, 2, T, T), "hv": (2, 2, T, T),
                                                             "nc": (2, 4, T, T)}


def test_odd_tile_size_and_heads():
    levels = vit_levels(2, grid=7, tile=100)
    for head, keys in [("semantic", {"semantic": 4}), ("cisca", {"classes": 3, "directions": 4})]:
        for name in DECODERS:
            out = build_decoder(name, levels, 100, head, num_classes=4 if head == "semantic" else 1)(feats_for(levels))
            assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, c, 100, 100) for k, c in keys.items()}


def test_slot_assignment():
    assert assign_slots(vit_levels(4), T) == [0, 1, 2, 3]
    assert assign_slots(vit_levels(2), T) == [2, 3]
    assert assign_slots(vit_levels(1), T) == [3]
    assert assign_slots(vit_levels(6), T) == [0, 0, 1, 2, 2, 3]
    assert assign_slots(hier_levels(4)[::-1], T) == [3, 2, 1, 0]      # ranked by stride, not list order


@pytest.mark.parametrize("grid,tile", [(16, 256), (14, 256), (16, 224), (14, 224)])
@pytest.mark.parametrize("channels", [384, 768, 1024, 1280, 1536])
def test_light_parameter_count_near_2_6m(channels, grid, tile):
    levels = vit_levels(4, channels=channels, grid=grid, tile=tile)
    dec = build_decoder("light", levels, tile, "cisca", num_classes=5)
    assert dec.num_upsamples == 4
    assert abs(dec.num_trainable_parameters() - 2.6e6) <= 0.1 * 2.6e6


def test_light_reads_the_deepest_level_and_hierarchical_depth():
    levels = hier_levels(4, tile=256)
    dec = build_decoder("light", levels, 256, "semantic", num_classes=3)
    assert dec.index == 3 and dec.num_upsamples == 5          # stride 32 → 5 × 2 upsamples
    assert build_decoder("light", levels, 256, "semantic", 3, num_upsamples=3).num_upsamples == 3


def test_trainable_parameter_count_and_config_round_trip():
    levels = vit_levels(3)
    dec = build_decoder("unetr", levels, T, "cisca", 5, image_skip=True)
    n = dec.num_trainable_parameters()
    assert n == sum(p.numel() for p in dec.parameters()) > 0
    dec.out.requires_grad_(False)
    assert dec.num_trainable_parameters() < n
    again = build_decoder(**dec.config())
    again.load_state_dict(dec.state_dict())
    dec.eval(), again.eval()
    f, im = feats_for(levels), image_for()
    assert torch.equal(dec(f, im)["classes"], again(f, im)["classes"])


def test_gradients_reach_every_parameter():
    levels = hier_levels(3)
    dec = build_decoder("unetr", levels, T, "cisca", 5, image_skip=True)
    out = dec(feats_for(levels), image_for())
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


def test_loud_errors():
    levels = vit_levels(2)
    with pytest.raises(KeyError, match="light, unetr"):
        build_decoder("segformer", levels, T, "cisca", 5)
    with pytest.raises(KeyError, match="cisca, hovernet, semantic"):
        build_decoder("unetr", levels, T, "mask2former", 5)
    with pytest.raises(ValueError, match="image skip"):
        build_decoder("light", levels, T, "cisca", 5, image_skip=True)
    dec = build_decoder("unetr", levels, T, "cisca", 5, image_skip=True)
    with pytest.raises(ValueError, match="image_skip"):
        dec(feats_for(levels))
    with pytest.raises(ValueError, match="expected"):
        dec([torch.randn(2, 7, 4, 4)] * 2, image_for())
    with pytest.raises(ValueError, match="2 levels got 1"):
        dec(feats_for(levels)[:1], image_for())
    with pytest.raises(ValueError, match="NCHW"):
        dec(feats_for(levels), image_for().permute(0, 2, 3, 1))


def test_activate():
    raw = {"classes": torch.randn(1, 3, 4, 4), "directions": torch.randn(1, 4, 4, 4)}
    act = activate("cisca", raw)
    assert torch.allclose(act["classes"].sum(1), torch.ones(1, 4, 4))
    assert act["directions"] is raw["directions"]
    assert "cisca" in HEADS


def cisca_batch(tile: int = T) -> dict[str, torch.Tensor]:
    t = make_synthetic_tile(3, 0, size=tile, n_types=3)
    tg = cisca_targets(t.inst_map, t.type_map, magnification="40x")
    image = torch.from_numpy(t.image).permute(2, 0, 1)[None].contiguous()
    return {"classes": torch.from_numpy(tg.classes)[None].long(), "directions": torch.from_numpy(tg.directions)[None],
            "types": torch.from_numpy(tg.types)[None].long(), "weights": torch.from_numpy(tg.weights)[None],
            "image": image}


@pytest.mark.parametrize("skip", [False, True])
def test_overfits_one_synthetic_tile(skip):
    torch.manual_seed(0)
    batch = cisca_batch()
    levels = vit_levels(4, channels=32)
    # the narrow design: one tile is a batch of one, where BatchNorm (refine=True) has no batch statistics to
    # speak of; the refined design's overfit test below uses four tiles and scores PQ
    dec = build_decoder("unetr", levels, T, "cisca", num_classes=3, image_skip=skip, refine=False)
    feats = feats_for(levels, n=1)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss, _ = cisca_loss(dec(feats, batch["image"] if skip else None), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


@pytest.mark.parametrize("skip", [False, True])
def test_refine_design_and_narrow_design(skip):
    levels = hier_levels(4)
    wide = build_decoder("unetr", levels, T, "cisca", 5, image_skip=skip)
    narrow = build_decoder("unetr", levels, T, "cisca", 5, image_skip=skip, refine=False)
    assert wide.refine and not narrow.refine and wide.config()["refine"] is True
    assert wide.full_channels == 16 and narrow.full_channels == 16
    # the refinement: BatchNorm in every fuse conv, two 3×3 blocks at full resolution, image features at 1/2
    assert all(isinstance(f[1], torch.nn.BatchNorm2d) for f in wide.fuse)
    assert len(wide.full) == 2 and (wide.image_half is not None) == skip
    assert narrow.image_half is None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in narrow.fuse.modules())
    for dec in (wide, narrow):
        out = dec(feats_for(levels), image_for() if skip else None)
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "classes": (2, 3, T, T), "directions": (2, 4, T, T), "types": (2, 6, T, T)}
        again = build_decoder(**dec.config())
        assert again.refine == dec.refine and again.load_state_dict(dec.state_dict())
    with pytest.raises(ValueError, match="full_channels"):
        build_decoder("unetr", levels, T, "cisca", 5, full_channels=-1)
    with pytest.raises(ValueError, match="image_levels"):
        build_decoder("unetr", levels, T, "cisca", 5, image_levels=4)


def test_image_branch_at_quarter_resolution():
    levels = hier_levels(3)
    dec = build_decoder("unetr", levels, T, "cisca", 5, image_skip=True, image_levels=3)
    assert dec.image_quarter is not None and dec.config()["image_levels"] == 3
    assert dec.fuse[1][0].in_channels == 64 * 2 + 32  # upsampled + cached level + image features at 1/4
    out = dec(feats_for(levels), image_for())
    assert tuple(out["classes"].shape) == (2, 3, T, T)
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in dec.image_quarter.parameters())
    again = build_decoder(**dec.config())
    assert again.load_state_dict(dec.state_dict()) and again.image_levels == 3


def test_level_depth_adds_conv_blocks_per_level():
    levels = hier_levels(4)
    one = build_decoder("unetr", levels, T, "cisca", 5, image_skip=True)
    two = build_decoder("unetr", levels, T, "cisca", 5, image_skip=True, level_depth=2)
    assert one.config()["level_depth"] == 1 and len(one.bottom) == 0
    assert two.config()["level_depth"] == 2 and len(two.bottom) == 1
    # level_depth 1 keeps the parameter names of runs recorded before the option existed
    assert "fuse.0.0.weight" in one.state_dict() and "fuse.0.1.0.weight" in two.state_dict()
    extra = sum(p.numel() for p in two.parameters()) - sum(p.numel() for p in one.parameters())
    assert extra == sum(9 * c * c + 2 * c for c in (32, 64, 128, 256))  # one 3×3 conv + BatchNorm per level
    out = two(feats_for(levels), image_for())
    assert tuple(out["directions"].shape) == (2, 4, T, T)
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in two.bottom.parameters())
    again = build_decoder(**two.config())
    assert again.load_state_dict(two.state_dict()) and again.level_depth == 2
    with pytest.raises(ValueError, match="level_depth"):
        build_decoder("unetr", levels, T, "cisca", 5, level_depth=0)


def test_split_trunks_give_each_full_resolution_map_its_own_stack():
    levels = hier_levels(4)
    dec = build_decoder("unetr", levels, T, "cisca", 5, image_skip=True, split_trunks=True)
    assert dec.config()["split_trunks"] is True and dec.full is None
    assert sorted(dec.trunks) == ["classes", "directions"]  # types come from the half-resolution branch
    out = dec(feats_for(levels), image_for())
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "classes": (2, 3, T, T), "directions": (2, 4, T, T), "types": (2, 6, T, T)}
    out["classes"].square().mean().backward()  # the 3-class loss trains its own stack only
    assert all(p.grad is not None for p in dec.trunks["classes"].parameters())
    assert all(p.grad is None for p in dec.trunks["directions"].parameters())
    again = build_decoder(**dec.config())
    assert again.load_state_dict(dec.state_dict()) and again.split_trunks
    narrow = build_decoder("unetr", levels, T, "cisca", 5, refine=False, split_trunks=True)
    assert narrow.split_trunks is False  # the narrow design has no refinement stack to split


@pytest.mark.parametrize("head, key", [("cisca", "types"), ("hovernet", "nc")])
def test_type_branch_predicts_types_at_half_resolution(head, key):
    levels = hier_levels(4)
    dec = build_decoder("unetr", levels, T, head, 5, image_skip=True, type_branch=True)
    assert dec.type_branch and dec.config()["type_branch"] is True and key not in dec.out.convs
    out = dec(feats_for(levels), image_for())
    assert [m.key for m in dec.maps] == list(out) and tuple(out[key].shape) == (2, 6, T, T)
    # the type map's gradient reaches its branch and not the full-resolution layers
    out[key].square().mean().backward()
    assert all(p.grad is not None for p in dec.types.parameters())
    assert all(p.grad is None for p in dec.full.parameters())
    again = build_decoder(**dec.config())
    assert again.type_branch and again.load_state_dict(dec.state_dict())
    # one class: no type map, so no branch
    assert not build_decoder("unetr", levels, T, "cisca", 1, image_skip=True, type_branch=True).type_branch


def test_overfits_a_few_synthetic_tiles_to_high_pq():
    """The decoder path that CoNSeP needs, end to end through CISCA post-processing and PQ: four synthetic
    tiles with touching nuclei, fixed random 'encoder features' (so all spatial detail must come through the
    image branch), refine + image skip, 150 Adam steps, the default loss (PQ 0.93 after 100 steps, 0.98 after 150)."""
    from cellembed.metrics import score_arrays
    from cellembed.postprocess import CISCA_PRESETS, cisca_instances
    from cellembed.train.losses import cisca_loss as loss_fn

    size, n = 64, 4
    tiles = [make_synthetic_tile(5, i, size=size, n_types=3) for i in range(n)]
    tg = [cisca_targets(t.inst_map, t.type_map, magnification="20x") for t in tiles]
    batch = {"classes": torch.from_numpy(np.stack([x.classes for x in tg])).long(),
             "directions": torch.from_numpy(np.stack([x.directions for x in tg])),
             "types": torch.from_numpy(np.stack([x.types for x in tg])).long(),
             "weights": torch.from_numpy(np.stack([x.weights for x in tg]))}
    image = torch.from_numpy(np.stack([t.image for t in tiles])).permute(0, 3, 1, 2).contiguous()
    true = np.stack([np.stack([t.inst_map, t.type_map], -1) for t in tiles]).astype(np.int32)
    levels = hier_levels(4, tile=size)

    def pq_after(refine: bool, steps: int = 150) -> float:
        torch.manual_seed(0)
        dec = build_decoder("unetr", levels, size, "cisca", 3, image_skip=True, refine=refine)
        feats = feats_for(levels, n=n)
        opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
        for _ in range(steps):
            loss, _ = loss_fn(dec(feats, image), batch, mode="mindthegap-msge")
            opt.zero_grad()
            loss.backward()
            opt.step()
        dec.eval()
        with torch.no_grad():
            maps = activate("cisca", dec(feats, image))
        pred = np.stack([np.stack(cisca_instances(maps["classes"][i].numpy(), maps["directions"][i].numpy(),
                                                  maps["types"][i].numpy(), CISCA_PRESETS["20x"]), -1)
                         for i in range(n)]).astype(np.int32)
        return score_arrays(pred, true, num_classes=3)["summary"]["pq"]

    pq = pq_after(True)
    assert pq >= 0.9, pq
