"""The saved-model format: a directory that is a complete model.

``config.json``
    :class:`~medtvt_core.model.configuration.MedTVTConfig` (``model_type: medtvt``): plugin names and
    options, placeholders, the LLM's ``text_config``, the stage, the format version and the
    ``weight_references``.
``model.safetensors``
    every tensor that cannot be rebuilt bit-exactly from a file the user named: for the demo all of
    it (the tiny base LLM, the random encoders, heads, projectors, fusion, LoRA); for a model built
    on real checkpoints the trained parts only, while the frozen encoder backbones and the LLM base
    are *referenced*: path, size and SHA-256 of each file, checked when the model is loaded.
``processor_config.json`` + tokenizer files
    written by :class:`~medtvt_core.model.processing.MedTVTProcessor` (readers and their statistics).

Loading needs nothing else: no data directory, no run configuration, no training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..build import check_weight_reference
from ..checkpoints import load_state_file, save_safetensors, sha256_file
from ..contracts import building_saved_model
from ..errors import CheckpointError
from ..io import atomic_write_text
from ..plugins import Catalog
from .configuration import FORMAT_VERSION, MedTVTConfig
from .stages import freeze

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_model", "load_model", "load_weights", "read_model_config",
           "saved_state_keys", "is_saved_model"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _referenced(model: Any) -> tuple[set[str], list[dict[str, Any]]]:
    """State keys read from user-named files (not saved) and the references of those files."""
    state = model.state_dict(keep_vars=True)
    keys: set[str] = set()
    files: list[tuple[str, Path]] = []
    for m, enc in model.encoders.items():
        wf = enc.weight_files()
        if wf:
            keys |= {f"encoders.{m}.{k}" for k in enc.backbone_state()}
            files += [(f"encoders.{m}", p) for p in wf]
    wf = [] if model.config.lora_merged else model.llm_plugin.weight_files()
    if wf:
        # The LLM base comes from its checkpoint (new embedding rows are derived from it
        # deterministically); LoRA and, once trained, the extras are ours.
        extras = set(model.llm_plugin.extra_parameter_names(model.llm)) if model.config.extras_trained else set()
        ids = {id(state[f"llm.{n}"]) for n in extras if f"llm.{n}" in state}
        keys |= {k for k, v in state.items() if k.startswith("llm.") and "lora_" not in k and id(v) not in ids}
        files += [("llm", p) for p in wf]
    refs = []
    for component, p in files:
        p = p.resolve()
        if not p.is_file():
            raise CheckpointError(f"{component}: weight file {p} does not exist")
        refs.append({"component": component, "path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return keys, refs


def saved_state_keys(model: Any, referenced: set[str] | None = None) -> list[str]:
    """State-dict keys written to ``model.safetensors`` (a tensor registered twice is stored once)."""
    if referenced is None:
        referenced = _referenced(model)[0]
    out, seen = [], set()
    for k, v in model.state_dict(keep_vars=True).items():
        if k not in referenced and k.startswith(("encoders.", "projectors.", "feature_norms.", "fusion.", "llm.")) \
                and id(v) not in seen:
            seen.add(id(v))
            out.append(k)
    return out


def is_saved_model(directory: str | os.PathLike[str]) -> bool:
    d = Path(directory)
    return (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()


def save_model(model: Any, directory: str | os.PathLike[str], *, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each file atomically)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    referenced, refs = _referenced(model)
    keys = saved_state_keys(model, referenced)
    state = dict(state_dict) if state_dict is not None else model.state_dict()
    save_safetensors({k: state[k] for k in keys}, d / WEIGHTS_NAME,
                     metadata={"format": "pt", "medtvt_format": str(FORMAT_VERSION)})
    model.config.weight_references = refs
    model.config.medtvt_format_version = FORMAT_VERSION
    atomic_write_text(d / CONFIG_NAME, model.config.to_json_string())
    return d


def read_model_config(directory: str | os.PathLike[str]) -> MedTVTConfig:
    """The config of a saved model; a directory that is not one, or a newer format, is a one-line error."""
    d = Path(directory)
    f = d / CONFIG_NAME
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; expected a saved medtvt model (config.json, model.safetensors)")
    if not f.is_file():
        raise CheckpointError(f"{d}: no {CONFIG_NAME}; not a saved medtvt model")
    try:
        raw = json.loads(f.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != MedTVTConfig.model_type:
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise CheckpointError(f"{f}: model_type {kind!r}, not {MedTVTConfig.model_type!r}; not a medtvt model")
    version = raw.get("medtvt_format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{f}: saved in format version {version!r}; this medtvt reads versions up to "
                              f"{FORMAT_VERSION} (upgrade medtvt)")
    if version < FORMAT_VERSION:
        raise CheckpointError(f"{f}: format version {version} is older than {FORMAT_VERSION} and cannot be read "
                              f"(re-train or re-export with this version)")
    if not (d / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{d}: no {WEIGHTS_NAME}")
    try:
        return MedTVTConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{f}: malformed ({type(exc).__name__}: {exc})".replace("\n", " ")) from None


def load_weights(model: Any, directory: str | os.PathLike[str], *, exclude: Sequence[str] = ()) -> None:
    """Load ``model.safetensors`` of ``directory`` strictly: every key the model saves present with its
    shape, none unknown.  ``exclude``: key prefixes skipped on both sides."""
    d = Path(directory)
    wfile = d / WEIGHTS_NAME
    if not wfile.is_file():
        raise CheckpointError(f"{d}: no {WEIGHTS_NAME}")
    skip = tuple(exclude)
    got = load_state_file(wfile)
    if skip:
        got = {k: v for k, v in got.items() if not k.startswith(skip)}
    own = model.state_dict()
    expected = [k for k in saved_state_keys(model) if not (skip and k.startswith(skip))]
    check_state(got, {k: own[k] for k in expected}, str(wfile))
    model.load_state_dict(got, strict=False)


def load_model(model_class: type, directory: str | os.PathLike[str], *, catalog: Catalog | None = None, device: Any = None,
               dtype: torch.dtype | None = None) -> Any:
    """The ``model_class`` model saved in ``directory`` (see the module docstring), on ``device``."""
    d = Path(directory)
    config = read_model_config(d)
    for ref in config.weight_references:
        check_weight_reference(ref, str(d / CONFIG_NAME))
    # Plugins that build without a weights file need not warn "randomly initialised": what they
    # build is replaced next by the saved tensors (strictly checked); referenced files load as usual.
    with building_saved_model():
        model = model_class(config, catalog=catalog)
    load_weights(model, d)
    freeze(model)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(torch.device(device) if isinstance(device, str) else device)
    return model


def check_state(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """One :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} expected {tuple(expected[k].shape)} found {tuple(got[k].shape)}"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

    problems = []
    if shapes:
        problems.append(f"shape mismatch: {names(shapes)}")
    if missing:
        problems.append(f"missing keys: {names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {names(unexpected)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))
