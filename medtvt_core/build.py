"""The one place where configuration becomes objects: plugins are looked up, their options
validated (once, with the plugin's own pydantic model) and the objects built.

* :func:`plugin_class` / :func:`validated_options`: a registry entry and its checked options;
  a bad option is a one-line :class:`ConfigError` naming where it was set.
* :func:`build_readers`, :func:`build_encoder`, :func:`build_fusion`, :func:`build_backbone`: the
  parts of a model (used by the model's constructor and the processor's loader).
* :func:`validate_run` checks a :class:`~medtvt_core.config.RunConfig` before anything runs.
* :func:`new_model` makes a fresh model and its processor from a run configuration (tokenizer,
  placeholders, the LLM's vocabulary, the base's one-time preparation), checking that every
  reader's sample shape is what its encoder consumes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from pydantic import BaseModel, ValidationError

from .errors import CheckpointError, ConfigError

__all__ = ["plugin_class", "validated_options", "build_readers", "build_encoder", "build_fusion",
           "build_backbone", "validate_run", "new_model", "required_weights", "FUSION_SEED_OFFSET"]

#: The fusion layer is initialised from ``seed + FUSION_SEED_OFFSET`` whenever it is built, so a
#: variant's SFT starts from the same fusion weights whether its PT stage was trained here or
#: reused from another variant (``medtvt ablate``).
FUSION_SEED_OFFSET = 7919


def _catalog(catalog: Any) -> Any:
    if catalog is None:
        from .plugins import get_catalog

        catalog = get_catalog()
    return catalog


def plugin_class(kind: str, name: str, catalog: Any = None) -> tuple[Any, type[BaseModel] | None]:
    """``(registered object, its config model or None)``; an unknown name lists the available ones."""
    spec = _catalog(catalog)[kind].spec(name)
    return spec.obj, spec.config or getattr(spec.obj, "config_class", None)


def validated_options(kind: str, name: str, options: Mapping[str, Any] | None, where: str, catalog: Any = None,
                      *, defaults: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Plugin object and its validated keyword arguments.

    ``defaults`` fill fields the user left unset when the plugin has such a field (e.g. an
    encoder's ``num_tokens`` follows ``projector.tokens_per_modality``).
    """
    obj, model = plugin_class(kind, name, catalog)
    options = dict(options or {})
    if model is None:
        if options:
            raise ConfigError(f"{where}.options: plugin {name!r} takes no options, got {sorted(options)}")
        return obj, {}
    fill = {k: v for k, v in (defaults or {}).items() if k in model.model_fields and k not in options}
    try:
        cfg = model.model_validate({**options, **fill})
    except ValidationError as err:
        if fill:  # the plugin refuses the default (e.g. a one-token lab encoder): the user's options alone
            return validated_options(kind, name, options, where, catalog)
        from .config import format_validation_error

        raise ConfigError(format_validation_error(err, f"{where}.options ({name})")) from None
    return obj, cfg.model_dump()


# --------------------------------------------------------------------------- parts
def build_readers(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None, catalog: Any = None,
                  *, plugin_names: Mapping[str, str] | None = None, where: str = "data.modality_options") -> dict[str, Any]:
    """Modality readers ``names`` (registry names, unless ``plugin_names`` maps them) with their options."""
    options = dict(options or {})
    unused = sorted(set(options) - set(names))
    if unused:
        raise ConfigError(f"{where}: options for {', '.join(unused)} but the modalities in use are {', '.join(names)}")
    out: dict[str, Any] = {}
    for m in names:
        name = (plugin_names or {}).get(m, m)
        cls, opts = validated_options("modalities", name, options.get(m), f"{where}.{m}", catalog)
        out[m] = cls(**opts)
    return out


def build_encoder(modality: str, ref: Mapping[str, Any], tokens_per_modality: int, catalog: Any = None) -> Any:
    """The encoder of ``modality`` (``{"name", "options"}``), backbone frozen."""
    where = f"encoders.{modality}"
    cls, opts = validated_options("encoders", ref["name"], ref.get("options"), where, catalog,
                                  defaults={"num_tokens": tokens_per_modality})
    reads = getattr(cls, "modality", modality)
    if reads != modality:
        raise ConfigError(f"{where}: encoder {ref['name']!r} reads modality {reads!r}, not {modality!r}")
    enc = cls(**opts)
    if enc.num_tokens not in (1, tokens_per_modality):
        raise ConfigError(f"{where}: encoder {ref['name']!r} gives K={enc.num_tokens} tokens but "
                          f"projector.tokens_per_modality={tokens_per_modality}; use {tokens_per_modality} "
                          f"(or 1, which is repeated)")
    enc.freeze_backbone()
    return enc


