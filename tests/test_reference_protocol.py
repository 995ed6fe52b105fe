"""The reference's rules, restated here from its source, against our reference-exact code.

* Rewards (``grpo_train.py``): ``format`` and ``jaccard`` must agree with the restatement on
  every adversarial case; the normalised variants differ exactly where documented.
* Evaluation (``evaluate.py``): ``compute_all(protocol="reference")`` must give the
  restated numbers (nltk, rouge-score, sklearn, bert_score called directly) to 1e-12.
* ``check_dataset`` names a disease-level record whose answer has no ``<answer>`` block.

The oracles below use only ``re``, nltk, rouge-score, sklearn and bert_score, never our helpers.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest

from medtvt_core.answers import DISEASES
from medtvt_core.errors import ConfigError, DataError
from medtvt_core.metrics import compute_all, compute_protocols, load_wordnet
from medtvt_plugins.rewards.builtin import REWARDS

MB = 1 << 20


# ============================================================================= rewards
def oracle_jaccard(completion: str, ground_truth: str) -> float:
    """The reference's Jaccard_reward for one pair, restated."""
    pattern = r"<answer>(.*?)</answer>"
    c = re.search(pattern, completion, re.DOTALL)
    g = re.search(pattern, ground_truth, re.DOTALL)
    if not (c and g):
        return 0.0
    p = {x.strip() for x in set(c.group(1).strip().split(";")) if x.strip()}
    t = {x.strip() for x in set(g.group(1).strip().split(";")) if x.strip()}
    union = len(p | t)
    return len(p & t) / union if union > 0 else 0.0


def oracle_format(completion: str) -> float:
    """The reference's format_reward for one completion, restated."""
    return 1.0 if re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", completion.lstrip(), re.DOTALL) else 0.0


SAME = object()  # the normalised variant gives the reference's value
AF, PN, SE = "Atrial Fibrillation", "Pneumonia", "Sepsis"
GT = f"<think> irregular rhythm; right lower lobe consolidation </think><answer> {AF}; {PN} </answer>"


@dataclass(frozen=True)
class Case:
    name: str
    completion: str
    truth: Any = GT
    column: str = "solution"
    strict_format: Any = SAME  # format-strict's value where it differs from the reference
    normalized: Any = SAME  # jaccard-normalized's value where it differs from the reference


def think(answer: str, reasoning: str = "r") -> str:
    return f"<think> {reasoning} </think><answer> {answer} </answer>"


