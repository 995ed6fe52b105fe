"""Reporting helpers shared by the metric modules."""

from __future__ import annotations

from typing import Any

__all__ = ["unavailable", "is_available"]


def unavailable(reason: str) -> dict[str, Any]:
    """The value reported for a metric that cannot be computed here."""
    return {"available": False, "reason": reason}


def is_available(value: Any) -> bool:
    """False for an :func:`unavailable` report."""
    return not (isinstance(value, dict) and value.get("available") is False)
