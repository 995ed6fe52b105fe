"""Helpers shared by the built-in modality readers."""

from __future__ import annotations

from pathlib import Path


def resolve(root: Path, data_dir: str, ref: str) -> Path:
    """``root / data_dir / ref``; an absolute ``ref`` or ``data_dir`` wins, as pathlib does."""
    base = Path(root) / data_dir if data_dir else Path(root)
    return base / ref


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (what error messages embed)."""
    return " ".join(str(exc).split()) or type(exc).__name__