CASES = [
    Case("exact", think(f"{AF}; {PN}")),
    Case("subset", think(AF)),
    Case("superset", think(f"{AF}; {PN}; {SE}")),
    Case("disjoint", think(SE)),
    Case("case", think("atrial fibrillation; PNEUMONIA"), normalized=1.0),
    Case("inner spaces", think(f"Atrial  Fibrillation; {PN}"), normalized=1.0),
    Case("no-break space inside a name", think(f"Atrial\u00a0Fibrillation; {PN}"), normalized=1.0),
    Case("no-break spaces around names", f"<think> r </think><answer>\u00a0{AF};\u00a0{PN}\u00a0</answer>"),
    Case("zero-width space (not whitespace)", think(f"Atrial\u200bFibrillation; {PN}")),
    Case("stray </answer> before the block", f"</answer> <think> r </think><answer> {PN} </answer>", normalized=0.0),
    Case("stray </answer> inside think", f"<think> r </answer> </think><answer> {PN} </answer>",
         strict_format=0.0, normalized=0.0),
    Case("two answer blocks, second right", f"<think> r </think><answer> {SE} </answer><answer> {AF}; {PN} </answer>",
         strict_format=0.0),
    Case("two answer blocks, first right", f"<think> r </think><answer> {AF}; {PN} </answer><answer> {SE} </answer>",
         strict_format=0.0, normalized=0.0),
    Case("nested answer", f"<think> r </think><answer> {AF} <answer> {PN} </answer></answer>", strict_format=0.0),
    Case("nested think", f"<think> a <think> b </think> c </think><answer> {AF}; {PN} </answer>", strict_format=0.0),
    Case("<answer> inside think", f"<think> maybe <answer> {SE} </answer> </think><answer> {AF}; {PN} </answer>",
         strict_format=0.0),
    Case("untagged ground truth (label column)", think(f"{AF}; {PN}"), truth=f"{AF}; {PN}", normalized=1.0),
    Case("disease-level truth without block", think(f"{AF}; {PN}"), truth=f"<think> r </think> {AF}; {PN}",
         column="answer", normalized=None),
    Case("untagged report as truth", think(f"{AF}; {PN}"), truth=f"The ECG shows {AF}", column="answer",
         normalized=None),
    Case("truth with two blocks", think(f"{AF}; {PN}"), truth=f"<answer> {AF}; {PN} </answer><answer> {SE} </answer>",
         normalized=None),
    Case("truth: empty block", think(""), truth="<answer> </answer>"),
    Case("1 MB list", "<think> t </think><answer> " + f"{AF}; " * (MB // 21) + f"{PN} </answer>", normalized=0.0),
    Case("1 MB reasoning", think(f"{AF}; {PN}", "y" * MB)),
    Case("trailing newline", think(f"{AF}; {PN}") + "\n", strict_format=1.0),
    Case("trailing text", think(f"{AF}; {PN}") + " done"),
    Case("leading whitespace", "\n \t" + think(f"{AF}; {PN}")),
    Case("CRLF inside and between", f"<think> r </think>\r\n<answer> {AF};\r\n{PN} </answer>"),
    Case("CRLF at the end", f"<think> r </think>\r\n<answer> {AF}; {PN} </answer>\r\n", strict_format=1.0),
    Case("vertical tab and form feed between blocks", f"<think> r </think>\x0b\x0c<answer> {AF}; {PN} </answer>"),
    Case("no-break space between blocks", f"<think> r </think>\u00a0<answer> {AF}; {PN} </answer>"),
    Case("empty answer", think("")),
    Case("only separators", think(" ; ;; ")),
    Case("duplicate labels", think(f"{PN}; {PN} ; {AF};{AF}")),
    Case("unknown label", think(f"{AF}; {PN}; Influenza")),
    Case("unicode name", think(f"Pneumonía; {AF}")),
    Case("emoji in a name", think(f"\U0001fac0 {AF}; {PN}")),
    Case("label with a period", think(f"{AF}; {PN}.")),
    Case("newline and tab separated", f"<think>r</think><answer>\n\t{AF};\n\t{PN}\n</answer>"),
    Case("semicolons in think only", f"<think> {SE}; {AF} </think><answer> {PN} </answer>"),
    Case("no tags", f"{AF}; {PN}"),
    Case("unclosed answer", f"<think> r </think><answer> {AF}; {PN}"),
    Case("think only", f"<think> {AF} </think>"),
    Case("uppercase tags", f"<THINK> r </THINK><ANSWER> {AF}; {PN} </ANSWER>"),
    Case("space inside a tag", f"<think> r </think><answer > {AF}; {PN} </answer>"),
    Case("text between the blocks", f"<think> r </think> so <answer> {AF}; {PN} </answer>"),
    Case("text before think", f"Answer: <think> r </think><answer> {AF}; {PN} </answer>"),
    Case("answer before think", f"<answer> {AF}; {PN} </answer><think> r </think>"),
    Case("many open tags", "<answer>" * 500 + f" {PN}"),
    Case("many think closes, one followed by the answer",
         "<think>" + "</think> x " * 500 + f"</think> <answer> {AF}; {PN} </answer>", strict_format=0.0),
    Case("conversational truth", think(f"{AF}; {PN}"), truth=[{"role": "assistant", "content": GT}]),
]


def _truth_text(truth: Any) -> str:
    return truth if isinstance(truth, str) else truth[-1]["content"]


def _score(name: str, case: Case) -> float | None:
    return REWARDS[name](prompts=["q"], completions=[case.completion], **{case.column: [case.truth]})[0]


def test_enough_adversarial_cases():
    assert len(CASES) >= 36 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_exact_rewards_agree_with_the_reference_rule(case):
    assert _score("format", case) == oracle_format(case.completion)
    assert _score("jaccard", case) == oracle_jaccard(case.completion, _truth_text(case.truth))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_normalized_variants_differ_only_where_documented(case):
    ref_format, ref_jaccard = oracle_format(case.completion), oracle_jaccard(case.completion, _truth_text(case.truth))
    assert _score("format-strict", case) == (ref_format if case.strict_format is SAME else case.strict_format)
    got = _score("jaccard-normalized", case)
    expected = ref_jaccard if case.normalized is SAME else case.normalized
    assert got == pytest.approx(expected) if expected is not None else got is None
    # a documented difference is a real one
    if case.strict_format is not SAME:
        assert case.strict_format != ref_format
    if case.normalized is not SAME:
        assert case.normalized != ref_jaccard


def test_difference_counts():
    """Of the 50 cases, format-strict differs on 9, jaccard-normalized on 11, one or both on 18."""
    fmt = {c.name for c in CASES if c.strict_format is not SAME}
    jac = {c.name for c in CASES if c.normalized is not SAME}
    assert (len(CASES), len(fmt), len(jac), len(fmt | jac)) == (50, 9, 11, 18)


def test_reference_jaccard_refuses_name_lists():
    with pytest.raises(ConfigError, match="jaccard-normalized"):
        REWARDS["jaccard"](completions=[think(SE)], solution=[[SE]])
    assert REWARDS["jaccard"](completions=[think(SE)], solution=[None]) == [None]


# ============================================================================= evaluation
PAIRS = [
    # (prediction, reference)
    (f"<think> The ECG shows an irregularly irregular rhythm without P waves. The radiograph shows consolidation "
     f"in the right lower lobe. </think><answer> {AF}; {PN} </answer>",
     f"<think> Irregularly irregular rhythm with absent P waves; right lower lobe consolidation on the chest film; "
     f"lactate is raised. </think><answer> {AF}; {PN}; {SE} </answer>"),
    # prediction without an <answer> block
    ("<think> Sinus rhythm. Lungs are clear. Creatinine rose from 1.1 to 2.9 mg/dL. </think> Acute Renal Failure",
     "<think> Creatinine rose sharply within 48 hours; blood pressure is high. </think>"
     "<answer> Acute Renal Failure; Hypertension </answer>"),
    # Diabetes Mellitus occurs in a reference only
    ("<think> Left ventricular hypertrophy, ST depression in V5-V6. </think>"
     "<answer> Coronary Artery Disease; Hypertension </answer>",
     "<think> ST depression in the lateral leads, LVH; glucose 310 mg/dL, HbA1c raised. </think>"
     "<answer> Coronary Artery Disease; Diabetes Mellitus; Hypertension </answer>"),
    # unicode, and the same labels in another order
    ("<think> Fièvre, tachycardie — SpO₂ 88 %, opacité basale droite. </think><answer> Pneumonia; Sepsis </answer>",
     "<think> Fever, tachycardia, SpO2 88%, right basal opacity. </think><answer> Sepsis; Pneumonia </answer>"),
    # case differs: the reference's labels do not match
    ("<think> Blood pressure 172/98. </think><answer> hypertension </answer>",
     "<think> Blood pressure 172/98 on two readings. </think><answer> Hypertension </answer>"),
    # an empty predicted set
    ("<think> Nothing abnormal. </think><answer></answer>",
     "<think> Irregular rhythm. </think><answer> Atrial Fibrillation </answer>"),
    # a reference without an <answer> block (left out of clinical efficacy)
    (f"<think> Irregular rhythm. </think><answer> {AF} </answer>", "<think> Irregular rhythm, no fixed PR. </think>"),
]


def oracle_evaluate(preds: list[str], refs: list[str], wordnet: Any) -> dict[str, Any]:
    """The reference's evaluate_and_calculate_metrics, restated (BERTScore apart)."""
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer
    from sklearn.metrics import roc_auc_score

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = bleu = meteor = 0.0
    tot_p = tot_r = tot_f = 0.0
    n = 0
    auc_data: dict[str, list[tuple[int, int]]] = defaultdict(list)
    all_true: list[int] = []
    all_pred: list[int] = []
    per_f1: list[float | None] = []
    for gt, c in zip(refs, preds):
        rouge += scorer.score(gt, c)["rougeL"].recall
        cs, rs = wordpunct_tokenize(c), wordpunct_tokenize(gt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bleu += sentence_bleu([rs], cs)
        meteor += meteor_score([rs], cs, wordnet=wordnet)
        cm = re.search(r"<answer>(.*?)</answer>", c, re.DOTALL)
        gm = re.search(r"<answer>(.*?)</answer>", gt, re.DOTALL)
        if not (cm and gm):
            per_f1.append(None)
            continue
        cl = {x.strip() for x in set(cm.group(1).strip().split(";")) if x.strip()}
        gl = {x.strip() for x in set(gm.group(1).strip().split(";")) if x.strip()}
        tp = cl & gl
        p = len(tp) / len(cl) if len(cl) > 0 else 0
        r = len(tp) / len(gl) if len(gl) > 0 else 0
        f = 2 * (p * r) / (p + r) if p + r > 0 else 0
        tot_p, tot_r, tot_f, n = tot_p + p, tot_r + r, tot_f + f, n + 1
        per_f1.append(f)
        for label in set(DISEASES):
            auc_data[label].append((int(label in gl), int(label in cl)))
            all_true.append(int(label in gl))
            all_pred.append(int(label in cl))

    def auc(t, s):
        return roc_auc_score(t, s) if len(set(t)) == 2 else None  # sklearn raised ValueError then

    cat = {label: auc(*zip(*d)) for label, d in auc_data.items()}
    k = len(preds)
    return {"bleu": bleu / k, "meteor": meteor / k, "rouge": rouge / k, "precision": tot_p / n, "recall": tot_r / n,
            "f1": tot_f / n, "n_averaged": n, "auc": auc(all_true, all_pred), "per_category": cat, "per_f1": per_f1}


@pytest.fixture(scope="module")
def wordnet():
    handle, why = load_wordnet()
    if handle is None:
        pytest.skip(f"WordNet not available here: {why}")
    return handle


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT with a word-level vocab, saved locally (BERTScore needs a checkpoint)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert_ref")
    words = sorted({w.lower() for p, r in PAIRS for w in re.findall(r"[A-Za-z]+", p + " " + r)})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(d / "vocab.txt"), model_max_length=128).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    return d


def test_reference_protocol_equals_the_reference_evaluation(wordnet, tiny_bert):
    import bert_score

    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    with wordnet.authorised() as wn:
        want = oracle_evaluate(preds, refs, wn)
    got = compute_all(preds, refs, protocol="reference", bertscore_model=tiny_bert, bertscore_layers=2)
    assert got["protocol"] == "reference"
    nlg, ce = got["nlg"], got["ce"]
    for k in ("bleu", "meteor", "rouge"):
        assert nlg[k] == pytest.approx(want[k], abs=1e-12, rel=0)
    for k in ("precision", "recall", "f1", "auc"):
        assert ce[k] == pytest.approx(want[k], abs=1e-12, rel=0)
    assert (ce["n"], ce["n_averaged"]) == (len(PAIRS), want["n_averaged"]) == (7, 5)
    assert {d: v["auc"] for d, v in ce["per_category"].items()} == pytest.approx(want["per_category"], abs=1e-12)
    assert ce["per_category"]["Diabetes Mellitus"]["auc"] == 0.5  # reference-only category: never predicted
    assert ce["per_category"]["Sepsis"] == {"auc": 0.75, "tp": 1, "fp": 0, "fn": 1}

    _, r, _ = bert_score.score(preds, refs, model_type=str(tiny_bert), num_layers=2)
    assert nlg["bertscore"] == pytest.approx(r.mean().item(), abs=1e-12, rel=0)

    per = got["per_record"]
    assert per["f1"] == pytest.approx(want["per_f1"], abs=1e-12)
    assert per["f1"][1] is None and per["precision"][6] is None  # no block in the prediction / the reference
    assert set(per) == {"precision", "recall", "f1", "bleu", "rouge", "meteor", "bertscore"}
    assert all(len(v) == len(PAIRS) for v in per.values())
    assert sum(per["rouge"]) / len(PAIRS) == pytest.approx(nlg["rouge"], abs=1e-12)
    json.dumps(got)


def test_both_protocols_in_one_call(wordnet):
    preds, refs = [p for p, _ in PAIRS[:6]], [r for _, r in PAIRS[:6]]  # strict needs every reference to parse
    both = compute_protocols(preds, refs, metrics=["bleu", "rouge", "meteor"])
    assert list(both) == ["strict", "reference"]
    one = {p: compute_all(preds, refs, protocol=p, metrics=["bleu", "rouge", "meteor"]) for p in ("strict", "reference")}
    assert both == one
    strict, ref = both["strict"], both["reference"]
    assert strict["protocol"] == "strict" and "n_averaged" not in strict["ce"]
    # METEOR is the same computation under both; the others are not
    assert strict["nlg"]["meteor"] == ref["nlg"]["meteor"] and strict["per_record"]["meteor"] == ref["per_record"]["meteor"]
    assert strict["nlg"]["rouge"] != ref["nlg"]["rouge"] and strict["nlg"]["bleu"] != ref["nlg"]["bleu"]
    # strict: a missing answer is the empty set, "hypertension" is Hypertension
    assert strict["per_record"]["f1"][1] == 0.0 and ref["per_record"]["f1"][1] is None
    assert strict["per_record"]["f1"][4] == 1.0 and ref["per_record"]["f1"][4] == 0.0
    assert set(strict["per_record"]) == {"precision", "recall", "f1", "rouge", "meteor"}


def test_reference_protocol_edge_cases():
    # no sample has both blocks: nothing to average (the reference divides by zero)
    out = compute_all(["no answer"], ["<answer> Sepsis </answer>"], protocol="reference", metrics=[])
    assert (out["ce"]["f1"], out["ce"]["auc"], out["ce"]["n_averaged"]) == (None, None, 0)
    assert out["per_record"] == {"precision": [None], "recall": [None], "f1": [None]}
    with pytest.raises(ConfigError, match="compute_protocols"):
        compute_all(["a"], ["a"], protocol=("strict", "reference"), metrics=[])
    with pytest.raises(ConfigError, match="unknown evaluation protocol"):
        compute_protocols(["a"], ["a"], protocols=["paper"], metrics=[])
    with pytest.raises(DataError, match="no samples"):
        compute_all([], [], protocol="reference", metrics=[])


# ============================================================================= data check
def test_check_reports_a_disease_answer_without_a_block(tmp_path):
    from medtvt_core.data.check import check_dataset
    from medtvt_core.data.synth import TRAIN_FILE, synthesize

    root = tmp_path / "d"
    synthesize(root, n_patients=6, seed=4, test_fraction=0.25, workers=1)
    recs = json.loads((root / TRAIN_FILE).read_text())
    answer = recs[1]["messages"][1]["content"]
    recs[1]["messages"][1]["content"] = re.sub(r"<answer>.*?</answer>", "", answer, flags=re.DOTALL)
    (root / TRAIN_FILE).write_text(json.dumps(recs))
    rep = check_dataset(root, qa_files=[TRAIN_FILE])
    assert len(rep.problems) == 1, rep.problems
    line = rep.problems[0]
    assert "\n" not in line and line.startswith(f"{TRAIN_FILE}[1]: ") and "no <answer> ... </answer> block" in line
    assert "allowed: text ending in '<answer> A; B </answer>'" in line and all(d in line for d in DISEASES)
