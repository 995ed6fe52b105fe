"""Built-in fusion plugins: the Modality Perception Layer (MPL) and its ablations.

* ``mpl``: cyclic multi-head attention (CMHA) then the contribution-aware operator (CAO).
* ``cmha``: CMHA only (weights ``None``).
* ``cao``: CAO only, on the unfused tokens.
* ``none``: identity (PT stage, "no MPL" ablation; weights ``None``).

All map tokens ``Z [B, M, K, D]`` and a mask ``[B, M]`` (True = present) to tokens of the same
shape, for any ``M >= 1`` and ``K >= 1``.  A masked modality takes no part: its tokens are
replaced by zeros before anything reads them, every attention rotation that uses it is
dropped for that sample, its CAO input slot is zero, and its output tokens and weight are 0.

CMHA (SPEC): one shared ``nn.MultiheadAttention`` applied ``M`` times; rotation ``r`` uses
modality ``r`` as query, ``(r+1) % M`` as key and ``(r+2) % M`` as value (for the order
C, E, L: (C,E,L), (E,L,C), (L,C,E)).  ``F`` = mean of the valid rotations' outputs
``[B, K, D]`` (0 when none is valid); then ``M_i = LayerNorm(Z_i + residual_scale * dropout(F))``
with one shared LayerNorm (``style="official"``, the reference code) or ``M_i = Z_i + F``
(``style="paper"``).  Note: with ``M = 3`` every rotation uses all three modalities, so a
sample missing any one gets ``F = 0``.

CAO (SPEC): ``g = sigmoid(Linear(M*D -> M)([mean_K M_1 : ... : mean_K M_M]))``,
``T_i = g_i * M_i``; ``g`` is returned as the per-sample modality weights.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.contracts import Fusion, FusionOutput, IdentityFusion, PluginConfig
from medtvt_core.errors import ConfigError

__all__ = [
    "MPLConfig", "CMHAConfig", "CAOConfig", "NoFusionConfig",
    "MPLFusion", "CMHAFusion", "CAOFusion", "NoFusion",
]

Style = Literal["official", "paper"]


# --------------------------------------------------------------------------- configs
class CMHAConfig(PluginConfig):
    """Options of the cyclic multi-head attention (plugin ``cmha``)."""

    style: Style = Field("official", description=(
        "how F joins the tokens: 'official' = LayerNorm(Z_i + residual_scale * dropout(F)) with one "
        "shared LayerNorm (reference code); 'paper' = Z_i + F (paper)"))
    num_heads: int = Field(4, ge=1, description="attention heads; must divide the hidden size D")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description=(
        "dropout on the attention weights and, in the official style, on F"))
    residual_scale: float = Field(0.01, description="factor on F before the LayerNorm (official style only)")


class MPLConfig(CMHAConfig):
    """Options of the Modality Perception Layer (plugin ``mpl``)."""

    cmha: bool = Field(True, description="apply the cyclic multi-head attention (off: M_i = Z_i)")
    cao: bool = Field(True, description="apply the contribution-aware gates (off: T_i = M_i, weights None)")


class CAOConfig(PluginConfig):
    """The contribution-aware operator alone has no options."""


class NoFusionConfig(PluginConfig):
    """The identity fusion has no options."""


# --------------------------------------------------------------------------- modules
class _MaskedFusion(Fusion):
    """Shared input checks and masking for the built-in fusions."""

    def _check(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0] if tokens.dim() == 4 else None
        if tokens.dim() != 4 or tokens.shape[1] != self.num_modalities or tokens.shape[3] != self.dim:
            raise ValueError(
                f"{type(self).__name__}: tokens must be [B, M={self.num_modalities}, K, D={self.dim}], "
                f"got {tuple(tokens.shape)}")
        if tuple(mask.shape) != (b, self.num_modalities):
            raise ValueError(f"{type(self).__name__}: mask must be [B={b}, M={self.num_modalities}], got {tuple(mask.shape)}")
        return mask.to(device=tokens.device, dtype=torch.bool)

    @staticmethod
    def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # where, not multiply: NaN/inf in a masked modality's tokens must not leak (NaN * 0 = NaN).
        return torch.where(mask[:, :, None, None], x, x.new_zeros(()))


class MPLFusion(_MaskedFusion):
    """Modality Perception Layer: CMHA then CAO, each switchable (plugin ``mpl``)."""

    config_class: ClassVar[type[PluginConfig]] = MPLConfig

    def __init__(self, dim: int, num_modalities: int, *, style: Style = "official", num_heads: int = 4,
                 dropout: float = 0.1, residual_scale: float = 0.01, cmha: bool = True, cao: bool = True):
        cfg = MPLConfig(style=style, num_heads=num_heads, dropout=dropout, residual_scale=residual_scale,
                        cmha=cmha, cao=cao)
        self._setup(dim, num_modalities, cfg, use_cmha=cfg.cmha, use_cao=cfg.cao)

    def _setup(self, dim: int, num_modalities: int, cfg: PluginConfig, *, use_cmha: bool, use_cao: bool) -> None:
        super().__init__(dim, num_modalities)
        if dim < 1 or num_modalities < 1:
            raise ConfigError(f"fusion: dim and num_modalities must be >= 1, got dim={dim}, num_modalities={num_modalities}")
        self.config = cfg
        self.use_cmha = use_cmha
        self.use_cao = use_cao
        self.style = getattr(cfg, "style", None)
        self.residual_scale = float(getattr(cfg, "residual_scale", 0.0))
        # Only build what forward uses, so every parameter receives a gradient.
        self.attn: nn.MultiheadAttention | None = None
        self.norm: nn.LayerNorm | None = None
        self.f_dropout: nn.Dropout | None = None
        self.gate: nn.Linear | None = None
        if use_cmha:
            heads = cfg.num_heads
            if dim % heads:
                raise ConfigError(
                    f"fusion.options.num_heads: {heads} does not divide the hidden size D={dim}; "
                    f"allowed: a divisor of {dim} such as {[h for h in range(1, 17) if dim % h == 0]}")
            self.attn = nn.MultiheadAttention(dim, heads, dropout=cfg.dropout, batch_first=True)
            if cfg.style == "official":
                self.norm = nn.LayerNorm(dim)
                self.f_dropout = nn.Dropout(cfg.dropout)
        if use_cao:
            self.gate = nn.Linear(num_modalities * dim, num_modalities)

    # ---------------------------------------------------------------- pieces
    def cross_attention(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``F [B, K, D]``: mean over valid rotations of ``attn(Z_r, Z_{r+1}, Z_{r+2})``; 0 if none valid.

        ``z`` must already have its masked modalities zeroed.
        """
        b, m, k, d = z.shape
        # Rotation r = (query r, key r+1, value r+2): rolling the modality axis builds all M
        # rotations at once, so one attention call covers every rotation and every sample.
        q = z.reshape(b * m, k, d)
        key = z.roll(-1, dims=1).reshape(b * m, k, d)
        val = z.roll(-2, dims=1).reshape(b * m, k, d)
        out, _ = self.attn(q, key, val, need_weights=False)
        out = out.reshape(b, m, k, d)
        valid = mask & mask.roll(-1, dims=1) & mask.roll(-2, dims=1)  # [B, M] per rotation
        # A modality is present or absent as a whole, so no key padding mask is needed and no
        # softmax row is empty (no NaN); rotations touching an absent one ran on zeros and are dropped.
        out = torch.where(valid[:, :, None, None], out, out.new_zeros(()))
        count = valid.sum(dim=1).clamp(min=1).to(out.dtype)
        return out.sum(dim=1) / count[:, None, None]

    def combine(self, z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``M_i`` from ``Z_i`` and ``F``: official ``LN(Z_i + s * dropout(F))``, paper ``Z_i + F``."""
        f = f[:, None]  # the same F joins every modality
        if self.style == "official":
            return self.norm(z + self.residual_scale * self.f_dropout(f))
        return z + f

    def gates(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CAO gates ``[B, M]`` in (0, 1) for present modalities, exactly 0 for masked ones."""
        b, m, _, d = x.shape
        summary = x.mean(dim=2)  # [B, M, D]; masked slots are already zero
        g = torch.sigmoid(self.gate(summary.reshape(b, m * d)))
        return torch.where(mask, g, g.new_zeros(()))

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        mask = self._check(tokens, mask)
        x = self._zero_masked(tokens, mask)
        if self.use_cmha:
            x = self.combine(x, self.cross_attention(x, mask))
            x = self._zero_masked(x, mask)  # LayerNorm bias / F would fill masked slots
        weights = None
        if self.use_cao:
            weights = self.gates(x, mask)
            x = weights[:, :, None, None].to(x.dtype) * x
        return FusionOutput(tokens=x, weights=weights)


class CMHAFusion(MPLFusion):
    """Cyclic multi-head attention only, no gates; weights ``None`` (plugin ``cmha``)."""

    config_class: ClassVar[type[PluginConfig]] = CMHAConfig

    def __init__(self, dim: int, num_modalities: int, *, style: Style = "official", num_heads: int = 4,
                 dropout: float = 0.1, residual_scale: float = 0.01):
        cfg = CMHAConfig(style=style, num_heads=num_heads, dropout=dropout, residual_scale=residual_scale)
        self._setup(dim, num_modalities, cfg, use_cmha=True, use_cao=False)


class CAOFusion(MPLFusion):
    """Contribution-aware gates on the unfused tokens (plugin ``cao``)."""

    config_class: ClassVar[type[PluginConfig]] = CAOConfig

    def __init__(self, dim: int, num_modalities: int):
        self._setup(dim, num_modalities, CAOConfig(), use_cmha=False, use_cao=True)


class NoFusion(IdentityFusion):
    """Identity: tokens unchanged except masked modalities zeroed; weights ``None`` (plugin ``none``).

    The core's own "no fusion" (the PT stage) is the same class."""

    config_class: ClassVar[type[PluginConfig]] = NoFusionConfig

    def __init__(self, dim: int, num_modalities: int):
        super().__init__(dim, num_modalities)
        self.config = NoFusionConfig()


# --------------------------------------------------------------------------- registration
@hookimpl
def medtvt_register_fusion(register):
    register("mpl", MPLFusion, config=MPLConfig)
    register("cmha", CMHAFusion, config=CMHAConfig)
    register("cao", CAOFusion, config=CAOConfig)
    register("none", NoFusion, config=NoFusionConfig)
