"""A clinical-note modality (``note``, placeholder ``<note>``) and its encoder ``note-hash``.

Reviewers of MedTVT-R1 asked for clinical text as a further modality. A note is a UTF-8 text
file referenced by the QA record field ``"note"``. It is turned into a signed hashed
bag-of-words (scikit-learn's ``HashingVectorizer``: stateless, so no vocabulary has to be
fitted or stored), which a frozen random projection encodes and a trainable linear head pools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.contracts import Encoder, ModalityReader, PluginConfig
from medtvt_core.errors import DataError


class NoteConfig(PluginConfig):
    n_features: int = Field(512, ge=16, le=1 << 20, description="hash buckets of the bag-of-words vector")
    max_bytes: int = Field(1 << 20, ge=1, description="refuse notes larger than this many bytes")


class NoteModality(ModalityReader):
    """Free-text clinical note read from a UTF-8 file, as a hashed bag of words."""

    name = "note"
    placeholder = "<note>"
    record_field = "note"
    config_class = NoteConfig

    def __init__(self, n_features: int = 512, max_bytes: int = 1 << 20):
        self.config = NoteConfig(n_features=n_features, max_bytes=max_bytes)
        self._vectorizer: Any = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.config.n_features,)

    def load(self, ref: str, *, root: Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        from sklearn.feature_extraction.text import HashingVectorizer

        path = Path(root) / ref
        if not path.is_file():
            raise DataError(f"note {path}: file does not exist")
        if path.stat().st_size > self.config.max_bytes:
            raise DataError(f"note {path}: {path.stat().st_size} bytes exceeds max_bytes={self.config.max_bytes}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"note {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if self._vectorizer is None:
            self._vectorizer = HashingVectorizer(n_features=self.config.n_features, alternate_sign=True, norm="l2")
        vec = self._vectorizer.transform([text]).toarray()[0]
        return torch.from_numpy(vec).float()


class NoteEncoderConfig(PluginConfig):
    n_features: int = Field(512, ge=16, description="input width; must equal the note modality's n_features")
    width: int = Field(256, ge=8, description="width of the frozen projection (feature C)")
    seed: int = Field(0, description="seed of the frozen random projection")


class NoteHashEncoder(Encoder):
    """Frozen random projection of the hashed note vector plus a trainable linear head."""

    modality: ClassVar[str] = "note"
    config_class = NoteEncoderConfig
    contract_options: ClassVar[dict[str, Any]] = {"n_features": 64, "width": 32}

    def __init__(self, n_features: int = 512, width: int = 256, seed: int = 0):
        super().__init__()
        self.config = NoteEncoderConfig(n_features=n_features, width=width, seed=seed)
        g = torch.Generator().manual_seed(seed)
        # A fixed Gaussian projection keeps distances (Johnson-Lindenstrauss); nothing to download.
        self.register_buffer("projection", torch.randn(n_features, width, generator=g) / width**0.5)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.input_shape = (n_features,)
        self.feature_shape = (1, width)
        self.pooled_dim = width
        self.num_tokens = 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (x.float() @ self.projection).unsqueeze(1)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return []  # the projection is a buffer: nothing to freeze

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {"projection": self.projection}


@hookimpl
def medtvt_register_modalities(register):
    register("note", NoteModality, config=NoteConfig)


@hookimpl
def medtvt_register_encoders(register):
    register("note-hash", NoteHashEncoder, config=NoteEncoderConfig)
