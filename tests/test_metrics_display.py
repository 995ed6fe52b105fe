"""Undefined clinical-efficacy numbers are printed as n/a with their reason (medtvt_core.metrics.display)."""

from __future__ import annotations

from medtvt_core.metrics import compute_protocols
from medtvt_core.metrics.display import ce_line, fmt_metric, undefined_reasons


def test_reference_f1_without_answer_blocks_is_na_with_the_reason():
    # A PT stage's reports: descriptions without an <answer> block; the reference averages over none.
    preds = ["ECG: sinus rhythm 80 bpm.", "X-ray: clear lungs."]
    refs = ["<think>x</think><answer>Sepsis</answer>", "<think>y</think><answer>Hypertension</answer>"]
    both = compute_protocols(preds, refs, metrics=[])
    ref, strict = both["reference"]["ce"], both["strict"]["ce"]
    assert ref["f1"] is None and ref["n_averaged"] == 0
    why = undefined_reasons(ref)
    assert set(why) == {"f1", "precision", "recall", "auc"} and all("<answer>" in r for r in why.values())
    assert fmt_metric(ref, "f1").startswith("n/a (no report and its reference both hold an <answer> block")
    line = ce_line(ref, "reference")
    assert line.startswith("F1 n/a precision n/a recall n/a AUC n/a (reference protocol; n/a: no report") and \
        line.count("n/a: ") == 1
    # the strict protocol counts a missing answer as the empty set: F1 defined (0)
    assert strict["f1"] == 0.0 and "f1" not in undefined_reasons(strict)
    assert ce_line(strict).startswith("F1 0.0000 precision 0.0000 recall 0.0000")


def test_defined_numbers_print_as_numbers():
    both = compute_protocols(["<answer>Sepsis</answer>"], ["<answer>Sepsis</answer>"], metrics=[])
    assert fmt_metric(both["reference"]["ce"], "f1") == "1.0000"
    assert undefined_reasons(both["reference"]["ce"]) == {}  # pooled AUC: Sepsis 1, the six others 0
    ce = both["strict"]["ce"]
    # per category, one record holds one class only: no category has an AUC, said so
    assert undefined_reasons(ce) == {"auc": "the truth holds one class only"}
    assert ce_line(ce) == "F1 1.0000 precision 1.0000 recall 1.0000 AUC n/a (n/a: the truth holds one class only)"
