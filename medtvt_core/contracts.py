"""Typed interfaces every plugin kind must provide.

Shapes use ``B`` batch, ``M`` modalities, ``N`` frozen feature steps, ``C`` feature width,
``K`` tokens per modality after pooling, ``D`` LLM hidden size.

* :class:`ModalityReader` reads one input kind from disk into a float32 tensor of ``sample_shape``.
* :class:`Encoder` maps ``[B, *input_shape]`` to frozen features ``[B, N, C]`` (``encode``,
  cacheable, no grad) and pools them with a small trainable head to ``[B, K, pooled_dim]``
  (``pool``); the core projector then maps ``pooled_dim -> D``.
* :class:`Fusion` maps tokens ``[B, M, K, D]`` + mask ``[B, M]`` to tokens of the same shape
  and per-sample modality weights ``[B, M]`` (``None`` when it does not weigh modalities).
* Reward: ``f(prompts, completions, **kwargs) -> list[float | None]`` (TRL's contract), called with
  ``answer`` (the reference's tagged text) and ``ids``, in RFT also ``completion_ids`` and
  ``trainer_state``; values finite and within the ``range=(lo, hi)`` given at registration
  (default ``[0, 1]``); see :mod:`medtvt_core.plugin_calls` and docs/plugins.md.
* :class:`LLMBackbone` gives the tokenizer (with the modality placeholders added as special
  tokens by the core), the causal LM's config for that vocabulary, and the LM itself with a LoRA
  adapter; weights come from the plugin's own source (a local checkpoint) or a seeded random init.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .errors import ConfigError

_SAVED_WEIGHTS_FOLLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("medtvt_saved_weights_follow", default=False)


def saved_weights_follow() -> bool:
    """True while a saved medtvt model is built: every tensor a plugin builds without a weights file is
    replaced next by the saved one, so "randomly initialised" is not worth a warning then."""
    return _SAVED_WEIGHTS_FOLLOW.get()


@contextlib.contextmanager
def building_saved_model() -> Iterator[None]:
    """Context in which :func:`saved_weights_follow` is true (used by the model loader)."""
    token = _SAVED_WEIGHTS_FOLLOW.set(True)
    try:
        yield
    finally:
        _SAVED_WEIGHTS_FOLLOW.reset(token)


class PluginConfig(BaseModel):
    """Base of every plugin config: unknown keys are errors, defaults are documented."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- modalities
