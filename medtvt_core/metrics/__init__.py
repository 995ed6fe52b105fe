"""Offline evaluation: clinical efficacy (CE) and NLG metrics (BLEU, ROUGE-L, METEOR, BERTScore).

Two protocols (:data:`PROTOCOLS`):

* ``"strict"`` (default): :func:`.clinical.clinical_efficacy` (normalised disease sets, a
  missing answer counts as the empty set, AUC = mean over categories), sacrebleu corpus
  BLEU, ROUGE-L F-measure, METEOR, BERTScore F1.
* ``"reference"``: exactly the numbers of the reference's ``evaluate.py``
  (:mod:`.reference`): exact label strings averaged over samples where both texts have an
  ``<answer>`` block, pooled AUC, mean sentence BLEU, ROUGE-L recall (stemmed), METEOR,
  BERTScore recall.

:func:`compute_all` computes one protocol, :func:`compute_protocols` several at once
(sharing the METEOR scores, identical under both, and the one BERTScore pass).

Metrics are ``evaluate`` modules defined in :mod:`.modules` (instantiate them; ``evaluate.load`` fetches
scripts from a hub and fails offline).  A metric whose data or weights are not available
locally reports ``{"available": False, "reason": ...}``, never a number.

>>> out = compute_all(["<think>r</think><answer>Sepsis</answer>"], ["<think>r</think><answer>Sepsis</answer>"],
...                   metrics=["rouge"])
>>> out["protocol"], out["ce"]["f1"], out["nlg"]["rouge"], out["per_record"]["rouge"]
('strict', 1.0, 1.0, [1.0])
>>> both = compute_protocols(["<answer>sepsis</answer>"], ["<answer>Sepsis</answer>"], metrics=[])
>>> both["strict"]["ce"]["f1"], both["reference"]["ce"]["f1"]
(1.0, 0.0)
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from ..answers import DISEASES, completion_text
from ..errors import ConfigError, DataError
from .base import is_available, unavailable
from .clinical import clinical_efficacy, majority_baseline, per_record_scores
from .reference import reference_clinical_efficacy, rouge_l_recall_scores, sentence_bleu_scores
from .wordnet import load_wordnet

__all__ = [
    "compute_all", "compute_protocols", "PROTOCOLS", "clinical_efficacy", "reference_clinical_efficacy",
    "majority_baseline", "NLG_METRICS", "Bleu", "RougeL", "Meteor", "BertScore", "ClinicalEfficacy",
    "load_wordnet", "unavailable", "is_available",
]

#: names accepted in ``compute_all(metrics=...)``
NLG_METRICS = ("bleu", "rouge", "meteor", "bertscore")

#: evaluation protocols (module doc)
PROTOCOLS = ("strict", "reference")

_MODULE_CLASSES = ("Bleu", "RougeL", "Meteor", "BertScore", "ClinicalEfficacy")


def __getattr__(name: str) -> Any:
    # the evaluate modules import `evaluate` (which pulls in transformers): load on first use
    if name in _MODULE_CLASSES:
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compute_all(
    preds: Sequence[Any],
    refs: Sequence[Any],
    *,
    protocol: str = "strict",
    metrics: Iterable[str] = NLG_METRICS,
    wordnet_dir: str | os.PathLike[str] | None = None,
    bertscore_model: str | os.PathLike[str] | None = None,
    bertscore_layers: int | None = None,
    diseases: Sequence[str] = DISEASES,
) -> dict[str, Any]:
    """CE and the requested NLG metrics of generated ``preds`` against reference ``refs``.

    NLG metrics compare the whole texts as given (tags included).  Returns
    ``{"protocol", "ce", "nlg", "per_record"}``:

    * ``"strict"``: ``ce`` = :func:`clinical_efficacy`'s dict; ``nlg`` = ``{"bleu",
      "bleu_1".."bleu_4", "rouge", "meteor", "bertscore"}``; ``per_record`` = ``{"precision",
      "recall", "f1", "rouge", "meteor", "bertscore"}`` (corpus BLEU has no per-sample value).
    * ``"reference"``: ``ce`` = :func:`reference_clinical_efficacy`'s dict (with
      ``n_averaged``, without its ``per_record``); ``nlg`` = ``{"bleu", "rouge", "meteor",
      "bertscore"}``; ``per_record`` = ``{"precision", "recall", "f1", "bleu", "rouge",
      "meteor", "bertscore"}``, CE lists with ``None`` where a text has no ``<answer>``.

    ``nlg`` holds a float per available metric and an unavailable report otherwise;
    ``per_record`` lists (input order) only for metrics computed.  For several protocols
    use :func:`compute_protocols`.
    """
    if not isinstance(protocol, str):
        raise ConfigError(f"compute_all: protocol must be one of {', '.join(PROTOCOLS)}; "
                          f"for several use compute_protocols(..., protocols={tuple(protocol)!r})")
    return compute_protocols(preds, refs, protocols=(protocol,), metrics=metrics, wordnet_dir=wordnet_dir,
                             bertscore_model=bertscore_model, bertscore_layers=bertscore_layers,
                             diseases=diseases)[protocol]


def compute_protocols(
    preds: Sequence[Any],
    refs: Sequence[Any],
    *,
    protocols: Iterable[str] = PROTOCOLS,
    metrics: Iterable[str] = NLG_METRICS,
    wordnet_dir: str | os.PathLike[str] | None = None,
    bertscore_model: str | os.PathLike[str] | None = None,
    bertscore_layers: int | None = None,
    diseases: Sequence[str] = DISEASES,
) -> dict[str, dict[str, Any]]:
    """``{protocol: compute_all(..., protocol=protocol)}`` for each of ``protocols``, sharing work."""
    from .modules import BertScore, Bleu, Meteor, RougeL

    protocols = list(dict.fromkeys(protocols))
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ConfigError(f"unknown evaluation protocol(s) {bad}; allowed: {', '.join(PROTOCOLS)}")
    metrics = list(metrics)
    bad = [m for m in metrics if m not in NLG_METRICS]
    if bad:
        raise ConfigError(f"unknown metric(s) {bad}; allowed: {', '.join(NLG_METRICS)}")
    if len(preds) != len(refs):
        raise DataError(f"evaluation: {len(preds)} predictions for {len(refs)} references")
    if not len(refs):
        raise DataError("evaluation: no samples to evaluate")
    pred_texts = [completion_text(p) for p in preds]
    ref_texts = [r if isinstance(r, str) else completion_text(r) for r in refs]
    kw = {"predictions": pred_texts, "references": ref_texts}

    # the same per sample under both protocols: computed once
    meteor = bert = None
    if "meteor" in metrics:
        meteor = Meteor(wordnet_dir=wordnet_dir, keep_in_memory=True).compute(**kw)
    if "bertscore" in metrics:
        bert = BertScore(model_path=bertscore_model, num_layers=bertscore_layers, keep_in_memory=True).compute(**kw)

    out: dict[str, dict[str, Any]] = {}
    for protocol in protocols:
        strict = protocol == "strict"
        nlg: dict[str, Any] = {}
        if strict:
            ce = clinical_efficacy(pred_texts, ref_texts, diseases)
            per: dict[str, list[Any]] = per_record_scores(pred_texts, ref_texts, diseases)
        else:
            ce = reference_clinical_efficacy(pred_texts, ref_texts, diseases)
            per = ce.pop("per_record")
        if "bleu" in metrics:
            if strict:
                res = Bleu(keep_in_memory=True).compute(**kw)
                nlg.update({"bleu": res["bleu"], **{f"bleu_{n}": res[f"bleu_{n}"] for n in (1, 2, 3, 4)}})
            else:
                per["bleu"] = sentence_bleu_scores(pred_texts, ref_texts)
                nlg["bleu"] = _mean(per["bleu"])
        if "rouge" in metrics:
            if strict:
                res = RougeL(keep_in_memory=True).compute(**kw)
                nlg["rouge"], per["rouge"] = res["rouge_l"], res["rouge_l_per_record"]
            else:
                per["rouge"] = rouge_l_recall_scores(pred_texts, ref_texts)
                nlg["rouge"] = _mean(per["rouge"])
        if meteor is not None:
            nlg["meteor"] = meteor["meteor"]
            if is_available(meteor["meteor"]):
                per["meteor"] = list(meteor["meteor_per_record"])
        if bert is not None:
            part = "f1" if strict else "recall"
            nlg["bertscore"] = bert[f"bertscore_{part}"] if is_available(bert["bertscore_f1"]) else bert["bertscore_f1"]
            if is_available(bert["bertscore_f1"]):
                per["bertscore"] = list(bert[f"bertscore_{part}_per_record"])
        out[protocol] = {"protocol": protocol, "ce": ce, "nlg": nlg, "per_record": per}
    return out


def _mean(xs: list[float]) -> float:
    # left-to-right sum, as the reference accumulates its totals
    total = 0.0
    for x in xs:
        total += x
    return total / len(xs)
