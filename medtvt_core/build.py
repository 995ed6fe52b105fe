"""The one place where configuration becomes objects: plugins are looked up, their options
validated (once, with the plugin's own pydantic model) and the objects built.

* :func:`plugin_class` / :func:`validated_options`: a registry entry and its checked options;
  a bad option is a one-line :class:`ConfigError` naming where it was set.
* :func:`build_readers`, :func:`build_encoder`, :func:`build_fusion`, :func:`build_llm_plugin`: the
  parts of a model (used by the model's constructor and the processor's loader).
* :func:`validate_run` checks a :class:`~medtvt_core.config.RunConfig` before anything runs.
* :func:`check_weight_reference`: a saved model's referenced weight file is there, unchanged.

The model (:mod:`medtvt_core.model`) builds its parts with these, and
:func:`medtvt_core.model.factory.new_model` a fresh model for a run; this module imports nothing
of the model, so the arrows point one way (model -> build -> plugin registry).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from pydantic import BaseModel, ValidationError

from .checkpoints import sha256_file
from .config import format_validation_error
from .errors import CheckpointError, ConfigError
from .plugins import Catalog, get_catalog

__all__ = ["plugin_class", "validated_options", "build_readers", "build_encoder", "build_fusion",
           "build_llm_plugin", "validate_run", "required_weights", "check_weight_reference", "FUSION_SEED_OFFSET"]

#: The fusion layer is initialised from ``seed + FUSION_SEED_OFFSET`` whenever it is built, so a
#: variant's SFT starts from the same fusion weights whether its PT stage was trained here or
#: reused from another variant (``medtvt ablate``).
FUSION_SEED_OFFSET = 7919


def _catalog(catalog: Catalog | None) -> Catalog:
    return get_catalog() if catalog is None else catalog


def plugin_class(kind: str, name: str, catalog: Catalog | None = None) -> tuple[Any, type[BaseModel] | None]:
    """``(registered object, its config model or None)``; an unknown name lists the available ones."""
    spec = _catalog(catalog)[kind].spec(name)
    return spec.obj, spec.config or getattr(spec.obj, "config_class", None)


def validated_options(kind: str, name: str, options: Mapping[str, Any] | None, where: str, catalog: Catalog | None = None,
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
        raise ConfigError(format_validation_error(err, f"{where}.options ({name})")) from None
    return obj, cfg.model_dump()


# --------------------------------------------------------------------------- parts
def build_readers(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None, catalog: Catalog | None = None,
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


def _check_reads(cls: Any, name: str, modality: str) -> None:
    """The encoder class ``cls`` (registry name ``name``) reads ``modality`` (its ``modality`` attribute)."""
    reads = getattr(cls, "modality", modality)
    if reads != modality:
        raise ConfigError(f"encoders.{modality}: encoder {name!r} reads modality {reads!r}, not {modality!r}")


def build_encoder(modality: str, ref: Mapping[str, Any], tokens_per_modality: int, catalog: Catalog | None = None) -> Any:
    """The encoder of ``modality`` (``{"name", "options"}``), backbone frozen."""
    where = f"encoders.{modality}"
    cls, opts = validated_options("encoders", ref["name"], ref.get("options"), where, catalog,
                                  defaults={"num_tokens": tokens_per_modality})
    _check_reads(cls, ref["name"], modality)
    enc = cls(**opts)
    if enc.num_tokens not in (1, tokens_per_modality):
        raise ConfigError(f"{where}: encoder {ref['name']!r} gives K={enc.num_tokens} tokens but "
                          f"projector.tokens_per_modality={tokens_per_modality}; use {tokens_per_modality} "
                          f"(or 1, which is repeated)")
    enc.freeze_backbone()
    return enc


def build_fusion(ref: Mapping[str, Any], dim: int, num_modalities: int, seed: int | None, catalog: Catalog | None = None, *,
                 modality_names: Sequence[str] | None = None) -> Any:
    """The fusion layer, initialised from ``seed + FUSION_SEED_OFFSET`` (``None``: the global RNG).

    ``modality_names`` reach plugins whose constructor takes them (e.g. named CMHA rotations)."""
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


def build_llm_plugin(ref: Mapping[str, Any], catalog: Catalog | None = None) -> Any:
    cls, opts = validated_options("llms", ref["name"], ref.get("options"), "llm", catalog)
    return cls(**opts)


# --------------------------------------------------------------------------- runs
def validate_run(cfg: Any, catalog: Catalog | None = None) -> None:
    """Every plugin of ``cfg`` exists and its options fit its config model (nothing is built)."""
    catalog = _catalog(catalog)
    for m in dict.fromkeys([*cfg.modalities, *cfg.data.modality_options]):
        validated_options("modalities", m, cfg.data.modality_options.get(m), f"data.modality_options.{m}", catalog)
    for m in cfg.modalities:
        ref = cfg.encoders[m]
        cls, _ = validated_options("encoders", ref.name, ref.options, f"encoders.{m}", catalog)
        _check_reads(cls, ref.name, m)
    validated_options("fusion", cfg.fusion.name, cfg.fusion.options, "fusion", catalog)
    validated_options("llms", cfg.llm.name, cfg.llm.options, "llm", catalog)
    for r in cfg.rewards:
        catalog.rewards.spec(r.name)


def required_weights(cfg: Any, catalog: Catalog | None = None) -> None:
    """One error naming every part of ``cfg`` whose weights would be a random init, or whose file is missing."""
    missing, absent = [], []
    for m in cfg.modalities:
        ref = cfg.encoders[m]
        cls, opts = validated_options("encoders", ref.name, ref.options, f"encoders.{m}", catalog)
        files = cls.declared_weight_files(opts)
        missing += [] if files else [f"encoders.{m}.options.weights"]
        absent += [f"encoders.{m}: {p}" for p in files if not p.is_file()]
    llm_plugin = build_llm_plugin(cfg.llm.model_dump(), catalog)
    path = getattr(llm_plugin, "pretrained_path", None)
    if path is None:
        missing.append("llm.options.model_path")
    elif not Path(path).is_dir():
        absent.append(f"llm: {path}")
    if missing:
        raise ConfigError(f"no pretrained weights for {', '.join(missing)}: set each to a local file (models are "
                          f"never downloaded), or pass --random-weights to train random ones")
    if absent:
        raise CheckpointError(f"weight files do not exist: {'; '.join(absent)}")


def check_weight_reference(ref: Mapping[str, Any], where: str) -> None:
    """A referenced weight file exists and has the recorded SHA-256; else one :class:`CheckpointError`."""
    p = Path(ref["path"])
    if not p.is_file():
        raise CheckpointError(f"{where}: {ref['component']} weights {p} are missing (the model references the file "
                              f"instead of holding a copy); restore it or re-export the model")
    digest = sha256_file(p)
    if digest != ref["sha256"]:
        raise CheckpointError(f"{where}: {ref['component']} weights {p} changed since the model was saved "
                              f"(sha256 {digest[:12]}..., recorded {ref['sha256'][:12]}...)")
