"""Calls into plugins at run time, in one place.

The GRPO trainer, the evaluation and the contract kit (:mod:`medtvt_core.testing.checks`) score
rewards with :func:`call_rewards`, and the feature cache and the model encode with
:func:`encode_checked`, so a plugin passes the kit exactly when a run can use it.  A plugin that
raises, or returns a value its contract forbids (a NaN reward, a reward outside its declared range,
features of another shape than ``feature_shape``), stops the run with one :class:`PluginError` line
naming the plugin, its distribution and version, and the record: never a NaN in ``metrics.json``.

What a reward receives (keyword arguments, TRL's contract): ``prompts``, ``completions``,
``answer`` (the reference assistant text, tagged ``<think>...</think><answer>A; B</answer>``) and
``ids`` (record ids) everywhere; during RFT also ``completion_ids`` (token ids of each completion)
and ``trainer_state`` (``transformers.TrainerState``).  See docs/plugins.md.
"""

from __future__ import annotations

import importlib.metadata as md
import math
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import PluginError
from .plugins import Catalog, get_catalog

__all__ = ["KIND_NOUN", "DEFAULT_REWARD_RANGE", "EVAL_REWARD_KWARGS", "RFT_REWARD_KWARGS", "dist_version",
           "describe", "find_spec", "reward_range", "call_rewards", "encode_checked", "plugins_in_use"]

#: Singular noun of each registry kind, as messages use it.
KIND_NOUN = {"modalities": "modality", "encoders": "encoder", "fusion": "fusion", "rewards": "reward", "llms": "LLM"}
#: Range of a reward registered without ``range=(lo, hi)``.
DEFAULT_REWARD_RANGE: tuple[float | None, float | None] = (0.0, 1.0)
#: Keyword arguments (besides prompts, completions) a reward receives in evaluation / during RFT.
EVAL_REWARD_KWARGS = ("answer", "ids")
RFT_REWARD_KWARGS = ("answer", "ids", "completion_ids", "trainer_state")


@lru_cache(maxsize=None)
def dist_version(dist: str) -> str:
    """Installed version of distribution ``dist`` ('' when not installed, e.g. a plugin registered by hand)."""
    try:
        return md.version(dist)
    except (md.PackageNotFoundError, ValueError):
        return ""


def describe(spec: Any) -> str:
    """``reward 'answer-count' (medtvt-myplugins 0.1.0)``: kind, name, distribution and version."""
    noun = KIND_NOUN.get(spec.kind, spec.kind)
    dist = spec.dist or "?"
    where = "registered by hand" if dist == "<manual>" else " ".join(x for x in (dist, dist_version(dist)) if x)
    return f"{noun} {spec.name!r} ({where})"


def find_spec(kind: str, obj: Any, name: str | None = None, catalog: Catalog | None = None) -> Any:
    """The registry entry of ``obj`` (a reward function, an encoder class or instance), or None."""
    if catalog is None:
        catalog = get_catalog()
    reg = catalog[kind]
    target = obj if kind == "rewards" or isinstance(obj, type) else type(obj)
    if name is not None and name in reg and reg.spec(name).obj is target:
        return reg.spec(name)
    return next((s for s in reg.specs() if s.obj is target), None)


