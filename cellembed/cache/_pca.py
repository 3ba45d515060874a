"""PCA-k storage (``--codec pca<K>``): a per-level basis fitted once before any shard is written, K coefficients
per position in the shards, C channels reconstructed when read.

The basis is one safetensors file in the cache folder (:data:`PCA_FILE`) holding, per PCA level, ``<level>.mean``
(C,) float32, ``<level>.components`` (K, C) float32 (orthonormal rows, by decreasing variance) and
``<level>.eigenvalues`` (C,) float64 (every eigenvalue of the channel covariance, decreasing). Its sha256 is part
of the cache identity, so a cache never mixes shards of two bases.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cellembed.cache._manifest import CacheError

PCA_FILE = "pca.safetensors"


class Basis(NamedTuple):
    """One level's PCA basis.

    Attributes:
        mean: (C,) float32 channel mean of the fitting tiles.
        components: (K, C) float32, orthonormal rows, by decreasing variance.
    """

    mean: torch.Tensor
    components: torch.Tensor

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) features → (N, K, h, w) float32 coefficients ``components @ (x − mean)``."""
        comps, mean = self.components.to(x.device), self.mean.to(x.device)
        return torch.einsum("kc,nchw->nkhw", comps, x.float() - mean[:, None, None])

    def reconstruct(self, coeffs: torch.Tensor) -> torch.Tensor:
        """(..., K, h, w) coefficients → (..., C, h, w) ``componentsᵀ @ coeffs + mean``, in the coefficients' dtype."""
        x = torch.einsum("kc,...khw->...chw", self.components, coeffs.float())
        return (x + self.mean[:, None, None]).to(coeffs.dtype)


@torch.inference_mode()
def fit_bases(feats: Iterable[dict[str, torch.Tensor]], ks: dict[str, int]) -> bytes:
    """Fit the basis of every level of ``ks`` (level → K) and return the basis file's bytes.

    Args:
        feats: batches of features, level name → (N, C, h, w) float tensor (any device); every spatial position of
            every tile is one observation. Channel sums and the Gram matrix are accumulated in float64.
        ks: the PCA levels and their K.

    Raises:
        CacheError: non-finite features, or no batch.
    """
    acc: dict[str, list] = {}
    for batch in feats:
        for name in ks:
            x = batch[name].double().transpose(0, 1).reshape(batch[name].shape[1], -1)  # (C, N·h·w)
            s, g, n = acc.get(name, (0, 0, 0))
            acc[name] = [s + x.sum(1), g + x @ x.T, n + x.shape[1]]
    if not acc:
        raise CacheError("PCA fit: no tiles to fit the basis on")
    tensors = {}
    for name, k in ks.items():
        s, g, n = acc[name]
        mean = s / n
        cov = g / n - torch.outer(mean, mean)
        if not torch.isfinite(cov).all():
            raise CacheError(f"PCA fit: the encoder gave non-finite features at {name} on the fitting tiles; check "
                             "the weights and tiles, or store this level with another codec")
        values, vectors = torch.linalg.eigh(cov.cpu())  # ascending
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        comps = vectors[:, :k].T.contiguous()
        sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))  # largest entry positive
        tensors[f"{name}.mean"] = mean.cpu().float()
        tensors[f"{name}.components"] = (comps * sign).float().contiguous()
        tensors[f"{name}.eigenvalues"] = values.contiguous()
    return st_save(tensors)


def load_bases(data: bytes) -> dict[str, Basis]:
    """The basis file's bytes → {level: :class:`Basis`} (CPU)."""
    tensors = st_load(data)
    names = [k.rsplit(".", 1)[0] for k in tensors if k.endswith(".components")]
    return {n: Basis(tensors[f"{n}.mean"], tensors[f"{n}.components"]) for n in names}


def explained_variance(data: bytes) -> dict[str, float]:
    """{level: fraction of the channel variance its K components keep} of a basis file's bytes."""
    tensors = st_load(data)
    out = {}
    for key, values in tensors.items():
        if key.endswith(".eigenvalues"):
            name = key.rsplit(".", 1)[0]
            k = tensors[f"{name}.components"].shape[0]
            out[name] = round(float(values[:k].sum() / values.sum().clamp_min(1e-300)), 6)
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_basis(out: Path, data: bytes) -> None:
    """Write the basis file atomically (temp name → fsync → rename), unless the same bytes are already there."""
    path = Path(out) / PCA_FILE
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{PCA_FILE}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recorded_basis(out: Path, recorded: str, where: str) -> bytes:
    """The bytes of ``out``'s basis file, checked against the sha256 ``recorded`` in ``where`` (a manifest or the
    header of an unfinished extraction).

    Raises:
        CacheError: the file is missing or its sha256 differs (one line naming the file and the fix).
    """
    path = Path(out) / PCA_FILE
    if not path.is_file():
        raise CacheError(f"{path}: missing, but {where} was written with a PCA basis (sha256 {recorded[:12]}…); "
                         "restore the file, or rerun with --overwrite to fit a new basis and re-extract")
    return check_basis(path.read_bytes(), recorded, str(path), where)


def check_basis(data: bytes, recorded: str, path: str, where: str) -> bytes:
    """``data`` when its sha256 is ``recorded``; else a one-line CacheError naming ``path`` and the fix."""
    if sha256(data) != recorded:
        raise CacheError(f"{path}: sha256 {sha256(data)[:12]}… differs from {recorded[:12]}… recorded in {where} "
                         "(the basis was changed after shards were written); restore the original file, or "
                         "re-extract with --overwrite")
    return data
