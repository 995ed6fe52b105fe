"""Contract checks per plugin kind. Each check returns a list of problems (empty = pass), one line each,
naming the plugin.

The kit calls plugins as runs do: rewards through :func:`medtvt_core.plugin_calls.call_rewards` with
the keyword arguments of evaluation and of RFT (never a column a run does not pass), encoders through
the same shape checks as the feature cache. Plugins whose defaults are expensive (full-size networks,
real weights) declare ``contract_options: ClassVar[dict]`` with small, offline options; the kit builds
them with those *and* with their default options (what a run without options gets), unless a config
field has no default. An import slower than :data:`IMPORT_WARN_S` is a warning
(:class:`PluginImportTimeWarning`), not a failure.
"""

from __future__ import annotations

import inspect
import time
import warnings
from typing import Any, Callable

import torch
from pydantic import BaseModel

from ..contracts import Encoder, Fusion, LLMBackbone, ModalityReader
from ..errors import PluginError
from ..plugin_calls import call_rewards, describe, encode_checked
from ..registry import PluginSpec

Check = Callable[[PluginSpec[Any]], list[str]]

#: Seconds a plugin's entry point may take to import before the kit warns: every ``medtvt`` command
#: (``--help`` too) imports every installed plugin, so import-time work slows them all.
IMPORT_WARN_S = 0.5


class PluginImportTimeWarning(UserWarning):
    """A plugin module took longer than :data:`IMPORT_WARN_S` to import."""


def _config_problems(spec: PluginSpec[Any]) -> list[str]:
    model = spec.config or getattr(spec.obj, "config_class", None)
    if model is None:
        return [f"{spec.name}: no config model (register(..., config=Model) or a config_class attribute)"]
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return [f"{spec.name}: config {model!r} is not a pydantic model"]
    out = []
    if model.model_config.get("extra") != "forbid":
        out.append(f"{spec.name}: config {model.__name__} must set extra='forbid' (unknown keys must be errors)")
    for fname, field in model.model_fields.items():
        if not field.description:
            out.append(f"{spec.name}: config field {fname!r} has no description")
    try:
        model.model_validate({"__no_such_option__": 1})
        out.append(f"{spec.name}: config {model.__name__} accepted an unknown key")
    except Exception:
        pass
    return out


def _options(spec: PluginSpec[Any], contract: bool = True) -> dict[str, Any]:
    """Validated options: ``contract_options`` (``contract``) or the config model's defaults."""
    model = spec.config or spec.obj.config_class
    opts = dict(getattr(spec.obj, "contract_options", {}) or {}) if contract else {}
    return model.model_validate(opts).model_dump()