class ModalityReader(ABC):
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
    #: Help of the ``medtvt diagnose --<name>`` option (the value is a file path by default).
    cli_help: ClassVar[str] = ""
    #: Extra ``medtvt diagnose --<name>-<key>`` options: key -> help (e.g. the row id of a table).
    cli_extras: ClassVar[dict[str, str]] = {}
    config: PluginConfig

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed sample (float32)."""

    @property
    def stats(self) -> dict[str, Any] | None:
        """Statistics restored by :meth:`set_stats` (None when the reader needs none or has none yet)."""
        return None

    def for_input(self, value: str, extras: dict[str, str]) -> tuple["ModalityReader", Path, str]:
        """``(reader, root, reference)`` that :meth:`load` reads a user-given input with (``medtvt
        diagnose``).  Default: ``value`` is a file path (absolute, so any ``data_dir`` is ignored)."""
        if extras:
            raise ValueError(f"{self.name}: takes no extra options, got {sorted(extras)}")
        return self, Path("/"), str(Path(value).expanduser().resolve())

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



#: The reader contract's earlier name (medtvt 0.1); kept so that plugins written against it still load.
Modality = ModalityReader

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

    @classmethod
    def declared_weight_files(cls, options: dict[str, Any]) -> list[Path]:
        """The weight files validated ``options`` name, without building the encoder (checked before a
        run starts).  Default: the ``weights`` option."""
        w = options.get("weights")
        return [Path(w).expanduser()] if w not in (None, "") else []

    def weight_files(self) -> list[Path]:
        """Files the frozen backbone's weights were read from; ``[]`` when they are a random init.

        A saved model references these files (path + SHA-256) instead of copying the backbone, and
        stores the backbone itself when the list is empty.
        """
        cfg = getattr(self, "config", None)
        return self.declared_weight_files(cfg.model_dump() if isinstance(cfg, BaseModel) else {})

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
    """Cross-modal fusion. ``__init__(dim, num_modalities, *, modality_names=None, **config)``.

    ``modality_names`` (the model's modalities, in mask-column order) is passed by the core to
    plugins whose constructor accepts it; it is therefore no name for a config field.
    """

    config_class: ClassVar[type[PluginConfig]]

    def __init__(self, dim: int, num_modalities: int, modality_names: Sequence[str] | None = None):
        super().__init__()
        self.dim = dim
        self.num_modalities = num_modalities
        self.modality_names = None if modality_names is None else tuple(modality_names)

    @abstractmethod
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        """``tokens [B, M, K, D]``, ``mask [B, M]`` bool (True = present) -> :class:`FusionOutput`.

        A masked modality must take no part: changing its tokens changes no output, and its
        output tokens and weight are zero.
        """


class IdentityFusion(Fusion):
    """No fusion: tokens unchanged except that masked modalities are zero; weights ``None``.

    The PT stage (which has no MPL) and the ``none`` fusion plugin both use this class.
    """

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        if tokens.dim() != 4 or tuple(mask.shape) != (tokens.shape[0], tokens.shape[1]):
            raise ValueError(f"IdentityFusion: tokens [B, M, K, D] and mask [B, M], got {tuple(tokens.shape)} "
                             f"and {tuple(mask.shape)}")
        # where, not multiply: NaN/inf in a masked modality's tokens must not leak (NaN * 0 = NaN).
        keep = mask.to(device=tokens.device, dtype=torch.bool)[:, :, None, None]
        return FusionOutput(tokens=torch.where(keep, tokens, tokens.new_zeros(())), weights=None)


# --------------------------------------------------------------------------- rewards
@runtime_checkable
class RewardFunction(Protocol):
    __name__: str

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]: ...


# --------------------------------------------------------------------------- LLMs
class LLMBackbone(ABC):
    """Factory of a causal LM with a LoRA adapter. ``__init__(**config)``.

    A new model is made in three calls: :meth:`load_tokenizer`, then (after the core added the
    placeholders to the tokenizer) :meth:`text_config` for that vocabulary, then :meth:`build_model`.
    Loading a saved model calls :meth:`build_model` only, with the saved ``text_config``.
    """

    config_class: ClassVar[type[PluginConfig]]

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def load_tokenizer(self, corpus: Callable[[], Sequence[str]] | None = None) -> Any:
        """The tokenizer of the LM's source, or one trained on ``corpus()`` when the source has none."""

    @abstractmethod
    def text_config(self, tokenizer: Any) -> Any:
        """The LM's ``PretrainedConfig`` for ``tokenizer`` (vocabulary size, special token ids)."""

    @abstractmethod
    def build_model(self, text_config: Any, *, adapter: bool = True) -> nn.Module:
        """The causal LM for ``text_config``, weights from the plugin's source (or a seeded random
        init), embeddings sized to its vocabulary, wrapped in a peft LoRA adapter when ``adapter``."""

    def weight_files(self) -> list[Path]:
        """Files the base weights are read from; ``[]`` when they are a random init (then a saved
        model stores them)."""
        return []

    def prepare_base(self, model: nn.Module, tokenizer: Any, corpus: Callable[[], Sequence[str]] | None) -> None:
        """Optional one-time preparation of a new model's base before any stage (e.g. a demo's
        language-model pretraining of a random base). Never called when a saved model is loaded."""

    def extra_parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the LM's norms, biases and input embeddings (trained with ``train_extras``)."""
        raise ConfigError(f"LLM plugin {type(self).__name__} does not say which norms/biases/embeddings to train; "
                          f"set pt.train_extras and sft.train_extras to false")
