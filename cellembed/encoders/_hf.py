"""Hugging Face transformers ViTs (Phikon-v2, Hibou) behind timm's `forward_intermediates` contract.

transformers is optional: building these presets without it raises ImportError naming the install.
"""

from __future__ import annotations

import torch
from torch import nn

from ._spec import EncoderSpec


def _transformers(spec: EncoderSpec):
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"encoder {spec.name} is a Hugging Face transformers model: "
                          f"pip install transformers") from err
    return transformers


def create(spec: EncoderSpec) -> "HFViTBackbone":
    """Random-init model of the spec's architecture (`spec.arch` is a transformers class name)."""
    tf = _transformers(spec)
    kwargs = {k: v for k, v in spec.build_kwargs.items() if k != "trust_remote_code"}
    config = getattr(tf, spec.arch.replace("Model", "Config"))(**kwargs)
    return HFViTBackbone(getattr(tf, spec.arch)(config), spec.num_prefix_tokens, spec.patch_size)


def from_pretrained(spec: EncoderSpec, repo: str) -> "HFViTBackbone":
    """Pretrained model from the hub (custom code allowed where the spec says so)."""
    tf = _transformers(spec)
    remote = bool(spec.build_kwargs.get("trust_remote_code", False))
    model = tf.AutoModel.from_pretrained(repo, trust_remote_code=remote)
    return HFViTBackbone(model, spec.num_prefix_tokens, spec.patch_size)


class HFViTBackbone(nn.Module):
    """Wraps a transformers ViT so that it answers like timm's ``forward_intermediates``.

    Args:
        model: a transformers model returning ``hidden_states`` (embeddings, then one per layer; pre-norm).
        num_prefix_tokens: CLS + register tokens at the start of each sequence.
        patch_size: pixels per token side.
    """

    def __init__(self, model: nn.Module, num_prefix_tokens: int, patch_size: int):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self.patch_size = patch_size

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def prune_intermediate_layers(self, indices, **_) -> list[int]:
        """Drop the layers after the last selected one (their outputs are never used)."""
        self.model.encoder.layer = self.layers[: max(indices) + 1]
        return list(indices)

    def forward_intermediates(self, x: torch.Tensor, indices) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Token grids and prefix tokens after the given 0-based layers.

        Args:
            x: (N, 3, H, W) normalised float images, H and W multiples of the patch size.
            indices: 0-based layer indices.

        Returns:
            (feats, prefix): feats (N, C, H/p, W/p) and prefix (N, P, C), one per index.
        """
        states = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        n, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        feats, prefix = [], []
        for i in indices:
            tokens = states[i + 1]
            prefix.append(tokens[:, : self.num_prefix_tokens])
            grid = tokens[:, self.num_prefix_tokens:]
            feats.append(grid.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return feats, prefix
