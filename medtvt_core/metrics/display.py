"""Printing clinical-efficacy numbers that may be undefined.

A metric is ``None`` where it is undefined, e.g. the reference protocol's precision, recall and F1
when no report holds an ``<answer>`` block (it averages over the reports that do, and a PT stage
writes none), or an AUC when the truth holds one class only. Everything that prints or writes a
metric shows such a value as ``n/a`` with the reason (:func:`fmt_metric`, :func:`undefined_reasons`),
never a number and never a crash.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["undefined_reason", "undefined_reasons", "fmt_metric", "ce_line"]

_NO_BLOCK = "no report and its reference both hold an <answer> block (the reference protocol averages over those)"
_ONE_CLASS = "the truth holds one class only"
_CE_KEYS = ("f1", "precision", "recall", "auc")


def _undefined(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, dict) and v.get("available") is False)


def undefined_reason(ce: Mapping[str, Any], key: str) -> str | None:
    """Why ``ce[key]`` is undefined (``None`` when it is a number)."""
    v = ce.get(key)
    if not _undefined(v):
        return None
    if isinstance(v, dict):
        return str(v.get("reason", "unavailable"))
    if ce.get("n_averaged") == 0:
        return _NO_BLOCK
    if key == "auc":
        return _ONE_CLASS
    return "undefined on these reports"


def undefined_reasons(ce: Mapping[str, Any], keys: tuple[str, ...] = _CE_KEYS) -> dict[str, str]:
    """``{metric: reason}`` for each undefined metric of ``keys`` in a clinical-efficacy result."""
    return {k: r for k in keys if k in ce and (r := undefined_reason(ce, k)) is not None}


def fmt_metric(ce: Mapping[str, Any], key: str, nd: int = 4) -> str:
    """``ce[key]`` with ``nd`` decimals, or ``n/a (reason)``."""
    why = undefined_reason(ce, key)
    return f"n/a ({why})" if why is not None else f"{ce[key]:.{nd}f}"


def ce_line(ce: Mapping[str, Any], protocol: str | None = None) -> str:
    """``F1 x precision x recall x AUC x (<protocol> protocol)`` for a log line; undefined values as
    ``n/a``, their reasons once at the end."""
    names = {"f1": "F1", "precision": "precision", "recall": "recall", "auc": "AUC"}
    why = undefined_reasons(ce)
    parts = [f"{names[k]} " + ("n/a" if k in why else f"{ce[k]:.4f}") for k in _CE_KEYS]
    notes = ([f"{protocol} protocol"] if protocol else []) + [f"n/a: {r}" for r in dict.fromkeys(why.values())]
    return " ".join(parts) + (f" ({'; '.join(notes)})" if notes else "")
