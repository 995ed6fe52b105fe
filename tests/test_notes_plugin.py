"""A third-party modality end to end: the ``note`` modality of ``examples/medtvt-notes`` (installed by
the README's test command) trained, saved and used by ``medtvt diagnose --note`` without the core
knowing its name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_orchestrator import TINY_SETS, medtvt, ok, one_line_error

NOTES = {"Pneumonia": "productive cough and fever for three days, crackles at the right base",
         "Sepsis": "rigors, confusion, hypotension on arrival",
         "Atrial Fibrillation": "palpitations since yesterday, irregular pulse"}


def _with_notes(cohort: Path, root: Path) -> Path:
    """A copy of the cohort whose disease-level records also reference a clinical note."""
    shutil.copytree(cohort, root)
    (root / "notes").mkdir()
    for split in ("qa/disease_train.json", "qa/disease_test.json"):
        recs = json.loads((root / split).read_text())
        for r in recs:
            answer = r["messages"][1]["content"]
            text = "; ".join(t for d, t in NOTES.items() if d in answer) or "no complaints documented"
            (root / "notes" / f"{r['id']}.txt").write_text(text)
            r["note"] = [f"notes/{r['id']}.txt"]
            r["messages"][0]["content"] += " Clinical note: <note>"
        (root / split).write_text(json.dumps(recs))
    return root


@pytest.fixture(scope="module")
def notes_run(tmp_path_factory, cohort):
    root = _with_notes(cohort, tmp_path_factory.mktemp("notes") / "data")
    out = root.parent / "run"
    sets = [a for s in [*TINY_SETS, f"data.root={root}", "encoders.note.name=note-hash"] for a in ("--set", s)]
    ok(medtvt("run", "--preset", "demo", "--modalities", "ecg,note", "--stages", "sft", "--out", out, "--quiet", *sets))
    return root, out


def test_note_modality_trains_and_diagnoses(notes_run):
    root, out = notes_run
    final = out / "sft" / "final"
    meta = json.loads((final / "config.json").read_text())
    assert meta["modalities"] == ["ecg", "note"] and meta["placeholders"] == {"ecg": "<ecg>", "note": "<note>"}
    assert json.loads((final / "processor_config.json").read_text())["readers"]["note"]["name"] == "note"
    rec = json.loads((root / "qa/disease_test.json").read_text())[0]
    note = root / rec["note"][0]
    r = ok(medtvt("diagnose", "--run", out, "--note", note, "--ecg", root / rec["ECG"][0], "--json", "--samples", "0"))
    res = json.loads(r.stdout)
    assert res["modalities_given"] == ["ecg", "note"] and isinstance(res["report"], str)
    assert res["question"].endswith("Clinical note: <note>")  # the placeholders take the inputs
    # a note alone is a valid input; a modality the model lacks is a one-line error
    only = json.loads(ok(medtvt("diagnose", "--model", final, "--note", note, "--json", "--samples", "0")).stdout)
    assert only["modalities_given"] == ["note"] and "(ecg not available)" in only["question"]
    one_line_error(medtvt("diagnose", "--model", final, "--cxr", root / rec["image"][0]),
                   "--cxr", "the model has no cxr modality")
