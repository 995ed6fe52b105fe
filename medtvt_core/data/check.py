"""Validate a dataset: schema, references, readability, shapes, finiteness, label names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..build import build_readers
from ..errors import DataError, MedtvtError
from ..plugins import Catalog
from .dataset import all_finite, registered_modalities
from .labels import DISEASES, parse_answer, unknown_labels
from .manifest import prepare_stats, read_manifest
from .schema import QARecord, read_qa_file


@dataclass
class CheckReport:
    """Problems found (one line each) and what was checked."""

    problems: list[str] = field(default_factory=list)
    files: int = 0
    records: int = 0
    inputs: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        per = ", ".join(f"{m} {n}" for m, n in self.inputs.items())
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return f"checked {self.files} QA file(s), {self.records} record(s), {sum(self.inputs.values())} input(s) ({per}): {verdict}"


def _qa_files(root: Path, manifest: Mapping[str, Any] | None) -> tuple[list[str], set[str], list[str]]:
    """QA files to check, those holding disease answers, and those forming the training split."""
    if manifest and isinstance(manifest.get("qa"), dict):
        qa = manifest["qa"]
        pt = [str(f) for f in qa.get("pt", [])]
        train = [str(qa["train"])] if qa.get("train") else []
        held = [str(qa[k]) for k in ("test", "val") if qa.get(k)]  # evaluation and validation splits
        return pt + train + held, set(train + held), pt + train
    files = sorted(str(p.relative_to(root)) for p in (root / "qa").glob("*.json")) if (root / "qa").is_dir() else []
    disease = {f for f in files if "disease" in Path(f).name}
    return files, disease, [f for f in files if not _held_out(f)]


def _held_out(file: str) -> bool:
    """Whether a QA file named without a manifest is an evaluation or validation split (not training data)."""
    return "test" in Path(file).name or "val" in Path(file).stem.split("_")


def check_dataset(root: str | Path, *, modalities: Sequence[str] = ("ecg", "cxr", "lab"),
                  options: Mapping[str, Mapping[str, Any]] | None = None, qa_files: Sequence[str] | None = None,
                  catalog: Catalog | None = None) -> CheckReport:
    """Check every QA record and every input it references; never raises for data problems."""
    root = Path(root)
    rep = CheckReport()
    if not root.is_dir():
        rep.problems.append(f"{root}: dataset root does not exist")
        return rep
    try:
        manifest = read_manifest(root)
    except DataError as err:
        rep.problems.append(str(err))
        manifest = None
    files, disease_files, train_files = _qa_files(root, manifest)
    if qa_files:
        files = list(qa_files)
        disease_files = {f for f in files if "disease" in Path(f).name}
        train_files = [f for f in files if not _held_out(f)]
    if not files:
        rep.problems.append(f"{root}: no QA files (none listed in the manifest, none under qa/)")
        return rep
    mods = build_readers(list(modalities), options, catalog)
    known = {**registered_modalities(catalog), **{n: type(m) for n, m in mods.items()}}
    schema_mods = list(known.values())

    by_file: dict[str, list[QARecord]] = {}
    for f in files:
        try:
            recs, problems = read_qa_file(root / f, schema_mods, label=f, collect=True)
        except DataError as err:
            rep.problems.append(str(err))
            continue
        rep.files += 1
        rep.records += len(recs) + len({(p.index) for p in problems if p.index is not None})
        rep.problems.extend(str(p) for p in problems)
        for r in recs:
            labels = parse_answer(r.answer)
            if labels is None and f in disease_files:
                # The reference's Jaccard reward scores such a record 0.0 whatever the model
                # writes, and its metrics leave it out of clinical efficacy: say so up front.
                rep.problems.append(
                    f"{r.where}: field 'messages[1].content': disease-level answer has no <answer> ... </answer> "
                    f"block (reward 'jaccard' is 0.0 for any completion); allowed: text ending in '<answer> A; B </answer>' "
                    f"with names from {', '.join(DISEASES)}")
            elif labels is not None and (bad := unknown_labels(labels)):
                rep.problems.append(f"{r.where}: field 'messages[1].content': unknown disease label(s) "
                                    f"{', '.join(map(repr, bad))}; allowed: {', '.join(DISEASES)}")
        by_file[f] = recs

    train_recs = [r for f in train_files for r in by_file.get(f, [])] or [r for rs in by_file.values() for r in rs]
    try:
        prepare_stats(root, mods, train_recs, persist=False)
    except MedtvtError as err:
        rep.problems.append(f"training statistics: {err}")

    # Each input is read once, however many records use it; identical errors are reported once.
    uses: dict[tuple[str, str], list[QARecord]] = {}
    for recs in by_file.values():
        for r in recs:
            for name, mod in mods.items():
                ref = r.ref(mod.record_field)
                if ref is not None:
                    uses.setdefault((name, ref), []).append(r)
    seen_errors: dict[str, int] = {}
    for (name, ref), recs in uses.items():
        mod = mods[name]
        rep.inputs[name] = rep.inputs.get(name, 0) + 1
        try:
            x = mod.load(ref, root=root, train=False)
            if tuple(x.shape) != tuple(mod.sample_shape):
                raise DataError(f"shape {tuple(x.shape)}, expected {tuple(mod.sample_shape)}")
            if x.dtype != torch.float32:
                raise DataError(f"dtype {x.dtype}, expected float32")
            if not all_finite(x):
                raise DataError(f"{int((~torch.isfinite(x)).sum())} non-finite value(s) after preprocessing")
        except MedtvtError as err:
            msg = str(err)
            if msg in seen_errors:
                seen_errors[msg] += 1
                continue
            seen_errors[msg] = 1
            more = f" (used by {len(recs)} record(s))" if len(recs) > 1 else ""
            rep.problems.append(f"{recs[0].where}: field {mod.record_field!r} ({name} {ref!r}){more}: {msg}")
    for msg, n in seen_errors.items():
        if n > 1:
            rep.problems.append(f"(the error '{msg[:80]}...' repeats for {n - 1} further input(s))")
    return rep
