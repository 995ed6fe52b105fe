"""MedTVT-QA schema, placeholder rules and disease labels."""

from __future__ import annotations

import json

import pytest

from medtvt_core.data.labels import DISEASES, format_answer, icd10_category, parse_answer, unknown_labels
from medtvt_core.data.schema import read_qa_file
from medtvt_core.errors import DataError
from medtvt_plugins.readers.cxr import CxrModality
from medtvt_plugins.readers.ecg import EcgModality
from medtvt_plugins.readers.lab import LabModality

MODS = [EcgModality, CxrModality, LabModality]


def rec(q: str = "ECG <ecg> X-ray <cxr> labs <lab>", a: str = "<think> t </think><answer> Sepsis </answer>", **extra):
    base = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "ECG": ["e/1"], "image": ["c/1.jpg"], "lab": [20000017]}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def write(tmp_path, records, name="qa.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_valid_records_and_ids(tmp_path):
    p = write(tmp_path, [rec(), rec(id="x", q="<ecg> only", image=None, lab=None)])
    recs, problems = read_qa_file(p, MODS)
    assert not problems and [r.id for r in recs] == ["qa:0", "x"]
    r = recs[0]
    assert r.ref("ECG") == "e/1" and r.ref("lab") == "20000017" and r.ref("nope") is None
    assert r.question.startswith("ECG") and r.answer.endswith("</answer>") and r.where.endswith("qa.json[0]")
    assert recs[1].ref("image") is None


@pytest.mark.parametrize("record, match", [
    (rec(q="ECG and X-ray <cxr> labs <lab>"), r"record 0: field 'messages\[0\].content': has no <ecg> placeholder"),
    (rec(image=None), r"record 0: field 'image': is missing or empty although the question holds the <cxr>"),
    (rec(q="<ecg> <ecg> <cxr> <lab>"), r"holds the <ecg> placeholder 2 times"),
    (rec(a="see <lab>"), r"field 'messages\[1\].content': holds the placeholder <lab>"),
    (rec(ECG=["a", "b"]), r"field 'ECG': holds 2 references; allowed: exactly one"),
    (rec(ECG=[True]), r"field 'ECG': a reference cannot be a boolean"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, r"field 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, r"messages\[1\].content"),
    ({"question": "q"}, r"field 'messages': Field required"),
    ("just text", r"field '<record>': must be a JSON object"),
])
def test_broken_records_name_file_index_and_field(tmp_path, record, match):
    p = write(tmp_path, [record])
    with pytest.raises(DataError, match=match) as err:
        read_qa_file(p, MODS)
    assert "qa.json" in str(err.value) and "\n" not in str(err.value)


def test_collect_mode_keeps_good_records(tmp_path):
    p = write(tmp_path, [rec(), rec(q="no placeholders"), rec(id="dup"), rec(id="dup")])
    recs, problems = read_qa_file(p, MODS, collect=True)
    assert [r.id for r in recs] == ["qa:0", "dup"]
    assert {pr.index for pr in problems} == {1, 3}
    assert any("ids must be unique" in str(pr) for pr in problems)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_qa_file(tmp_path / "none.json", MODS)
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(DataError, match="not valid JSON: .* line 1 column 3"):
        read_qa_file(tmp_path / "bad.json", MODS)
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(DataError, match="top level must be a JSON list"):
        read_qa_file(tmp_path / "obj.json", MODS)


def test_disease_labels():
    assert DISEASES == ("Coronary Artery Disease", "Acute Renal Failure", "Hypertension", "Atrial Fibrillation",
                        "Pneumonia", "Diabetes Mellitus", "Sepsis")
    cases = {"I2510": "Coronary Artery Disease", "N17.9": "Acute Renal Failure", "I129": "Hypertension",
             "I4891": "Atrial Fibrillation", "J189": "Pneumonia", "E1129": "Diabetes Mellitus", "R6521": "Sepsis",
             "A419": "Sepsis", "I110": "Hypertension", "E109": "Diabetes Mellitus"}
    assert {c: icd10_category(c) for c in cases} == cases
    assert icd10_category("Z000") is None and icd10_category("R651") is None
    assert parse_answer("<think> x </think><answer> Sepsis;  Pneumonia ; </answer>") == ["Sepsis", "Pneumonia"]
    assert parse_answer("no tags") is None and parse_answer("<answer> </answer>") == []
    assert format_answer(["Sepsis", "Hypertension", "Sepsis"]) == "<answer> Hypertension; Sepsis </answer>"
    assert unknown_labels(["Sepsis", "sepsis", "Flu"]) == ["sepsis", "Flu"]
