"""Per-modality projector: the "Dense block" of MuMu-LLaMA (SPEC, "Architecture").

``Linear(in_dim -> out_dim)`` followed by ``blocks`` residual SwiGLU blocks, each
``x = x + W2(silu(W1 norm(x)) * W3 norm(x))`` with one RMSNorm per block and bias-free
``out_dim x out_dim`` linears.  Maps ``[B, K, in_dim] -> [B, K, out_dim]`` (any leading dims).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["DenseProjector", "SwiGLUBlock"]


class SwiGLUBlock(nn.Module):
    """``x + w2(silu(w1(norm(x))) * w3(norm(x)))``; ``norm`` is RMSNorm, the linears have no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, dim, bias=False)
        self.w3 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # one norm feeds both branches (SPEC: W1 norm(x), W3 norm(x))
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class DenseProjector(nn.Module):
    """``Linear(in_dim, out_dim)`` then ``blocks`` :class:`SwiGLUBlock`; ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int = 3, eps: float = 1e-6):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ConfigError(f"projector: in_dim and out_dim must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        if blocks < 0:
            raise ConfigError(f"projector: blocks must be >= 0, got {blocks}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim)
        self.blocks = nn.ModuleList(SwiGLUBlock(out_dim, eps=eps) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DenseProjector: last dim of input {tuple(x.shape)} is not in_dim={self.in_dim}")
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x
