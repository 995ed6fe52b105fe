"""A fresh model and processor for a run configuration: the tokenizer with the modality
placeholders, the composite config, the parts built from plugins (:mod:`medtvt_core.build`), the
LLM base's one-time preparation."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..build import build_llm_plugin, build_readers
from ..errors import ConfigError
from ..plugins import Catalog, get_catalog
from .configuration import MedTVTConfig
from .modeling import MedTVTForConditionalGeneration
from .processing import MedTVTProcessor

__all__ = ["new_model"]


def new_model(cfg: Any, catalog: Catalog | None = None, *, corpus: Callable[[], Sequence[str]] | None = None,
              default_question: str | None = None, readers: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """A fresh ``(MedTVTForConditionalGeneration, MedTVTProcessor)`` for run config ``cfg``.

    The LLM's tokenizer gets one special token per modality *in use* (never for other installed
    modalities, so installing a plugin changes no model that does not use it); the LLM plugin's
    one-time base preparation (e.g. the demo's pretraining) runs here and only here.
    ``readers``: the run's modality readers (default: built from ``cfg``).
    """
    catalog = catalog if catalog is not None else get_catalog()
    readers = dict(readers) if readers is not None else build_readers(cfg.modalities, cfg.modality_options_in_use, catalog)
    llm_plugin = build_llm_plugin(cfg.llm.model_dump(), catalog)
    tok = llm_plugin.load_tokenizer(corpus)
    placeholders = {m: readers[m].placeholder for m in cfg.modalities}
    clash = [p for p in placeholders.values() if p in tok.get_vocab()]
    if clash:
        raise ConfigError(f"placeholder(s) {', '.join(clash)} are already tokens of the LLM's tokenizer; "
                          f"a modality placeholder must be a new token")
    tok.add_special_tokens({"extra_special_tokens": list(placeholders.values())}, replace_extra_special_tokens=False)
    # The processor checks the prompt's tokens (answer end token, BOS) against the tokenizer: made
    # first, so a token the tokenizer lacks is refused before the model is built or trained.
    processor = MedTVTProcessor(tok, placeholders, cfg.projector.tokens_per_modality, readers=readers,
                                prompt_format=cfg.prompt.format, answer_end_token=cfg.prompt.answer_end_token,
                                chat_template_kwargs=cfg.prompt.chat_template_kwargs,
                                default_question=default_question, max_new_tokens=cfg.eval.max_new_tokens)
    text_config = llm_plugin.text_config(tok)
    config = MedTVTConfig(
        modalities=list(cfg.modalities), encoders={m: cfg.encoders[m] for m in cfg.modalities},
        projector=cfg.projector, fusion=cfg.fusion, llm=cfg.llm, text_config=text_config,
        placeholders=placeholders,
        placeholder_token_ids={m: int(tok.convert_tokens_to_ids(p)) for m, p in placeholders.items()})
    model = MedTVTForConditionalGeneration(config, catalog=catalog, seed=cfg.seed)
    for m, r in readers.items():
        want = tuple(model.encoders[m].input_shape)
        if tuple(r.sample_shape) != want:
            raise ConfigError(f"modality {m}: reader {type(r).__name__} gives samples of shape {tuple(r.sample_shape)} "
                              f"but encoder {cfg.encoders[m].name!r} consumes {want}; align the reader options "
                              f"(data.modality_options.{m}) with the encoder")
    model.llm_plugin.prepare_base(model.llm, tok, corpus)
    return model, processor
