"""Per-modality projector: the "Dense block" of MuMu-LLaMA (docs/method.md, "Projector").

``Linear(in_dim -> out_dim)`` followed by ``blocks`` residual SwiGLU blocks, each
``x = x + W2(silu(W1 norm(x)) * W3 norm(x))`` with one RMSNorm per block and bias-free
``out_dim x out_dim`` linears.  Maps ``[B, K, in_dim] -> [B, K, out_dim]`` (any leading dims).
With ``normalize_input`` the input is first L2-normalised over its features (``F.normalize``),
as the reference code does for the pooled CXR token and the lab feature (not for the pooled ECG
vector: its steps are normalised before pooling, inside the ECG head; docs/method.md, "Encoders").
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["DenseProjector", "FeatureStandardizer", "SwiGLUBlock"]


class SwiGLUBlock(nn.Module):
    """``x + w2(silu(w1(norm(x))) * w3(norm(x)))``; ``norm`` is RMSNorm, the linears have no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, dim, bias=False)
        self.w3 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # one norm feeds both branches (docs/method.md: W1 norm(x), W3 norm(x))
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class DenseProjector(nn.Module):
    """``Linear(in_dim, out_dim)`` then ``blocks`` :class:`SwiGLUBlock`; ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int = 3, eps: float = 1e-6, normalize_input: bool = False):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ConfigError(f"projector: in_dim and out_dim must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        if blocks < 0:
            raise ConfigError(f"projector: blocks must be >= 0, got {blocks}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.normalize_input = normalize_input
        self.proj = nn.Linear(in_dim, out_dim)
        self.blocks = nn.ModuleList(SwiGLUBlock(out_dim, eps=eps) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DenseProjector: last dim of input {tuple(x.shape)} is not in_dim={self.in_dim}")
        if self.normalize_input:
            x = F.normalize(x, dim=-1)
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


class FeatureStandardizer(nn.Module):
    """Fixed per-channel standardisation ``(x - mean) / std`` of frozen features ``[..., C]``.

    The statistics are fitted once on the training split (:meth:`fit`) and stored as buffers, so
    they travel with the checkpoint.  Until fitted it is the identity.  Frozen encoders with
    random or poorly scaled outputs keep most of their between-patient signal in small
    deviations around a large common mean; standardising puts that signal at unit scale.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def fit(self, features: "Iterable[torch.Tensor]") -> int:
        """Fit on training samples' features (each ``[N, C]`` or ``[C]``), streamed: running sums in
        float64, so a large split never has to sit in memory.  Returns the number of samples."""
        n, total, total_sq, count = 0, None, None, 0
        for f in features:
            flat = f.reshape(-1, f.shape[-1]).double()
            total = flat.sum(0) if total is None else total + flat.sum(0)
            total_sq = flat.pow(2).sum(0) if total_sq is None else total_sq + flat.pow(2).sum(0)
            count += flat.shape[0]
            n += 1
        if n == 0:
            return 0
        mean = total / count
        var = (total_sq / count - mean.pow(2)).clamp_min(0)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(var.sqrt().clamp_min(self.eps).to(self.std.dtype))
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
