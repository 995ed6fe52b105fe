"""Clinical efficacy of predicted disease sets (MedTVT-R1 paper, Table 1) and a majority baseline.

Inputs are texts whose ``<answer>`` holds ``A; B`` (parsed by :mod:`medtvt_core.answers`) or
ready-made sets/lists of names.  A prediction without one valid ``<answer>`` counts as the
empty set.  A reference must parse (tagged text, bare ``A; B`` list or names), else
:class:`~medtvt_core.errors.DataError`.

Overall scores (per-sample, averaged over samples, as in the paper), with P the predicted
and G the true set of a sample, TP = |P & G|:

* precision = TP/|P|, recall = TP/|G|, F1 = 2TP/(|P|+|G|) (harmonic mean of the two);
* both sets empty: precision = recall = F1 = 1 (nothing to find, nothing claimed);
* P empty, G not: precision = recall = F1 = 0; G empty, P not: likewise 0;
* names outside ``diseases`` stay in P (and G) and count like any other name, so an
  unknown predicted name is a false positive.

Per category (the ``diseases`` columns of the binary presence matrices): precision,
recall, F1 and support from sklearn (``zero_division=0``), and ROC AUC from sklearn.  Text
predictions give binary scores, for which AUC = (sensitivity + specificity) / 2, i.e. the
balanced accuracy; pass ``pred_scores`` (probabilities, ``[N, len(diseases)]``) for a ranking
AUC.  A category whose truth holds only one class has no AUC (``None``); the overall ``auc``
is the mean over categories that have one (``None`` if none has).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from ..answers import DISEASES, answer_set
from ..errors import ConfigError, DataError

__all__ = ["clinical_efficacy", "majority_baseline", "pred_sets", "ref_sets", "per_record_scores"]


def pred_sets(preds: Iterable[Any], diseases: Sequence[str] = DISEASES) -> list[frozenset[str]]:
    """Predicted sets; a missing or invalid ``<answer>`` gives the empty set."""
    return [answer_set(p, vocabulary=diseases) or frozenset() for p in preds]


def ref_sets(refs: Iterable[Any], diseases: Sequence[str] = DISEASES, what: str = "reference") -> list[frozenset[str]]:
    """True sets; a reference that does not parse raises :class:`DataError`."""
    out = []
    for i, r in enumerate(refs):
        s = answer_set(r, bare_ok=True, vocabulary=diseases)
        if s is None:
            raise DataError(f"{what} {i}: no single <answer>...</answer> block or disease list in {str(r)[:80]!r}")
        out.append(s)
    return out


def _per_sample(p: frozenset[str], g: frozenset[str]) -> tuple[float, float, float]:
    # sklearn's average="samples" cannot express these conventions (one zero_division
    # value for every 0/0) nor count names outside the category columns, hence by hand.
    if not p and not g:
        return 1.0, 1.0, 1.0
    tp = len(p & g)
    return (tp / len(p) if p else 0.0), (tp / len(g) if g else 0.0), 2.0 * tp / (len(p) + len(g))


def per_record_scores(pred_texts: Sequence[Any], ref_texts: Sequence[Any],
                      diseases: Sequence[str] = DISEASES) -> dict[str, list[float]]:
    """Per-sample ``precision``, ``recall``, ``f1`` lists (the values :func:`clinical_efficacy` averages).

    >>> per_record_scores(["<answer>Sepsis; Pneumonia</answer>", "none"], ["Sepsis", "Sepsis"])["f1"]
    [0.6666666666666666, 0.0]
    """
    diseases = tuple(diseases)
    if len(pred_texts) != len(ref_texts):
        raise DataError(f"clinical efficacy: {len(pred_texts)} predictions for {len(ref_texts)} references")
    rows = [_per_sample(p, g) for p, g in zip(pred_sets(pred_texts, diseases), ref_sets(ref_texts, diseases))]
    return {k: [r[i] for r in rows] for i, k in enumerate(("precision", "recall", "f1"))}


def _binary(sets: list[frozenset[str]], diseases: Sequence[str]) -> np.ndarray:
    return np.array([[d in s for d in diseases] for s in sets], dtype=np.int64).reshape(len(sets), len(diseases))


def clinical_efficacy(pred_texts: Sequence[Any], ref_texts: Sequence[Any], diseases: Sequence[str] = DISEASES,
                      *, pred_scores: Any = None) -> dict[str, Any]:
    """Per-sample precision/recall/F1 averaged, AUC, and the same per category (module doc).

    Returns ``{"precision", "recall", "f1", "auc", "n", "answer_rate", "unknown_names",
    "per_category": {name: {"precision", "recall", "f1", "auc", "support"}}}`` where
    ``answer_rate`` is the share of predictions with a valid ``<answer>`` and
    ``unknown_names`` the number of predicted names outside ``diseases``.

    >>> r = clinical_efficacy(["<answer>Sepsis; Pneumonia</answer>", "no answer"],
    ...                       ["<answer>Sepsis</answer>", "<answer>Hypertension</answer>"])
    >>> round(r["precision"], 3), round(r["recall"], 3), round(r["f1"], 3), r["answer_rate"]
    (0.25, 0.5, 0.333, 0.5)
    """
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    diseases = tuple(diseases)
    if len(pred_texts) != len(ref_texts):
        raise DataError(f"clinical efficacy: {len(pred_texts)} predictions for {len(ref_texts)} references")
    if not len(ref_texts):
        raise DataError("clinical efficacy: no samples to evaluate")
    preds, refs = pred_sets(pred_texts, diseases), ref_sets(ref_texts, diseases)
    per = np.array([_per_sample(p, g) for p, g in zip(preds, refs)], dtype=np.float64)
    known = set(diseases)

    y_true, y_pred = _binary(refs, diseases), _binary(preds, diseases)
    if pred_scores is not None:
        scores = np.asarray(pred_scores, dtype=np.float64)
        if scores.shape != y_true.shape:
            raise ConfigError(f"pred_scores has shape {scores.shape}, expected {y_true.shape} (samples x diseases)")
    else:
        scores = y_pred.astype(np.float64)
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(diseases))), average=None, zero_division=0.0)
    per_category: dict[str, dict[str, Any]] = {}
    aucs = []
    for k, name in enumerate(diseases):
        auc = None
        if 0 < y_true[:, k].sum() < len(y_true):
            auc = float(roc_auc_score(y_true[:, k], scores[:, k]))
            aucs.append(auc)
        per_category[name] = {"precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
                              "auc": auc, "support": int(support[k])}
    return {
        "precision": float(per[:, 0].mean()),
        "recall": float(per[:, 1].mean()),
        "f1": float(per[:, 2].mean()),
        "auc": float(np.mean(aucs)) if aucs else None,
        "n": len(refs),
        "answer_rate": float(np.mean([answer_set(p, vocabulary=diseases) is not None for p in pred_texts])),
        "unknown_names": int(sum(len(p - known) for p in preds)),
        "per_category": per_category,
    }


def majority_baseline(train_answers: Sequence[Any], test_answers: Sequence[Any], diseases: Sequence[str] = DISEASES,
                      *, strategy: str = "per_category") -> dict[str, Any]:
    """Clinical efficacy on ``test_answers`` of a constant prediction learnt from ``train_answers``.

    * ``"per_category"`` (default, the usual multi-label majority-class baseline): each
      category is predicted present iff it is present in more than half of the training
      samples (sklearn ``DummyClassifier(strategy="most_frequent")`` per column; a tie
      predicts absent).  May predict the empty set.
    * ``"most_frequent_set"``: the most frequent training disease set (ties: the one seen first).

    Returns :func:`clinical_efficacy`'s dict plus ``strategy`` and ``prediction`` (sorted names).

    >>> train = ["<answer>Hypertension; Sepsis</answer>", "<answer>Hypertension</answer>", "<answer>Hypertension</answer>"]
    >>> majority_baseline(train, ["<answer>Hypertension</answer>"])["prediction"]
    ['Hypertension']
    """
    from sklearn.dummy import DummyClassifier

    diseases = tuple(diseases)
    train = ref_sets(train_answers, diseases, what="training answer")
    if not train:
        raise DataError("majority baseline: no training answers")
    if strategy == "per_category":
        y = _binary(train, diseases)
        clf = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(y), 1)), y)
        row = np.asarray(clf.predict(np.zeros((1, 1)))).reshape(-1)
        prediction = frozenset(d for d, v in zip(diseases, row) if v)
    elif strategy == "most_frequent_set":
        prediction = Counter(train).most_common(1)[0][0]
    else:
        raise ConfigError(f"majority baseline: unknown strategy {strategy!r}; allowed: per_category, most_frequent_set")
    out = clinical_efficacy([prediction] * len(test_answers), test_answers, diseases)
    out["strategy"] = strategy
    out["prediction"] = sorted(prediction)
    return out
