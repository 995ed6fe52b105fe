"""The 7 disease categories of MedTVT-R1, their ICD-10 groups, and the ``<answer>`` format."""

from __future__ import annotations

import re
from typing import Iterable

#: Canonical category names, in the order answers list them.
DISEASES: tuple[str, ...] = (
    "Coronary Artery Disease",
    "Acute Renal Failure",
    "Hypertension",
    "Atrial Fibrillation",
    "Pneumonia",
    "Diabetes Mellitus",
    "Sepsis",
)

#: ICD-10 code prefixes (dots removed) of each category (docs/method.md, "Diseases").
ICD10_PREFIXES: dict[str, tuple[str, ...]] = {
    "Coronary Artery Disease": ("I25",),
    "Acute Renal Failure": ("N17",),
    "Hypertension": ("I10", "I11", "I12", "I13", "I14", "I15"),
    "Atrial Fibrillation": ("I48",),
    "Pneumonia": ("J18",),
    "Diabetes Mellitus": ("E10", "E11", "E12", "E13", "E14"),
    "Sepsis": ("A40", "A41", "R652"),
}

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def icd10_category(code: str) -> str | None:
    """Category of an ICD-10 code (``"I48.91"`` or ``"I4891"``); None when it is in none of the 7."""
    c = code.replace(".", "").strip().upper()
    for name, prefixes in ICD10_PREFIXES.items():
        if c.startswith(prefixes):
            return name
    return None


def parse_answer(text: str) -> list[str] | None:
    """Labels inside the last ``<answer> ... </answer>``: split on ``;``, stripped, empties dropped.

    None when the text has no ``<answer>`` block.
    """
    found = _ANSWER.findall(text)
    if not found:
        return None
    return [s.strip() for s in found[-1].split(";") if s.strip()]


def format_answer(labels: Iterable[str]) -> str:
    """``<answer> A; B </answer>`` with the labels in :data:`DISEASES` order (unknown ones last)."""
    order = {d: i for i, d in enumerate(DISEASES)}
    ls = sorted(set(labels), key=lambda x: (order.get(x, len(order)), x))
    return f"<answer> {'; '.join(ls)} </answer>"


def unknown_labels(labels: Iterable[str]) -> list[str]:
    """Labels that are not canonical category names (exact, case-sensitive match)."""
    return [x for x in labels if x not in DISEASES]
