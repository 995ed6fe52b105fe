"""The disease-level answers (evidence and reasoning) and the questions of the QA files."""

from __future__ import annotations

from typing import Any


from ..labels import format_answer
from .labs import _fmt, _high
from .patients import AF, ARF, CAD, CREAT, _DECOY_WHY, DM, GLUCOSE, HTN, _lab_name, lab_reference_range, LACTATE, Patient, PNA, SEPSIS, _SIGNS, UREA, WBC

# --------------------------------------------------------------------------- disease answers
_WHY = {
    AF: "irregular RR without P waves means atrial fibrillation",
    CAD: "ST depression with T inversion means coronary artery disease",
    HTN: "high voltage and a large heart mean hypertension",
    PNA: "a focal opacity with raised white cells means pneumonia",
    SEPSIS: "raised lactate and white cells with tachycardia mean sepsis",
    ARF: "raised creatinine and urea mean acute renal failure",
    DM: "high glucose means diabetes mellitus",
}


def _lab_value(labs: dict[str, float], item: str) -> str:
    return f"{_lab_name(item)} {_fmt(item, labs[item]) if item in labs else 'not measured'}"


def _signs_visible(p: Patient, disease: str) -> bool:
    """Whether every sign of ``disease`` crosses the threshold at which the reports call it abnormal."""
    m, labs = p.ecg["measured"], p.labs
    return {
        HTN: lambda: m["sokolow_mv"] > 3.5 and p.cxr["ctr"] > 0.5,
        PNA: lambda: bool(p.cxr["opacity"]) and _high(labs, WBC),
        SEPSIS: lambda: m["hr"] > 100 and _high(labs, LACTATE) and _high(labs, WBC),
        ARF: lambda: _high(labs, CREAT) and _high(labs, UREA),
        DM: lambda: _high(labs, GLUCOSE),
    }.get(disease, lambda: True)()


def _weak_values(p: Patient, disease: str) -> str:
    m, labs, op = p.ecg["measured"], p.labs, p.cxr["opacity"]
    return {
        HTN: lambda: f"QRS voltage {m['sokolow_mv']:.1f} mV, CTR {p.cxr['ctr']:.2f}",
        PNA: lambda: f"{op['side']} {op['zone']} zone opacity, {_lab_value(labs, WBC)}" if op else _lab_value(labs, WBC),
        SEPSIS: lambda: f"rate {m['hr']:.0f} bpm, {_lab_value(labs, LACTATE)}, {_lab_value(labs, WBC)}",
        ARF: lambda: f"{_lab_value(labs, CREAT)}, {_lab_value(labs, UREA)}",
        DM: lambda: _lab_value(labs, GLUCOSE),
    }[disease]()


def _decoy_visible(p: Patient, sign: str) -> bool:
    m = p.ecg["measured"]
    return {"htn_ecg": lambda: m["sokolow_mv"] > 3.5, "htn_cxr": lambda: p.cxr["ctr"] > 0.5,
            "sep_ecg": lambda: m["hr"] > 100, "sep_lab": lambda: _high(p.labs, LACTATE),
            "pna_cxr": lambda: bool(p.cxr["opacity"]), "pna_lab": lambda: _high(p.labs, WBC)}[sign]()


def disease_answer(p: Patient, *, check_signs: bool = False) -> str:
    """Compact evidence and reasoning inside ``<think>``, then the categories inside ``<answer>``.

    Kept short (about 50-110 tokens) so that demo-sized generation budgets reach ``</answer>``.
    ``check_signs`` (every cohort but the default one): a disease whose signs fall below the reporting
    thresholds is reasoned about as weak signs with their values; decoy signs are named as not
    leading to the disease.  (At the default strength the signs are past the thresholds; the
    default cohort keeps its original wording byte for byte.)
    """
    e, m, c, labs = p.ecg, p.ecg["measured"], p.cxr, p.labs
    ecg = f"ECG: {e['rhythm']} {m['hr']:.0f} bpm"
    if e["rhythm"] == "atrial fibrillation":
        ecg += ", irregular RR, no P waves"
    if m["sokolow_mv"] > 3.5:
        ecg += f", high QRS voltage {m['sokolow_mv']:.1f} mV"
    if e["territory"]:
        ecg += f", {e['territory']} ST depression and T inversion"
    cxr = f"X-ray: {'enlarged' if c['ctr'] > 0.5 else 'normal'} heart (CTR {c['ctr']:.2f})"
    cxr += f", {c['opacity']['side']} {c['opacity']['zone']} zone opacity" if c["opacity"] else ", clear lungs"
    high = [(i, labs[i]) for i in (GLUCOSE, CREAT, UREA, WBC, LACTATE) if i in labs and labs[i] > lab_reference_range(i)[1]]
    lab = "Labs: " + (", ".join(f"{_lab_name(i)} {_fmt(i, x)}" for i, x in high) if high else "key tests normal")
    d = set(p.diseases)
    why = []
    for dis, text in _WHY.items():
        if dis in d:
            weak = check_signs and not _signs_visible(p, dis)
            why.append(f"weak signs ({_weak_values(p, dis)}) suggest {dis.lower()}" if weak else text)
    if check_signs:
        why += [_DECOY_WHY[k] for k in _SIGNS if k in p.decoys and _decoy_visible(p, k)]
    return f"<think> {ecg}. {cxr}. {lab}. So {'; '.join(why)}. </think>{format_answer(p.diseases)}"


_Q_DISEASE = (
    "ECG: <ecg>\nChest X-ray: <cxr>\nLaboratory panel: <lab>\nWhich diseases does this patient have? Reason over the evidence first.",
    "Here are the ECG <ecg>, the chest radiograph <cxr> and the blood tests <lab> of one hospital stay. "
    "Give your reasoning, then the diagnoses.",
    "Review this patient's ECG <ecg>, chest X-ray <cxr> and laboratory results <lab>, then diagnose.",
)
_Q_ECG = ("<ecg>\nDescribe this 12-lead ECG: rhythm, rate, axis, voltage and ST-T changes.",
          "Interpret the following electrocardiogram. <ecg>",
          "<ecg>\nWhat does this ECG show?")
_Q_CXR = ("<cxr>\nDescribe the findings of this chest radiograph.",
          "Report on this chest X-ray: heart size and lung fields. <cxr>",
          "<cxr>\nWhat does this chest X-ray show?")
_Q_LAB = ("<lab>\nSummarise this laboratory panel and point out abnormal results.",
          "Which of these blood tests are abnormal? <lab>",
          "<lab>\nInterpret the laboratory results.")


def _qa(rec_id: str, q: str, a: str, **refs: str) -> dict[str, Any]:
    return {"id": rec_id, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            **{k: [v] for k, v in refs.items()}}
