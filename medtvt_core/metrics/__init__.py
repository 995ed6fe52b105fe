"""Offline evaluation: clinical efficacy (CE) and NLG metrics (BLEU, ROUGE-L, METEOR, BERTScore).

Metrics are ``evaluate`` modules defined in :mod:`.modules` (instantiate them; ``evaluate.load`` fetches
scripts from a hub and fails offline).  A metric whose data or weights are not available
locally reports ``{"available": False, "reason": ...}``, never a number.

>>> out = compute_all(["<think>r</think><answer>Sepsis</answer>"], ["<think>r</think><answer>Sepsis</answer>"],
...                   metrics=["rouge"])
>>> out["ce"]["f1"], out["nlg"]["rouge"]
(1.0, 1.0)
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from ..answers import DISEASES, completion_text
from ..errors import ConfigError, DataError
from .base import is_available, unavailable
from .clinical import clinical_efficacy, majority_baseline
from .wordnet import load_wordnet

__all__ = [
    "compute_all", "clinical_efficacy", "majority_baseline", "NLG_METRICS",
    "Bleu", "RougeL", "Meteor", "BertScore", "ClinicalEfficacy",
    "load_wordnet", "unavailable", "is_available",
]

#: names accepted in ``compute_all(metrics=...)``
NLG_METRICS = ("bleu", "rouge", "meteor", "bertscore")

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
    metrics: Iterable[str] = NLG_METRICS,
    wordnet_dir: str | os.PathLike[str] | None = None,
    bertscore_model: str | os.PathLike[str] | None = None,
    bertscore_layers: int | None = None,
    diseases: Sequence[str] = DISEASES,
) -> dict[str, Any]:
    """CE and the requested NLG metrics of generated ``preds`` against reference ``refs``.

    NLG metrics compare the whole texts as given (tags included).  Returns
    ``{"ce": clinical_efficacy(...), "nlg": {"bleu", "bleu_1".."bleu_4", "rouge", "meteor",
    "bertscore"}}`` with a float per available metric and an unavailable report otherwise.
    """
    from .modules import BertScore, Bleu, Meteor, RougeL

    metrics = list(metrics)
    bad = [m for m in metrics if m not in NLG_METRICS]
    if bad:
        raise ConfigError(f"unknown metric(s) {bad}; allowed: {', '.join(NLG_METRICS)}")
    if len(preds) != len(refs):
        raise DataError(f"evaluation: {len(preds)} predictions for {len(refs)} references")
    pred_texts = [completion_text(p) for p in preds]
    ref_texts = [r if isinstance(r, str) else completion_text(r) for r in refs]
    out: dict[str, Any] = {"ce": clinical_efficacy(pred_texts, ref_texts, diseases), "nlg": {}}
    nlg = out["nlg"]
    kw = {"predictions": pred_texts, "references": ref_texts}
    if "bleu" in metrics:
        res = Bleu(keep_in_memory=True).compute(**kw)
        nlg.update({"bleu": res["bleu"], **{f"bleu_{n}": res[f"bleu_{n}"] for n in (1, 2, 3, 4)}})
    if "rouge" in metrics:
        nlg["rouge"] = RougeL(keep_in_memory=True).compute(**kw)["rouge_l"]
    if "meteor" in metrics:
        nlg["meteor"] = Meteor(wordnet_dir=wordnet_dir, keep_in_memory=True).compute(**kw)["meteor"]
    if "bertscore" in metrics:
        nlg["bertscore"] = BertScore(model_path=bertscore_model, num_layers=bertscore_layers,
                                     keep_in_memory=True).compute(**kw)["bertscore_f1"]
    return out
