"""Built-in fusion plugins: the Modality Perception Layer (MPL) and its ablations.

* ``mpl``: cyclic multi-head attention (CMHA) then the contribution-aware operator (CAO).
* ``cmha``: CMHA only (weights ``None``).
* ``cao``: CAO only, on the unfused tokens.
* ``none``: identity (PT stage, "no MPL" ablation; weights ``None``).

All map tokens ``Z [B, M, K, D]`` and a mask ``[B, M]`` (True = present) to tokens of the same
shape, for any ``M >= 1`` and ``K >= 1``.  A masked modality takes no part: its tokens are
replaced by zeros before anything reads them, every attention rotation that uses it is
dropped for that sample, its CAO input slot is zero, and its output tokens and weight are 0.

CMHA (docs/method.md, MPL): one shared ``nn.MultiheadAttention`` applied once per rotation ``(query, key,
value)`` of modalities.  Default (``rotations=None``): ``M`` cyclic rotations in the run's modality
order, rotation ``r`` = ``(r, r+1, r+2) mod M``.  ``rotations`` names the triples explicitly by
modality name, e.g. the reference's ``[[cxr, ecg, lab], [ecg, lab, cxr], [lab, cxr, ecg]]``
whatever order the run lists its modalities in (the names come from the core's
``modality_names`` keyword).  With one token per modality only the value modality matters (the
softmax over one key is 1), so both orders give the same F; with ``K > 1`` they differ.
``F`` = mean of the valid rotations' outputs ``[B, K, D]`` (0 when none is valid); then
``M_i = LayerNorm(Z_i + residual_scale * dropout(F))`` with one shared LayerNorm
(``style="official"``, the reference code) or ``M_i = Z_i + F`` (``style="paper"``).

Dropout (official style): on the attention weights inside every rotation (independent masks per
rotation, as the reference's separate calls), and on F before it joins each modality:
``f_dropout_masks="shared"`` draws one mask for all modalities, ``"per_modality"`` one
independent mask per modality (the reference calls its dropout once per output modality).

Note: with ``M = 3`` every rotation uses all three modalities, so a sample missing any one gets
``F = 0``.

CAO (docs/method.md, MPL): ``g = sigmoid(Linear(M*D -> M)([mean_K M_1 : ... : mean_K M_M]))``,
``T_i = g_i * M_i``; ``g`` is returned as the per-sample modality weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.contracts import Fusion, FusionOutput, IdentityFusion, PluginConfig
from medtvt_core.errors import ConfigError

__all__ = [
    "MPLConfig", "CMHAConfig", "CAOConfig", "NoFusionConfig",
    "MPLFusion", "CMHAFusion", "CAOFusion", "NoFusion",
]

Style = Literal["official", "paper"]
FDropoutMasks = Literal["shared", "per_modality"]
Rotation = tuple[str, str, str]


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
    rotations: list[Rotation] | None = Field(None, description=(
        "the (query, key, value) modality names of each attention rotation, e.g. the reference's "
        "[[cxr, ecg, lab], [ecg, lab, cxr], [lab, cxr, ecg]]; null = M cyclic rotations "
        "(r, r+1, r+2) in the run's modality order"))
    f_dropout_masks: FDropoutMasks = Field("shared", description=(
        "dropout on F in the official style: 'shared' = one mask for all modalities; 'per_modality' "
        "= an independent mask for each modality's M_i (the reference code)"))

    @field_validator("rotations")
    @classmethod
    def _rotations_well_formed(cls, value: list[Rotation] | None) -> list[Rotation] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one (query, key, value) triple, or be null for the cyclic default")
        seen = set()
        for rot in value:
            if any(not name.strip() for name in rot):
                raise ValueError(f"{list(rot)}: modality names must be non-empty")
            if rot in seen:
                raise ValueError(f"{list(rot)} is listed twice")
            seen.add(rot)
        return value

    @model_validator(mode="after")
    def _f_dropout_needs_official(self):
        if self.f_dropout_masks != "shared" and self.style != "official":
            raise ValueError("f_dropout_masks: only the 'official' style applies dropout to F")
        return self


class MPLConfig(CMHAConfig):
    """Options of the Modality Perception Layer (plugin ``mpl``)."""

    cmha: bool = Field(True, description="apply the cyclic multi-head attention (off: M_i = Z_i)")
    cao: bool = Field(True, description="apply the contribution-aware gates (off: T_i = M_i, weights None)")
    gate_input_norm: bool = Field(False, description=(
        "layer-normalise each modality's mean token (no affine) before the gate's Linear: keeps the "
        "sigmoid out of saturation when tokens are large (the paper style has no LayerNorm before it); "
        "false = the reference"))

    @model_validator(mode="after")
    def _cmha_options_need_cmha(self):
        if not self.cmha and (self.rotations is not None or self.f_dropout_masks != "shared"):
            raise ValueError("rotations / f_dropout_masks: they configure the attention, which cmha=false turns off")
        return self


class CAOConfig(PluginConfig):
    """Options of the contribution-aware operator alone (plugin ``cao``)."""

    gate_input_norm: bool = Field(False, description=(
        "layer-normalise each modality's mean token (no affine) before the gate's Linear: keeps the "
        "sigmoid out of saturation when tokens are large (the paper style has no LayerNorm before it); "
        "false = the reference"))


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


def _names(modality_names: Sequence[str] | None, num_modalities: int) -> tuple[str, ...] | None:
    """The run's modality names in model order (``None``: not told), checked against ``M``."""
    if modality_names is None:
        return None
    if isinstance(modality_names, str):
        raise ConfigError(f"fusion: modality_names must be a sequence of names, got the string {modality_names!r}")
    names = tuple(modality_names)
    if len(names) != num_modalities or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"fusion: modality_names must be {num_modalities} distinct names (one per modality, in "
                          f"model order), got {list(names)}")
    return names