def reward_range(spec: Any) -> tuple[float | None, float | None]:
    """The ``range=(lo, hi)`` a reward was registered with (``None``: unbounded side), default ``[0, 1]``."""
    r = (spec.extra or {}).get("range", DEFAULT_REWARD_RANGE) if spec is not None else (None, None)
    return (None, None) if r is None else (r[0], r[1])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _fmt_range(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"


def _slice_kwargs(kwargs: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    return {k: ([v[i]] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in kwargs.items()}


def _failing_record(fn: Callable[..., Any], prompts: list[Any], completions: list[Any], kwargs: Mapping[str, Any],
                    ids: Sequence[Any]) -> str:
    """Which record makes ``fn`` raise: rescored one at a time (only after a failure)."""
    n = len(completions)
    for i in range(n):
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1], **_slice_kwargs(kwargs, i, n))
        except Exception:
            return f"on record {ids[i]}"
    return f"on a batch of {n} records ({', '.join(map(str, ids[:3]))}{', ...' if n > 3 else ''})"


def call_rewards(rewards: Sequence[Any], prompts: list[Any], completions: list[Any], *,
                 names: Sequence[str] | None = None, catalog: Catalog | None = None, dtype: torch.dtype = torch.float32,
                 **kwargs: Any) -> torch.Tensor:
    """Score ``completions`` with each reward (a registry :class:`~medtvt_core.registry.PluginSpec` or a
    callable; a callable whose ``names`` entry is a registered reward is checked as that plugin).

    Each is called ``f(prompts=, completions=, **kwargs)``; returns ``[N, F]`` (``dtype``) with NaN for
    ``None`` (undefined, left out of means). A reward that raises, returns other than one number or
    None per completion, or a non-finite value or one outside its declared range raises
    :class:`PluginError` naming it and the record (``kwargs["ids"]``, else the completion's index).
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"call_rewards: {len(prompts)} prompts for {n} completions")
    ids = list(kwargs["ids"]) if kwargs.get("ids") is not None else list(range(n))
    out = torch.full((n, len(rewards)), float("nan"), dtype=dtype)
    for j, r in enumerate(rewards):
        name = names[j] if names else None
        if hasattr(r, "obj") and hasattr(r, "kind"):
            spec, fn = r, r.obj
        else:
            fn = r
            spec = find_spec("rewards", fn, name, catalog) if name is not None else None
        label = describe(spec) if spec is not None else f"reward {name or getattr(fn, '__name__', repr(fn))!r}"
        try:
            vals = fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as exc:
            where = _failing_record(fn, prompts, completions, kwargs, ids)
            raise PluginError(f"{label} raised {type(exc).__name__}: {_one_line(exc)} {where}") from exc
        try:
            count = len(vals)
        except TypeError:
            count = None
        if count != n:
            raise PluginError(f"{label} returned {'no' if count is None else count} values for {n} completions "
                              f"(a {type(vals).__name__}); expected a list with one float or None per completion")
        lo, hi = reward_range(spec)
        for i, v in enumerate(vals):
            if v is None:
                continue
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                f = float(v)
            except (TypeError, ValueError):
                raise PluginError(f"{label} returned {type(v).__name__} {v!r} for record {ids[i]}; "
                                  "expected a float or None") from None
            if not math.isfinite(f) or (lo is not None and f < lo) or (hi is not None and f > hi):
                raise PluginError(f"{label} returned {f!r} for record {ids[i]}; rewards must be finite and in its "
                                  f"declared range {_fmt_range(lo, hi)} (register(..., range=(lo, hi))), or None")
            out[i, j] = f
    return out


def encode_checked(encoder: Any, x: torch.Tensor, *, refs: Sequence[str] | None = None, catalog: Catalog | None = None) -> torch.Tensor:
    """``encoder.encode(x)`` (no grad), checked: ``[B, *feature_shape]``, finite; else one :class:`PluginError`
    naming the encoder and the inputs (``refs``)."""
    def label() -> str:
        spec = find_spec("encoders", encoder, catalog=catalog)
        return describe(spec) if spec is not None else f"encoder {type(encoder).__name__} ({type(encoder).__module__})"

    def inputs() -> str:
        if not refs:
            return f"a batch of {x.shape[0]} inputs"
        return f"input {refs[0]}" if len(refs) == 1 else f"a batch of {len(refs)} inputs ({refs[0]}, ...)"

    try:
        with torch.no_grad():
            out = encoder.encode(x)
    except Exception as exc:
        raise PluginError(f"{label()} raised {type(exc).__name__}: {_one_line(exc)} on {inputs()}") from exc
    want = (x.shape[0], *tuple(encoder.feature_shape))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginError(f"{label()}: encode() returned {got} for {inputs()}, but its feature_shape "
                          f"{tuple(encoder.feature_shape)} promises {want}")
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise PluginError(f"{label()}: encode() returned {bad} non-finite value(s) on {inputs()}")
    return out


def plugins_in_use(cfg: Any, catalog: Catalog | None = None) -> list[dict[str, Any]]:
    """Every plugin a run configuration uses, with its distribution and version (for metrics.json/report.md)."""
    if catalog is None:
        catalog = get_catalog()
    rows: list[tuple[str, str, str]] = [("modalities", "modality", m) for m in cfg.modalities]
    rows += [("encoders", f"encoder of {m}", cfg.encoders[m].name) for m in cfg.modalities]
    rows += [("fusion", "fusion", cfg.fusion.name), ("llms", "LLM", cfg.llm.name)]
    rows += [("rewards", "reward", r.name) for r in cfg.rewards]
    out = []
    for kind, role, name in rows:
        spec = catalog[kind].spec(name) if name in catalog[kind] else None
        dist = spec.dist if spec is not None else "?"
        out.append({"kind": KIND_NOUN[kind], "role": role, "name": name, "distribution": dist,
                    "version": dist_version(dist) if spec is not None else ""})
    return out
