"""The reference's evaluation protocol (MedTVT-R1 ``evaluate.py``), number for number.

Per sample, then averaged over all samples:

* BLEU: nltk ``sentence_bleu([ref_tokens], hyp_tokens)`` (BLEU-4, uniform weights, no smoothing);
* METEOR: nltk ``meteor_score([ref_tokens], hyp_tokens)`` (default parameters);
* ROUGE-L: rouge-score ``RougeScorer(["rougeL"], use_stemmer=True).score(ref, hyp)`` *recall*;
* BERTScore: *recall* (computed by :class:`.modules.BertScore` from a local checkpoint).

Tokens are nltk ``wordpunct_tokenize`` of the whole texts (tags included), as in the
reference's source (docs/method.md, "Evaluation"; not ``str.split``).

Clinical efficacy uses the reference's labels (:func:`medtvt_core.answers.reference_labels`:
first ``<answer>`` block, exact strings) and only the samples where *both* texts have a
block: per sample precision = TP/|P| (0 if P is empty), recall = TP/|G| (0 if G is empty),
F1 = 2PR/(P+R) (0 if P+R = 0), averaged over those samples.  AUC from 0/1 presence of each
category over those samples: one per category, and one overall from every (sample,
category) pair pooled; ``None`` where sklearn's ``roc_auc_score`` refuses (one class only),
or when no sample has both blocks (the reference divides by zero there).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from ..answers import DISEASES, reference_labels

__all__ = ["reference_clinical_efficacy", "sentence_bleu_scores", "rouge_l_recall_scores"]


def _auc(y_true: list[int], y_score: list[int]) -> float | None:
    from sklearn.metrics import roc_auc_score

    # The reference records None where sklearn raised ValueError (one class in y_true, or
    # no data); sklearn >= 1.6 warns and returns NaN for one class instead.
    if len(set(y_true)) < 2:
        return None
    try:
        return float(roc_auc_score(y_true, y_score))
    except ValueError:
        return None


def reference_clinical_efficacy(pred_texts: Sequence[str], ref_texts: Sequence[str],
                                diseases: Sequence[str] = DISEASES) -> dict[str, Any]:
    """Clinical efficacy by the reference's rules (module doc).

    Returns ``{"precision", "recall", "f1", "auc", "n", "n_averaged", "per_category":
    {name: {"auc", "tp", "fp", "fn"}}, "per_record": {"precision", "recall", "f1"}}``:
    ``n`` samples, ``n_averaged`` of them with a block in both texts; per-record lists hold
    ``None`` for the others.

    >>> r = reference_clinical_efficacy(["<answer>Sepsis; Pneumonia</answer>", "no answer"],
    ...                                 ["<answer>Sepsis</answer>", "<answer>Hypertension</answer>"])
    >>> r["precision"], r["recall"], round(r["f1"], 4), r["n_averaged"], r["per_record"]["f1"][1]
    (0.5, 1.0, 0.6667, 1, None)
    """
    diseases = tuple(diseases)
    per: dict[str, list[float | None]] = {"precision": [], "recall": [], "f1": []}
    stats = {d: {"tp": 0, "fp": 0, "fn": 0} for d in diseases}
    columns: dict[str, tuple[list[int], list[int]]] = {d: ([], []) for d in diseases}
    pooled_true: list[int] = []
    pooled_pred: list[int] = []
    for pred, ref in zip(pred_texts, ref_texts, strict=True):
        p, g = reference_labels(pred), reference_labels(ref)
        if p is None or g is None:
            for v in per.values():
                v.append(None)
            continue
        tp = len(p & g)
        precision = tp / len(p) if p else 0.0
        recall = tp / len(g) if g else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        per["precision"].append(precision)
        per["recall"].append(recall)
        per["f1"].append(f1)
        for d in diseases:
            t, s = int(d in g), int(d in p)
            stats[d]["tp"] += t & s
            stats[d]["fp"] += s & (1 - t)
            stats[d]["fn"] += t & (1 - s)
            columns[d][0].append(t)
            columns[d][1].append(s)
            pooled_true.append(t)
            pooled_pred.append(s)
    n_avg = sum(v is not None for v in per["f1"])

    def mean(key: str) -> float | None:
        vals = [v for v in per[key] if v is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "precision": mean("precision"),
        "recall": mean("recall"),
        "f1": mean("f1"),
        "auc": _auc(pooled_true, pooled_pred),
        "n": len(per["f1"]),
        "n_averaged": n_avg,
        "per_category": {d: {"auc": _auc(*columns[d]), **stats[d]} for d in diseases},
        "per_record": per,
    }


def sentence_bleu_scores(pred_texts: Sequence[str], ref_texts: Sequence[str]) -> list[float]:
    """nltk ``sentence_bleu`` per sample on ``wordpunct_tokenize`` tokens (BLEU-4, no smoothing).

    >>> sentence_bleu_scores(["the heart rhythm is irregular"], ["the heart rhythm is irregular"])
    [1.0]
    """
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        # nltk warns on every sample without a 3- or 4-gram match (the score is then 0)
        warnings.simplefilter("ignore")
        return [float(sentence_bleu([wordpunct_tokenize(r)], wordpunct_tokenize(p)))
                for p, r in zip(pred_texts, ref_texts, strict=True)]


def rouge_l_recall_scores(pred_texts: Sequence[str], ref_texts: Sequence[str]) -> list[float]:
    """rouge-score ROUGE-L recall per sample (Porter stemmer on), reference = target.

    >>> rouge_l_recall_scores(["the cat sat"], ["the cats sat on the mat"])
    [0.5]
    """
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(r, p)["rougeL"].recall) for p, r in zip(pred_texts, ref_texts, strict=True)]
