"""The synthetic cohort's options: the one owner of their defaults, bounds and parsing.

The run configuration's ``data.synth``, ``medtvt data synth`` and :func:`~medtvt_core.data.synth.synthesize`
all take them from :class:`SynthConfig` (the module docstring of :mod:`medtvt_core.data.synth` says
what each option does to the cohort). Light on purpose: the configuration and the CLI import it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ...errors import DataError
from ..labels import DISEASES

__all__ = ["DEFAULT_DECOY_RATE", "JOINT_CAPABLE", "MAX_EVIDENCE", "SynthConfig", "parse_joint_diseases",
           "synth_options"]

_CAD, _ARF, HTN, _AF, PNA, _DM, SEPSIS = DISEASES
#: Diseases that can be made joint (evidence in two modalities), in the order decoys are drawn.
JOINT_CAPABLE: tuple[str, ...] = (HTN, SEPSIS, PNA)
DEFAULT_DECOY_RATE = 0.3
MAX_EVIDENCE = 2.0
_ALIASES = {"htn": HTN, "pna": PNA, "sepsis": SEPSIS}


def parse_joint_diseases(spec: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"none"``/``""``/None -> (), ``"all"`` -> the joint-capable diseases, else a comma list (or a
    sequence) of their names (case-insensitive; aliases htn, pna, sepsis); returned in ``DISEASES`` order."""
    if spec is None:
        return ()
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else [str(x).strip() for x in spec]
    items = [x for x in items if x]
    if [x.lower() for x in items] in ([], ["none"]):
        return ()
    if [x.lower() for x in items] == ["all"]:
        return tuple(d for d in DISEASES if d in JOINT_CAPABLE)
    by_name = {d.lower(): d for d in JOINT_CAPABLE} | _ALIASES
    got = set()
    for x in items:
        if x.lower() not in by_name:
            names = ", ".join(d for d in DISEASES if d in JOINT_CAPABLE)
            raise DataError(f"joint disease {x!r}: allowed: all, none, or a comma list of {names} "
                            "(the diseases with evidence in two modalities)")
        got.add(by_name[x.lower()])
    return tuple(d for d in DISEASES if d in got)


class SynthConfig(BaseModel):
    """Options of the synthetic cohort (``data.synth`` of a run; ``medtvt data synth``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_patients: int = Field(240, ge=4, description="patients in the synthetic cohort (at least 4: train and test splits)")
    seed: int = Field(0, description="seed of the synthetic cohort")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of patients in the test split")
    evidence: float = Field(1.0, gt=0, le=MAX_EVIDENCE,
                            description="strength multiplier of every disease sign (1: the default cohort)")
    joint_diseases: list[str] = Field(
        default_factory=list, description="diseases whose evidence needs two modalities together (each sign alone "
                                          "also occurs, with another cause): names among Hypertension, Pneumonia, "
                                          "Sepsis, or ['all']; [] = none")
    val_patients: int = Field(0, ge=0, description="patients of a validation split (qa/disease_val.json), written "
                                                   "after the n_patients from streams of their own, so the train and "
                                                   "test splits are the same with or without them; no QA for PT")
    decoy_rate: float = Field(DEFAULT_DECOY_RATE, gt=0, le=0.5,
                              description="share of patients without a joint disease who show one of its signs alone")

    @field_validator("joint_diseases", mode="before")
    @classmethod
    def _joint(cls, v: Any) -> list[str]:
        try:
            return list(parse_joint_diseases(v))
        except DataError as exc:
            raise ValueError(str(exc)) from None

    def generator_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`medtvt_core.data.synth.ensure_synthetic`."""
        d = self.model_dump()
        d["joint_diseases"] = tuple(d["joint_diseases"])
        return d


def synth_options(**options: Any) -> SynthConfig:
    """``options`` validated; a bad one is a one-line :class:`DataError` naming it and what is allowed."""
    try:
        return SynthConfig(**options)
    except ValidationError as err:
        e = err.errors()[0]
        name = ".".join(str(x) for x in e["loc"])
        raise DataError(f"synthetic cohort: {name} {options.get(name)!r}: {e['msg']}") from None