def _option_sets(spec: PluginSpec[Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[("contract options", ...), ("default options", ...)]``; the defaults only when they differ and
    every config field has a default (a required field, e.g. a weights path, cannot be guessed)."""
    sets = [("contract options", _options(spec))]
    model = spec.config or getattr(spec.obj, "config_class", None)
    if model is not None and all(not f.is_required() for f in model.model_fields.values()):
        default = _options(spec, contract=False)
        if default != sets[0][1]:
            sets.append(("default options", default))
    return sets


def _build(spec: PluginSpec[Any], *args: Any, options: dict[str, Any] | None = None) -> Any:
    return spec.obj(*args, **(_options(spec) if options is None else options))


def plugin_import(spec: PluginSpec[Any]) -> list[str]:
    """Warn (not fail) when the plugin's entry point took longer than IMPORT_WARN_S to import."""
    if spec.import_s is not None and spec.import_s > IMPORT_WARN_S:
        warnings.warn(PluginImportTimeWarning(
            f"{describe(spec)}: its module {spec.plugin!r} took {spec.import_s:.2f} s to import (bound "
            f"{IMPORT_WARN_S} s); every medtvt command imports it: move heavy work (weights, data, big imports) "
            f"into the functions that need it"), stacklevel=2)
    return []


# ----------------------------------------------------------------------------- modalities
def modality_attributes(spec: PluginSpec[Any]) -> list[str]:
    cls = spec.obj
    out: list[str] = []
    if not (isinstance(cls, type) and issubclass(cls, ModalityReader)):
        return [f"{spec.name}: {cls!r} is not a subclass of medtvt_core.contracts.ModalityReader"]
    if getattr(cls, "name", None) != spec.name:
        out.append(f"{spec.name}: class attribute name={getattr(cls, 'name', None)!r} differs from the registered name")
    ph = getattr(cls, "placeholder", "")
    if not (isinstance(ph, str) and ph.startswith("<") and ph.endswith(">") and len(ph) > 2 and " " not in ph):
        out.append(f"{spec.name}: placeholder {ph!r} must look like '<name>'")
    if not isinstance(getattr(cls, "record_field", None), str):
        out.append(f"{spec.name}: record_field must name the QA-record key holding the reference")
    return out + _config_problems(spec)


def modality_build(spec: PluginSpec[Any]) -> list[str]:
    out = []
    for label, opts in _option_sets(spec):
        try:
            mod = _build(spec, options=opts)
        except Exception as exc:
            out.append(f"{spec.name}: cannot be built with its {label}: {type(exc).__name__}: {exc}")
            continue
        shape = mod.sample_shape
        if not (isinstance(shape, tuple) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
            out.append(f"{spec.name}: with its {label}, sample_shape must be a tuple of positive ints, got "
                       f"{shape!r} ({type(shape).__name__})")
    return out


# ----------------------------------------------------------------------------- encoders
def encoder_attributes(spec: PluginSpec[Any]) -> list[str]:
    cls = spec.obj
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        return [f"{spec.name}: {cls!r} is not a subclass of medtvt_core.contracts.Encoder"]
    out = []
    if not isinstance(getattr(cls, "modality", None), str):
        out.append(f"{spec.name}: class attribute 'modality' (the modality it reads) is missing")
    return out + _config_problems(spec)


def encoder_shapes(spec: PluginSpec[Any]) -> list[str]:
    out: list[str] = []
    for i, (label, opts) in enumerate(_option_sets(spec)):
        meta = _meta_feature_shape(spec, opts) if i else None
        if meta is not None:  # shapes only, without the cost of a full-size random init
            if meta[0] != meta[1]:
                out.append(f"{spec.name}: with its {label}, encode() gave (1, {meta[0][0]}, {meta[0][1]}) per sample "
                           f"but feature_shape is {meta[1]}, expected (1, {meta[1][0]}, {meta[1][1]}) (the feature "
                           f"cache and the projector are sized by feature_shape)")
            continue
        out += _encoder_shapes(spec, label, opts, batch=2 if i == 0 else 1)
    return out


def _meta_feature_shape(spec: PluginSpec[Any], opts: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(encode()'s per-sample shape, feature_shape)`` with the encoder built on the meta device (no
    memory, no compute); None when the plugin cannot run there (then it is built for real)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = _build(spec, options=opts)
            feats = enc.encode(torch.empty(1, *enc.input_shape))
        return tuple(feats.shape[1:]), tuple(enc.feature_shape)
    except Exception:
        return None


def _encoder_shapes(spec: PluginSpec[Any], label: str, opts: dict[str, Any], batch: int) -> list[str]:
    try:
        enc: Encoder = _build(spec, options=opts)
    except Exception as exc:
        return [f"{spec.name}: cannot be built with its {label}: {type(exc).__name__}: {exc}"]
    w = "" if label == "contract options" else f"with its {label}, "
    out = []
    enc.freeze_backbone()
    enc.eval()
    x = enc.example_input(batch)
    if tuple(x.shape[1:]) != tuple(enc.input_shape):
        out.append(f"{spec.name}: {w}example_input shape {tuple(x.shape)} does not match input_shape {enc.input_shape}")
    feats = enc.encode(x)
    n, c = enc.feature_shape
    if tuple(feats.shape) != (batch, n, c):
        out.append(f"{spec.name}: {w}encode() gave {tuple(feats.shape)}, expected ({batch}, {n}, {c}) from feature_shape"
                   f" (the feature cache and the projector are sized by feature_shape)")
        return out
    if feats.dtype != torch.float32:
        out.append(f"{spec.name}: {w}encode() dtype {feats.dtype}, expected float32")
    if feats.requires_grad:
        out.append(f"{spec.name}: {w}encode() output requires grad; the backbone must be frozen (no_grad)")
    if not torch.isfinite(feats).all():
        out.append(f"{spec.name}: {w}encode() gave {int((~torch.isfinite(feats)).sum())} non-finite value(s)")
    pooled = enc.pool(feats)
    if tuple(pooled.shape) != (batch, enc.num_tokens, enc.pooled_dim):
        out.append(f"{spec.name}: {w}pool() gave {tuple(pooled.shape)}, expected ({batch}, {enc.num_tokens}, {enc.pooled_dim})")
    if not torch.isfinite(pooled).all():
        out.append(f"{spec.name}: {w}pool() output has non-finite values")
    if batch > 1:
        # Each sample's features must not depend on the rest of the batch (caching encodes one by one).
        one = enc.encode(x[:1])
        if one.shape == feats[:1].shape and not torch.allclose(one, feats[:1], atol=1e-4, rtol=1e-4):
            out.append(f"{spec.name}: encode() of a sample depends on the other samples of the batch")
        # The check the feature cache makes on every batch (plugin_calls.encode_checked).
        try:
            encode_checked(enc, x)
        except PluginError as err:
            out.append(f"{spec.name}: {err}")
    return out


def encoder_training(spec: PluginSpec[Any]) -> list[str]:
    try:
        enc: Encoder = _build(spec)
    except Exception as exc:
        return [f"{spec.name}: cannot be built: {type(exc).__name__}: {exc}"]
    out = []
    enc.freeze_backbone()
    enc.train()
    if any(p.requires_grad for p in enc.backbone_parameters()):
        out.append(f"{spec.name}: backbone parameters still require grad after freeze_backbone()")
    x = enc.example_input(2)
    y = enc(x)
    head = enc.head_parameters()
    if head:
        y.float().pow(2).mean().backward()
        missing = [i for i, p in enumerate(head) if p.grad is None]
        if missing:
            out.append(f"{spec.name}: {len(missing)} head parameter(s) got no gradient")
    if any(p.grad is not None for p in enc.backbone_parameters()):
        out.append(f"{spec.name}: gradient reached the frozen backbone")
    ident = enc.identity()
    if ident != enc.identity():
        out.append(f"{spec.name}: identity() is not stable")
    with torch.no_grad():
        p = next(iter(enc.backbone_parameters()), None)
        if p is not None:
            p.add_(1.0)
            if enc.identity() == ident:
                out.append(f"{spec.name}: identity() does not change when backbone weights change (cache would go stale)")
    return out


# ----------------------------------------------------------------------------- fusion
def fusion_attributes(spec: PluginSpec[Any]) -> list[str]:
    cls = spec.obj
    if not (isinstance(cls, type) and issubclass(cls, Fusion)):
        return [f"{spec.name}: {cls!r} is not a subclass of medtvt_core.contracts.Fusion"]
    return _config_problems(spec)


def fusion_masking(spec: PluginSpec[Any]) -> list[str]:
    out = []
    for m, k in ((1, 1), (3, 1), (3, 2), (4, 1)):
        torch.manual_seed(0)
        try:
            fus: Fusion = _build(spec, 32, m)
        except Exception as exc:
            return [f"{spec.name}: cannot be built with dim=32, num_modalities={m}: {type(exc).__name__}: {exc}"]
        fus.eval()
        tokens = torch.randn(3, m, k, 32)
        mask = torch.ones(3, m, dtype=torch.bool)
        if m > 1:
            mask[1, 0] = False
            mask[2, m - 1] = False
        res = fus(tokens, mask)
        if tuple(res.tokens.shape) != tuple(tokens.shape):
            out.append(f"{spec.name}: M={m} K={k}: output shape {tuple(res.tokens.shape)} != input {tuple(tokens.shape)}")
            continue
        if not torch.isfinite(res.tokens).all():
            out.append(f"{spec.name}: M={m} K={k}: non-finite output")
        if res.weights is not None:
            if tuple(res.weights.shape) != (3, m):
                out.append(f"{spec.name}: weights shape {tuple(res.weights.shape)} != (B, M) = (3, {m})")
            elif (res.weights[~mask] != 0).any():
                out.append(f"{spec.name}: a masked modality got a non-zero weight")
        if (res.tokens[~mask] != 0).any():
            out.append(f"{spec.name}: M={m} K={k}: output tokens of a masked modality are not zero")
        changed = tokens.clone()
        changed[~mask] = torch.randn_like(changed[~mask]) * 10
        res2 = fus(changed, mask)
        if not torch.allclose(res.tokens, res2.tokens, atol=1e-5):
            out.append(f"{spec.name}: M={m} K={k}: changing a masked modality's tokens changed the output")
    return out


def fusion_gradients(spec: PluginSpec[Any]) -> list[str]:
    torch.manual_seed(0)
    fus: Fusion = _build(spec, 32, 3)
    fus.train()
    tokens = torch.randn(2, 3, 1, 32, requires_grad=True)
    res = fus(tokens, torch.ones(2, 3, dtype=torch.bool))
    res.tokens.pow(2).mean().backward()
    out = []
    if tokens.grad is None or not torch.isfinite(tokens.grad).all():
        out.append(f"{spec.name}: no finite gradient reaches the input tokens")
    dead = [n for n, p in fus.named_parameters() if p.requires_grad and p.grad is None]
    if dead:
        out.append(f"{spec.name}: parameters without gradient: {', '.join(dead[:5])}")
    return out


# ----------------------------------------------------------------------------- rewards
def reward_signature(spec: PluginSpec[Any]) -> list[str]:
    fn = spec.obj
    if not callable(fn):
        return [f"{spec.name}: reward {fn!r} is not callable"]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    params = sig.parameters
    out = []
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        out.append(f"{spec.name}: reward must accept **kwargs (TRL passes dataset columns and extras)")
    if "completions" not in params:
        # TRL passes prompts/completions by keyword; prompts may be swallowed by **kwargs.
        out.append(f"{spec.name}: reward must take a parameter named 'completions' (TRL's contract)")
    return out


def reward_values(spec: PluginSpec[Any]) -> list[str]:
    """Edge-case and ordinary completions, scored as evaluation and as RFT score them (the same
    function and keyword arguments: plugin_calls.call_rewards); values finite and in the declared range."""
    from transformers import TrainerState

    answer = "<think> irregular rhythm </think><answer> Atrial Fibrillation </answer>"
    completions = [
        "<think> irregular rhythm </think><answer> Atrial Fibrillation </answer>",
        "no tags at all",
        "<answer> A </answer><answer> B </answer>",
        "",
        "x" * 200_000,
        [{"role": "assistant", "content": "<think> t </think><answer> Sepsis; Unknown Thing </answer>"}],
        "<think> crackles, fever </think><answer> Pneumonia; Sepsis </answer>",
        "<think> t </think><answer></answer>",
    ]
    answers = [answer] * 6 + ["<think> r </think><answer> Pneumonia; Sepsis </answer>", "<think> r </think><answer></answer>"]
    n = len(completions)
    prompts = ["<ecg> <cxr> <lab> Which diseases does the patient have?"] * n
    ids = [f"contract-{i}" for i in range(n)]
    common = dict(answer=answers, ids=ids)
    forms = {"evaluation": common,
             "RFT": {**common, "completion_ids": [[1, 2, 3]] * n, "trainer_state": TrainerState()}}
    out = []
    for form, kwargs in forms.items():
        t0 = time.perf_counter()
        try:
            call_rewards([spec], prompts, completions, **kwargs)
        except PluginError as err:
            out.append(f"{spec.name}: scored as in {form} (keyword arguments {', '.join(['prompts', 'completions', *kwargs])}): {err}")
            continue
        dt = time.perf_counter() - t0
        if dt > 0.5:
            out.append(f"{spec.name}: scoring {n} edge-case completions took {dt:.3f}s (> 0.5 s)")
    return out


# ----------------------------------------------------------------------------- LLMs
def llm_attributes(spec: PluginSpec[Any]) -> list[str]:
    cls = spec.obj
    if not (isinstance(cls, type) and issubclass(cls, LLMBackbone)):
        return [f"{spec.name}: {cls!r} is not a subclass of medtvt_core.contracts.LLMBackbone"]
    return _config_problems(spec)


def llm_build(spec: PluginSpec[Any]) -> list[str]:
    placeholders = ["<ecg>", "<cxr>", "<lab>"]
    try:
        backbone: LLMBackbone = _build(spec)
        corpus = lambda: ["the heart rate is regular", "white cells are raised", "no acute disease"] * 20  # noqa: E731
        tok = backbone.load_tokenizer(corpus)
        tok.add_special_tokens({"extra_special_tokens": placeholders}, replace_extra_special_tokens=False)
        text_config = backbone.text_config(tok)
        model = backbone.build_model(text_config)
    except Exception as exc:
        return [f"{spec.name}: building with contract options failed: {type(exc).__name__}: {exc}"]
    out = []
    for ph in placeholders:
        ids = tok(ph, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            out.append(f"{spec.name}: placeholder {ph} is not a single token ({ids}) after add_special_tokens")
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < len(tok):
        out.append(f"{spec.name}: embedding has {emb.weight.shape[0]} rows for {len(tok)} tokens")
    if emb.embedding_dim != backbone.hidden_size:
        out.append(f"{spec.name}: hidden_size {backbone.hidden_size} != embedding width {emb.embedding_dim}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not any("lora" in n for n in trainable):
        out.append(f"{spec.name}: no trainable LoRA parameters after build_model()")
    ids = torch.tensor([tok("the heart rate", add_special_tokens=False)["input_ids"]])
    logits = model(input_ids=ids).logits
    if logits.shape[:2] != ids.shape:
        out.append(f"{spec.name}: logits shape {tuple(logits.shape)} does not match input {tuple(ids.shape)}")
    again = backbone.build_model(text_config)
    state, state2 = model.state_dict(), again.state_dict()
    if any(not torch.equal(state[k], state2[k]) for k in state if "lora_" not in k):
        out.append(f"{spec.name}: build_model() twice gives different base weights; a saved model could not "
                   "reference them (make the random init seeded)")
    return out


CHECKS: dict[str, dict[str, Check]] = {
    "modalities": {"attributes": modality_attributes, "import": plugin_import, "build": modality_build},
    "encoders": {"attributes": encoder_attributes, "import": plugin_import, "shapes": encoder_shapes,
                 "training": encoder_training},
    "fusion": {"attributes": fusion_attributes, "import": plugin_import, "masking": fusion_masking,
               "gradients": fusion_gradients},
    "rewards": {"signature": reward_signature, "import": plugin_import, "values": reward_values},
    "llms": {"attributes": llm_attributes, "import": plugin_import, "build": llm_build},
}


def check_plugin(spec: PluginSpec[Any], only: str | None = None) -> list[str]:
    """Run every check of ``spec.kind`` (or only one) and collect the problems."""
    problems: list[str] = []
    for name, fn in CHECKS[spec.kind].items():
        if only and name != only:
            continue
        try:
            problems.extend(fn(spec))
        except Exception as exc:  # a crash inside a plugin is a contract failure, not a kit bug
            problems.append(f"{spec.name}: check {name!r} crashed: {type(exc).__name__}: {exc}")
        if problems and name == "attributes":
            break  # later checks assume the basic shape of the plugin
    return problems