def _rotation_indices(rotations: Sequence[Sequence[str]] | None, names: tuple[str, ...] | None,
                      num_modalities: int) -> list[tuple[int, int, int]]:
    """``(query, key, value)`` modality indices of every rotation."""
    if rotations is None:
        m = num_modalities
        return [(r, (r + 1) % m, (r + 2) % m) for r in range(m)]
    if names is None:
        raise ConfigError("fusion.options.rotations names modalities, but the fusion was built without "
                          "modality_names (the run's modality order), so the names cannot be resolved")
    out = []
    for rot in rotations:
        rot = tuple(rot)
        if len(rot) != 3:
            raise ConfigError(f"fusion.options.rotations: {list(rot)} must be a (query, key, value) triple")
        unknown = [n for n in rot if n not in names]
        if unknown:
            raise ConfigError(f"fusion.options.rotations: {list(rot)} names {', '.join(map(repr, unknown))}, not a "
                              f"modality of this model; allowed: {', '.join(names)}")
        out.append(tuple(names.index(n) for n in rot))
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"fusion.options.rotations: need distinct triples, at least one, got {list(rotations)}")
    return out


class MPLFusion(_MaskedFusion):
    """Modality Perception Layer: CMHA then CAO, each switchable (plugin ``mpl``).

    ``modality_names``: the run's modality names in model order (passed by the core, not a config
    option); needed only when ``rotations`` names modalities.
    """

    config_class: ClassVar[type[PluginConfig]] = MPLConfig

    def __init__(self, dim: int, num_modalities: int, *, style: Style = "official", num_heads: int = 4,
                 dropout: float = 0.1, residual_scale: float = 0.01, rotations: list[Rotation] | None = None,
                 f_dropout_masks: FDropoutMasks = "shared", cmha: bool = True, cao: bool = True,
                 gate_input_norm: bool = False, modality_names: Sequence[str] | None = None):
        cfg = MPLConfig(style=style, num_heads=num_heads, dropout=dropout, residual_scale=residual_scale,
                        rotations=rotations, f_dropout_masks=f_dropout_masks, cmha=cmha, cao=cao,
                        gate_input_norm=gate_input_norm)
        self._setup(dim, num_modalities, cfg, use_cmha=cfg.cmha, use_cao=cfg.cao, modality_names=modality_names)

    def _setup(self, dim: int, num_modalities: int, cfg: PluginConfig, *, use_cmha: bool, use_cao: bool,
               modality_names: Sequence[str] | None = None) -> None:
        super().__init__(dim, num_modalities)
        if dim < 1 or num_modalities < 1:
            raise ConfigError(f"fusion: dim and num_modalities must be >= 1, got dim={dim}, num_modalities={num_modalities}")
        self.config = cfg
        self.modality_names = _names(modality_names, num_modalities)
        self.use_cmha = use_cmha
        self.use_cao = use_cao
        self.style = getattr(cfg, "style", None)
        self.residual_scale = float(getattr(cfg, "residual_scale", 0.0))
        self.f_dropout_masks = getattr(cfg, "f_dropout_masks", "shared")
        # Only build what forward uses, so every parameter receives a gradient.
        self.attn: nn.MultiheadAttention | None = None
        self.norm: nn.LayerNorm | None = None
        self.f_dropout: nn.Dropout | None = None
        self.gate: nn.Linear | None = None
        self.rotations: list[tuple[int, int, int]] = []
        if use_cmha:
            heads = cfg.num_heads
            if dim % heads:
                raise ConfigError(
                    f"fusion.options.num_heads: {heads} does not divide the hidden size D={dim}; "
                    f"allowed: a divisor of {dim} such as {[h for h in range(1, 17) if dim % h == 0]}")
            self.rotations = _rotation_indices(cfg.rotations, self.modality_names, num_modalities)
            # Not persistent: derived from the config, so checkpoints keep their keys.
            self.register_buffer("rotation_index", torch.tensor(self.rotations, dtype=torch.long).T.contiguous(),
                                 persistent=False)  # [3, R]: query, key, value modality of each rotation
            self.attn = nn.MultiheadAttention(dim, heads, dropout=cfg.dropout, batch_first=True)
            if cfg.style == "official":
                self.norm = nn.LayerNorm(dim)
                self.f_dropout = nn.Dropout(cfg.dropout)
        if use_cao:
            self.gate = nn.Linear(num_modalities * dim, num_modalities)
            self.gate_input_norm = bool(getattr(cfg, "gate_input_norm", False))

    # ---------------------------------------------------------------- pieces
    def cross_attention(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``F [B, K, D]``: mean over valid rotations of ``attn(Z_q, Z_k, Z_v)``; 0 if none valid.

        ``z`` must already have its masked modalities zeroed.
        """
        b, _, k, d = z.shape
        qi, ki, vi = self.rotation_index
        r = qi.numel()
        # All rotations of all samples in one attention call: each (sample, rotation) is its own
        # sequence, so the attention-weight dropout draws an independent mask per rotation, as
        # separate calls would.
        q = z[:, qi].reshape(b * r, k, d)
        key = z[:, ki].reshape(b * r, k, d)
        val = z[:, vi].reshape(b * r, k, d)
        out, _ = self.attn(q, key, val, need_weights=False)
        out = out.reshape(b, r, k, d)
        valid = mask[:, qi] & mask[:, ki] & mask[:, vi]  # [B, R]
        # A modality is present or absent as a whole, so no key padding mask is needed and no
        # softmax row is empty (no NaN); rotations touching an absent one ran on zeros and are dropped.
        out = torch.where(valid[:, :, None, None], out, out.new_zeros(()))
        count = valid.sum(dim=1).clamp(min=1).to(out.dtype)
        return out.sum(dim=1) / count[:, None, None]

    def combine(self, z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``M_i`` from ``Z_i [B, M, K, D]`` and ``F [B, K, D]``: official ``LN(Z_i + s * dropout(F))``
        (one dropout mask for all modalities, or one per modality), paper ``Z_i + F``."""
        f = f[:, None]  # the same F joins every modality
        if self.style == "official":
            if self.f_dropout_masks == "per_modality":
                f = f.expand(-1, z.shape[1], -1, -1).contiguous()  # its own mask for each M_i
            return self.norm(z + self.residual_scale * self.f_dropout(f))
        return z + f

    def gates(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CAO gates ``[B, M]`` in (0, 1) for present modalities, exactly 0 for masked ones."""
        b, m, _, d = x.shape
        summary = x.mean(dim=2)  # [B, M, D]; masked slots are already zero
        if self.gate_input_norm:  # a zero (masked) slot stays zero: its mean and variance are 0
            summary = torch.nn.functional.layer_norm(summary, (d,))
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
                 dropout: float = 0.1, residual_scale: float = 0.01, rotations: list[Rotation] | None = None,
                 f_dropout_masks: FDropoutMasks = "shared", modality_names: Sequence[str] | None = None):
        cfg = CMHAConfig(style=style, num_heads=num_heads, dropout=dropout, residual_scale=residual_scale,
                         rotations=rotations, f_dropout_masks=f_dropout_masks)
        self._setup(dim, num_modalities, cfg, use_cmha=True, use_cao=False, modality_names=modality_names)


class CAOFusion(MPLFusion):
    """Contribution-aware gates on the unfused tokens (plugin ``cao``)."""

    config_class: ClassVar[type[PluginConfig]] = CAOConfig

    def __init__(self, dim: int, num_modalities: int, *, gate_input_norm: bool = False,
                 modality_names: Sequence[str] | None = None):
        self._setup(dim, num_modalities, CAOConfig(gate_input_norm=gate_input_norm), use_cmha=False, use_cao=True,
                    modality_names=modality_names)


class NoFusion(IdentityFusion):
    """Identity: tokens unchanged except masked modalities zeroed; weights ``None`` (plugin ``none``).

    The core's own "no fusion" (the PT stage) is the same class."""

    config_class: ClassVar[type[PluginConfig]] = NoFusionConfig

    def __init__(self, dim: int, num_modalities: int, *, modality_names: Sequence[str] | None = None):
        super().__init__(dim, num_modalities)
        self.config = NoFusionConfig()
        self.modality_names = _names(modality_names, num_modalities)


# --------------------------------------------------------------------------- registration
@hookimpl
def medtvt_register_fusion(register):
    register("mpl", MPLFusion, config=MPLConfig)
    register("cmha", CMHAFusion, config=CMHAConfig)
    register("cao", CAOFusion, config=CAOConfig)
    register("none", NoFusion, config=NoFusionConfig)
