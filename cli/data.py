"""``medtvt data``: write the synthetic cohort, validate a dataset."""

from __future__ import annotations

from typing import Any

import click
import yaml

from medtvt_core.data.check import check_dataset
from medtvt_core.data.synth import synthesize
from medtvt_core.data.synth.options import SynthConfig, parse_joint_diseases
from medtvt_core.errors import ConfigError, DataError

from .common import _Group


@click.group("data", cls=_Group)
def data_group() -> None:
    """Synthesise or validate datasets (MedTVT-QA + MIMIC formats)."""


def _limit(field: str, kind: str) -> float | None:
    """A bound (``ge``, ``gt``, ``le``, ``lt``) of a :class:`SynthConfig` field: the option's range."""
    return next((getattr(m, kind) for m in SynthConfig.model_fields[field].metadata if hasattr(m, kind)), None)


def _default(field: str) -> object:
    return SynthConfig.model_fields[field].default


def _joint_diseases(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_joint_diseases(value)
    except DataError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@data_group.command("synth")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Directory to write the cohort into.")
# Defaults and ranges are SynthConfig's (the one owner of the cohort's options).
@click.option("--n-patients", default=_default("n_patients"), show_default=True,
              type=click.IntRange(min=_limit("n_patients", "ge")), help="Patients (one stay each).")
@click.option("--seed", default=_default("seed"), show_default=True, type=int, help="Seed: same seed, same files.")
@click.option("--test-fraction", default=_default("test_fraction"), show_default=True,
              type=click.FloatRange(_limit("test_fraction", "gt"), _limit("test_fraction", "lt"), min_open=True,
                                    max_open=True),
              help="Fraction of patients in the test split (patient-disjoint).")
@click.option("--val-patients", default=_default("val_patients"), show_default=True,
              type=click.IntRange(min=_limit("val_patients", "ge")),
              help="Patients of a validation split (qa/disease_val.json), added after the others: the train and "
                   "test splits do not change.")
@click.option("--overwrite", is_flag=True, help="Replace an existing synthetic cohort in --out.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Writer processes (0: by CPU count); the files do not depend on it.")
@click.option("--evidence", default=_default("evidence"), show_default=True,
              type=click.FloatRange(_limit("evidence", "gt"), _limit("evidence", "le"), min_open=True),
              help="Strength of every disease sign (multiplies its deviation from normal; 1 = the default cohort).")
@click.option("--joint-diseases", "joint_diseases", default="none", show_default=True, callback=_joint_diseases,
              metavar="none|all|LIST",
              help="Diseases needing two modalities together: all (Hypertension, Pneumonia, Sepsis), none, or a "
                   "comma list of those; each of their signs then also appears alone in patients without them.")
@click.option("--decoy-rate", default=_default("decoy_rate"), show_default=True,
              type=click.FloatRange(_limit("decoy_rate", "gt"), _limit("decoy_rate", "le"), min_open=True),
              help="For each joint disease and each of its two signs: share of eligible patients without the "
                   "disease that show that sign alone, with another cause in its report.")
def synth_cmd(out: str, n_patients: int, seed: int, test_fraction: float, val_patients: int, overwrite: bool,
              workers: int, evidence: float, joint_diseases: tuple[str, ...], decoy_rate: float) -> None:
    """Write a synthetic cohort with learnable signal in the real on-disk formats."""
    s = synthesize(out, n_patients=n_patients, seed=seed, test_fraction=test_fraction, val_patients=val_patients,
                   overwrite=overwrite, workers=workers, evidence=evidence, joint_diseases=joint_diseases,
                   decoy_rate=decoy_rate)
    prev = ", ".join(f"{d} {n}" for d, n in s.prevalence.items())
    val = f", {s.n_val} validation" if s.n_val else ""
    click.echo(f"wrote {s.n_patients + s.n_val} patients ({s.n_train} train, {s.n_test} test{val}) to {s.root} in "
               f"{s.seconds:.1f} s")
    click.echo(f"prevalence: {prev}")
    if s.joint_diseases:
        dec = "; ".join(f"{d} ({', '.join(f'{m} {n}' for m, n in by.items())})" for d, by in s.decoys.items())
        click.echo(f"joint diseases with decoy signs: {dec}")


def _parse_options(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        mod, dot, opt = key.strip().partition(".")
        if not eq or not dot or not mod or not opt:
            raise ConfigError(f"--option {item!r}: expected MODALITY.KEY=VALUE, e.g. ecg.nan_policy=interpolate")
        out.setdefault(mod, {})[opt] = yaml.safe_load(raw) if raw.strip() else ""
    return out


@data_group.command("check")
@click.option("--root", required=True, type=click.Path(), help="Dataset root (holds qa/ and the inputs).")
@click.option("--modalities", default="ecg,cxr,lab", show_default=True, help="Comma list of modalities to read.")
@click.option("--qa", "qa_files", multiple=True, help="QA file relative to the root (repeatable; default: manifest or qa/*.json).")
@click.option("--option", "options", multiple=True, metavar="MODALITY.KEY=VALUE",
              help="Reader option, e.g. ecg.nan_policy=interpolate (repeatable).")
def check_cmd(root: str, modalities: str, qa_files: tuple[str, ...], options: tuple[str, ...]) -> None:
    """Validate schema, paths, readability, shapes, NaNs and labels; exit 2 if anything is bad."""
    names = [m.strip() for m in modalities.split(",") if m.strip()]
    rep = check_dataset(root, modalities=names, options=_parse_options(options), qa_files=list(qa_files) or None)
    for p in rep.problems:
        click.echo(f"BAD {p}")
    click.echo(rep.summary())
    if not rep.ok:
        raise click.exceptions.Exit(2)