def build_fusion(ref: Mapping[str, Any], dim: int, num_modalities: int, seed: int | None, catalog: Any = None, *,
                 modality_names: Sequence[str] | None = None) -> Any:
    """The fusion layer, initialised from ``seed + FUSION_SEED_OFFSET`` (``None``: the global RNG).

    ``modality_names`` reach plugins whose constructor takes them (e.g. named CMHA rotations)."""
    import inspect

    cls, opts = validated_options("fusion", ref["name"], ref.get("options"), "fusion", catalog)
    if modality_names is not None:
        if len(modality_names) != num_modalities:
            raise ConfigError(f"fusion: {len(modality_names)} modality names for {num_modalities} modalities")
        params = inspect.signature(cls.__init__).parameters
        if "modality_names" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            opts["modality_names"] = list(modality_names)
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed + FUSION_SEED_OFFSET)
        return cls(dim, num_modalities, **opts)


def build_backbone(ref: Mapping[str, Any], catalog: Any = None) -> Any:
    cls, opts = validated_options("llms", ref["name"], ref.get("options"), "llm", catalog)
    return cls(**opts)


# --------------------------------------------------------------------------- runs
def validate_run(cfg: Any, catalog: Any = None) -> None:
    """Every plugin of ``cfg`` exists and its options fit its config model (nothing is built)."""
    catalog = _catalog(catalog)
    for m in dict.fromkeys([*cfg.modalities, *cfg.data.modality_options]):
        validated_options("modalities", m, cfg.data.modality_options.get(m), f"data.modality_options.{m}", catalog)
    for m in cfg.modalities:
        ref = cfg.encoders[m]
        cls, _ = validated_options("encoders", ref.name, ref.options, f"encoders.{m}", catalog)
        reads = getattr(cls, "modality", m)
        if reads != m:
            raise ConfigError(f"encoders.{m}: encoder {ref.name!r} reads modality {reads!r}, not {m!r}")
    validated_options("fusion", cfg.fusion.name, cfg.fusion.options, "fusion", catalog)
    validated_options("llms", cfg.llm.name, cfg.llm.options, "llm", catalog)
    for r in cfg.rewards:
        catalog.rewards.spec(r.name)


def required_weights(cfg: Any, catalog: Any = None) -> None:
    """One error naming every part of ``cfg`` whose weights would be a random init, or whose file is missing."""
    missing, absent = [], []
    for m in cfg.modalities:
        ref = cfg.encoders[m]
        cls, opts = validated_options("encoders", ref.name, ref.options, f"encoders.{m}", catalog)
        files = cls.declared_weight_files(opts)
        missing += [] if files else [f"encoders.{m}.options.weights"]
        absent += [f"encoders.{m}: {p}" for p in files if not p.is_file()]
    backbone = build_backbone(cfg.llm.model_dump(), catalog)
    path = getattr(backbone, "pretrained_path", None)
    if path is None:
        missing.append("llm.options.model_path")
    elif not Path(path).is_dir():
        absent.append(f"llm: {path}")
    if missing:
        raise ConfigError(f"no pretrained weights for {', '.join(missing)}: set each to a local file (models are "
                          f"never downloaded), or pass --random-weights to train random ones")
    if absent:
        raise CheckpointError(f"weight files do not exist: {'; '.join(absent)}")


def new_model(cfg: Any, catalog: Any = None, *, corpus: Callable[[], Sequence[str]] | None = None,
              default_question: str | None = None, readers: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """A fresh ``(MedTVTForConditionalGeneration, MedTVTProcessor)`` for run config ``cfg``.

    The LLM's tokenizer gets one special token per modality *in use* (never for other installed
    modalities, so installing a plugin changes no model that does not use it); the LLM plugin's
    one-time base preparation (e.g. the demo's pretraining) runs here and only here.
    ``readers``: the run's modality readers (default: built from ``cfg``).
    """
    from .model.configuration import MedTVTConfig
    from .model.modeling import MedTVTForConditionalGeneration
    from .model.processing import MedTVTProcessor

    catalog = _catalog(catalog)
    readers = dict(readers) if readers is not None else build_readers(cfg.modalities, cfg.modality_options_in_use, catalog)
    backbone = build_backbone(cfg.llm.model_dump(), catalog)
    tok = backbone.load_tokenizer(corpus)
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
    text_config = backbone.text_config(tok)
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
    model.backbone.prepare_base(model.llm, tok, corpus)
    return model, processor


def check_weight_reference(ref: Mapping[str, Any], where: str) -> None:
    """A referenced weight file exists and has the recorded SHA-256; else one :class:`CheckpointError`."""
    from .checkpoints import sha256_file

    p = Path(ref["path"])
    if not p.is_file():
        raise CheckpointError(f"{where}: {ref['component']} weights {p} are missing (the model references the file "
                              f"instead of holding a copy); restore it or re-export the model")
    digest = sha256_file(p)
    if digest != ref["sha256"]:
        raise CheckpointError(f"{where}: {ref['component']} weights {p} changed since the model was saved "
                              f"(sha256 {digest[:12]}..., recorded {ref['sha256'][:12]}...)")
