"""``MedTVTConfig``: the composite Hugging Face config of a MedTVT model (``model_type = "medtvt"``).

In the manner of transformers' ``LlavaConfig``: the language model's own config is a sub-config
(``text_config``); the rest names the plugins that build each part and the placeholder tokens.
Plugins are stored by registry name plus options (plain JSON), never as pickled objects, so a
saved model loads wherever the same plugins are installed.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

__all__ = ["MedTVTConfig", "FORMAT_VERSION"]

#: Version of the saved-model layout (config fields + weight files); a newer one is refused.
FORMAT_VERSION = 2

_PROJECTOR_DEFAULTS = {"tokens_per_modality": 1, "blocks": 3, "standardize_features": False, "normalize_input": False}


def _ref(value: Any, default: str) -> dict[str, Any]:
    """``{"name", "options"}`` of a plugin reference given as a dict, a pydantic model or a name."""
    if value is None:
        return {"name": default, "options": {}}
    if isinstance(value, str):
        return {"name": value, "options": {}}
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return {"name": str(value["name"]), "options": copy.deepcopy(dict(value.get("options") or {}))}


class MedTVTConfig(PretrainedConfig):
    """What builds a :class:`~medtvt_core.model.modeling.MedTVTForConditionalGeneration`.

    * ``modalities``: modality names in the order of the modality-mask columns.
    * ``encoders``: modality -> ``{"name": encoder plugin, "options": {...}}``.
    * ``projector``: ``tokens_per_modality`` (K), ``blocks`` (SwiGLU blocks), ``standardize_features``,
      ``normalize_input`` (true, false, or the modalities whose pooled feature is L2-normalised before
      its projector: ``["cxr", "lab"]`` in the reference, see docs/method.md).
    * ``fusion`` / ``llm``: ``{"name", "options"}`` of the fusion and LLM plugins.
    * ``text_config``: the LLM's own config (vocabulary including the placeholders).
    * ``placeholders``: modality -> placeholder token text; ``placeholder_token_ids``: modality -> id.
    * ``stage``: the stage the weights were last configured for (``"pt"`` runs without fusion).
    * ``extras_trained``: LLM norms / biases / embeddings were trained (so they are saved).
    * ``lora_merged``: the LoRA adapter was folded into the LLM weights (no adapter is built).
    * ``modality_dropout``: stage -> ``{modality: p}`` of the modality dropout each stage trained with
      (``{}``: never trained with a missing modality; see :attr:`trained_for_missing_modalities`).
    * ``weight_references``: files the frozen weights are read from instead of being copied
      (``{"component", "path", "sha256", "bytes"}``), checked when the model is loaded.
    """

    model_type = "medtvt"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, modalities: list[str] | None = None, encoders: dict[str, Any] | None = None,
                 projector: dict[str, Any] | None = None, fusion: Any = None, llm: Any = None,
                 text_config: Any = None, placeholders: dict[str, str] | None = None,
                 placeholder_token_ids: dict[str, int] | None = None, stage: str | None = None,
                 extras_trained: bool = False, lora_merged: bool = False,
                 weight_references: list[dict[str, Any]] | None = None,
                 modality_dropout: dict[str, dict[str, float]] | None = None,
                 medtvt_format_version: int = FORMAT_VERSION, **kwargs: Any):
        self.modalities = list(modalities or [])
        self.encoders = {m: _ref(r, "") for m, r in (encoders or {}).items()}
        proj = projector.model_dump() if hasattr(projector, "model_dump") else dict(projector or {})
        self.projector = {**_PROJECTOR_DEFAULTS, **proj}
        self.fusion = _ref(fusion, "mpl")
        self.llm = _ref(llm, "llama-lora")
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config.get("model_type", "llama")](**text_config)
        self.text_config = text_config
        self.placeholders = dict(placeholders or {})
        self.placeholder_token_ids = {m: int(i) for m, i in (placeholder_token_ids or {}).items()}
        self.stage = stage
        self.extras_trained = bool(extras_trained)
        self.lora_merged = bool(lora_merged)
        self.weight_references = list(weight_references or [])
        self.modality_dropout = {s: {m: float(p) for m, p in d.items()} for s, d in (modality_dropout or {}).items()}
        self.medtvt_format_version = int(medtvt_format_version)
        super().__init__(**kwargs)

    @property
    def tokens_per_modality(self) -> int:
        return int(self.projector["tokens_per_modality"])

    @property
    def trained_for_missing_modalities(self) -> bool:
        """Some stage trained with modality dropout, so the model has seen absent modalities."""
        return any(p > 0 for d in self.modality_dropout.values() for p in d.values())

    @property
    def uses_fusion(self) -> bool:
        """The fusion layer runs from SFT on (docs/method.md, "Training": no MPL in PT)."""
        return self.stage != "pt"
