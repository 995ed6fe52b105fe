"""Typed interfaces every plugin kind must provide.

Shapes use ``B`` batch, ``M`` modalities, ``N`` frozen feature steps, ``C`` feature width,
``K`` tokens per modality after pooling, ``D`` LLM hidden size.

* :class:`Modality` reads one input kind from disk into a float32 tensor of ``sample_shape``.
* :class:`Encoder` maps ``[B, *input_shape]`` to frozen features ``[B, N, C]`` (``encode``,
  cacheable, no grad) and pools them with a small trainable head to ``[B, K, pooled_dim]``
  (``pool``); the core projector then maps ``pooled_dim -> D``.
* :class:`Fusion` maps tokens ``[B, M, K, D]`` + mask ``[B, M]`` to tokens of the same shape
  and per-sample modality weights ``[B, M]`` (``None`` when it does not weigh modalities).
* Reward: ``f(prompts, completions, **kwargs) -> list[float | None]`` (TRL's contract).
* :class:`LLMBackbone` builds a peft-wrapped causal LM and its tokenizer with the modality
  placeholders added as special tokens.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class PluginConfig(BaseModel):
    """Base of every plugin config: unknown keys are errors, defaults are documented."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def checked(cls, where: str, **values: Any) -> "PluginConfig":
        """Validate ``values``; a bad one is a one-line :class:`ConfigError` naming ``where``."""
        from pydantic import ValidationError

        from .config import format_validation_error
        from .errors import ConfigError

        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, where)) from None


# --------------------------------------------------------------------------- modalities
class Modality(ABC):
    """Reader of one input kind (ECG, CXR, LAB, ...).

    Class attributes: ``name`` (``"ecg"``), ``placeholder`` (``"<ecg>"``, the prompt token whose
    embedding the modality replaces), ``record_field`` (key of the QA record that holds the
    reference, e.g. ``"ECG"``), ``config_class``.  Constructor keyword arguments are the
    fields of ``config_class``.
    """

    name: ClassVar[str]
    placeholder: ClassVar[str]
    record_field: ClassVar[str]
    config_class: ClassVar[type[PluginConfig]]

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed sample (float32)."""

    def fit(self, refs: Sequence[str], root: Path) -> dict[str, Any]:
        """Compute statistics from the training split once; return them (JSON-able)."""
        return {}

    def set_stats(self, stats: dict[str, Any]) -> None:
        """Restore statistics returned by :meth:`fit` (stored with the dataset)."""

    @abstractmethod
    def load(self, ref: str, *, root: Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Read and preprocess one sample; raise :class:`~medtvt_core.errors.DataError` when bad."""

    def content_key(self, ref: str, *, root: Path) -> str:
        """Hash of the input's content (for the feature cache). Default: bytes of the file."""
        path = Path(root) / ref
        h = hashlib.sha256()
        for p in sorted(self.files_of(ref, root=root)) or [path]:
            h.update(Path(p).read_bytes())
        return h.hexdigest()

    def files_of(self, ref: str, *, root: Path) -> list[Path]:
        """Files a reference reads (for validation and hashing)."""
        return [Path(root) / ref]

    def is_random(self, train: bool) -> bool:
        """True when :meth:`load` is random for this mode (e.g. random crops in training)."""
        return False

    def preprocess_fingerprint(self) -> str:
        """Identity of the preprocessing config (for the feature cache)."""
        cfg = getattr(self, "config", None)
        payload = cfg.model_dump_json() if isinstance(cfg, BaseModel) else json.dumps(vars(self), default=str, sort_keys=True)
        return hashlib.sha256(f"{self.name}:{payload}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- encoders
class Encoder(nn.Module, ABC):
    """A frozen feature extractor plus a trainable pooling head.

    Subclasses set ``modality`` and ``config_class`` and, in ``__init__``, the attributes
    ``input_shape`` (sample shape it consumes), ``feature_shape`` ``(N, C)`` of :meth:`encode`,
    ``pooled_dim`` and ``num_tokens`` (``K``) of :meth:`pool`.
    """

    modality: ClassVar[str]
    config_class: ClassVar[type[PluginConfig]]
    # Config fields that do not change what encode() computes (where weights come from, the
    # head's size): left out of identity() so moving a weights file keeps the feature cache.
    identity_exclude: ClassVar[frozenset[str]] = frozenset({"weights", "trust_checkpoint", "num_tokens"})

    input_shape: tuple[int, ...]
    feature_shape: tuple[int, int]
    pooled_dim: int
    num_tokens: int

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *input_shape] -> [B, N, C]`` with the frozen backbone (deterministic, no grad)."""

    @abstractmethod
    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, N, C] -> [B, K, pooled_dim]`` with the trainable head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encode(x)
        return self.pool(feats)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the frozen backbone (everything :meth:`encode` uses)."""
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    @abstractmethod
    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the trainable pooling head."""

    def freeze_backbone(self) -> None:
        for p in self.backbone_parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Encoder":
        # The backbone is frozen: keep its BatchNorm/dropout in eval mode whatever the caller asks.
        super().train(mode)
        self.backbone_eval()
        return self

    def backbone_eval(self) -> None:
        """Put backbone submodules in eval mode (override when the head is interleaved)."""
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def identity(self) -> str:
        """Fingerprint of the frozen backbone: class, config and weights (for the feature cache)."""
        h = hashlib.sha256(f"{type(self).__module__}.{type(self).__qualname__}".encode())
        cfg = getattr(self, "config", None)
        if isinstance(cfg, BaseModel):
            h.update(cfg.model_dump_json(exclude=set(self.identity_exclude)).encode())
        for name, t in sorted(self.backbone_state().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def backbone_state(self) -> dict[str, torch.Tensor]:
        head = {id(p) for p in self.head_parameters()}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) not in head}

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """A valid random input for contract tests."""
        return torch.randn(batch_size, *self.input_shape)


# --------------------------------------------------------------------------- fusion
@dataclass
class FusionOutput:
    tokens: torch.Tensor  # [B, M, K, D]
    weights: torch.Tensor | None  # [B, M], 0 for masked modalities; None if not computed


class Fusion(nn.Module, ABC):
    """Cross-modal fusion. ``__init__(dim, num_modalities, **config)``."""

    config_class: ClassVar[type[PluginConfig]]

    def __init__(self, dim: int, num_modalities: int):
        super().__init__()
        self.dim = dim
        self.num_modalities = num_modalities

    @abstractmethod
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        """``tokens [B, M, K, D]``, ``mask [B, M]`` bool (True = present) -> :class:`FusionOutput`.

        A masked modality must take no part: changing its tokens changes no output, and its
        output tokens and weight are zero.
        """


# --------------------------------------------------------------------------- rewards
@runtime_checkable
class RewardFunction(Protocol):
    __name__: str

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]: ...


# --------------------------------------------------------------------------- LLMs
@dataclass
class LoadedLLM:
    model: nn.Module  # peft-wrapped causal LM
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    placeholder_ids: dict[str, int]  # placeholder text -> token id

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)


class LLMBackbone(ABC):
    """Factory of a causal LM with LoRA. ``__init__(**config)``."""

    config_class: ClassVar[type[PluginConfig]]

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def build(self, placeholders: Sequence[str], *, corpus: Callable[[], Sequence[str]] | None = None,
              tokenizer_dir: Path | None = None) -> LoadedLLM:
        """Load or create model and tokenizer; add ``placeholders`` as special tokens; wrap in LoRA.

        ``corpus``: texts to train a tokenizer on when the backbone has none of its own.
        ``tokenizer_dir``: a saved tokenizer to reuse (a resumed or reloaded run).
        """
