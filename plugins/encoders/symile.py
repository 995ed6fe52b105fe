"""``symile``: the Symile-MIMIC lab encoder, an MLP ``100 -> 256 -> 1024 -> 1024`` + LayerNorm.

Input: 50 lab percentiles followed by 50 missingness flags, ``[B, 100]``.  :meth:`encode` gives
one token, ``[B, 1, 1024]``; :meth:`pool` is the identity (no trainable head, ``K = 1``).
Weights: a Lightning checkpoint whose ``state_dict`` holds the encoder under ``labs_encoder.``
(other entries are ignored), read with the safe loader; or a plain state dict / safetensors file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.checkpoints import load_into, load_state_file, select_state
from medtvt_core.contracts import Encoder, PluginConfig, saved_weights_follow
from medtvt_core.errors import DataError

logger = logging.getLogger(__name__)

NUM_INPUTS = 100  # 50 percentiles + 50 missingness flags
WIDTHS = {"full": (256, 1024, 1024), "tiny": (32, 64, 64)}


class SymileConfig(PluginConfig):
    """Options of the ``symile`` encoder."""

    variant: Literal["full", "tiny"] = Field(
        "full", description="'full': MLP 100-256-1024-1024 of Symile-MIMIC; 'tiny': 100-32-64-64 (tests, demo)")
    num_tokens: int = Field(1, description="tokens per lab panel; must be 1 (the MLP yields one vector)")
    weights: Path | None = Field(
        None, description="local Symile checkpoint (Lightning .ckpt, .pt or .safetensors); None = random init (tests, demo)")
    state_prefix: str = Field(
        "labs_encoder.", description="key prefix of the lab encoder inside the checkpoint's state_dict ('' = none)")
    trust_checkpoint: bool = Field(
        False, description="allow full unpickling of a checkpoint the safe loader refuses (can run code from the file)")

    @field_validator("num_tokens")
    @classmethod
    def _one_token(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"the lab encoder yields exactly one token; num_tokens must be 1, got {v}")
        return v


class LabsEncoder(nn.Module):
    """``fc1 -> GELU -> fc2 -> GELU -> fc3 -> LayerNorm`` (Symile-MIMIC key names)."""

    def __init__(self, widths: tuple[int, int, int], in_features: int = NUM_INPUTS):
        super().__init__()
        h1, h2, out = widths
        self.fc1 = nn.Linear(in_features, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, out)
        self.gelu = nn.GELU()
        self.layer_norm = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.fc1(x))
        x = self.gelu(self.fc2(x))
        return self.layer_norm(self.fc3(x))


class SymileEncoder(Encoder):
    """Symile-MIMIC labs MLP (frozen) -> one 1024-d token; pooling is the identity."""

    modality = "lab"
    config_class = SymileConfig
    contract_options: ClassVar[dict[str, Any]] = {"variant": "tiny"}

    def __init__(self, *, variant: str = "full", num_tokens: int = 1, weights: str | Path | None = None,
                 state_prefix: str = "labs_encoder.", trust_checkpoint: bool = False):
        super().__init__()
        self.config = SymileConfig(variant=variant, num_tokens=num_tokens, weights=weights,
                                       state_prefix=state_prefix, trust_checkpoint=trust_checkpoint)
        widths = WIDTHS[self.config.variant]
        self.backbone = LabsEncoder(widths)
        self.input_shape = (NUM_INPUTS,)
        self.feature_shape = (1, widths[-1])
        self.pooled_dim = widths[-1]
        self.num_tokens = 1
        if self.config.weights is not None:
            self.load_backbone(self.config.weights, trust=self.config.trust_checkpoint)
        else:
            log = logger.warning if self.config.variant == "full" and not saved_weights_follow() else logger.info
            log("symile (%s): no weights given, lab encoder randomly initialised (tests/demo only)", self.config.variant)
        self.freeze_backbone()
        self.backbone.eval()

    def load_backbone(self, path: str | Path, *, trust: bool = False) -> None:
        """Load the ``state_prefix`` part of a (Lightning) checkpoint's ``state_dict``, strictly."""
        where = f"Symile checkpoint {path}"
        state = select_state(load_state_file(path, trust=trust), entry="state_dict", prefix=self.config.state_prefix,
                             where=where)
        load_into(self.backbone, state, strict=True, where=where)

    def backbone_eval(self) -> None:
        self.backbone.eval()

    def head_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 100] -> [B, 1, 1024]``, no grad."""
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"symile: input of shape {tuple(x.shape)}, expected [B, {', '.join(map(str, self.input_shape))}]")
        p = self.backbone.fc1.weight
        return self.backbone(x.to(device=p.device, dtype=p.dtype)).unsqueeze(1).float()

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Identity: ``[B, 1, 1024] -> [B, 1, 1024]``."""
        return features


@hookimpl
def medtvt_register_encoders(register):
    register("symile", SymileEncoder, config=SymileConfig)
