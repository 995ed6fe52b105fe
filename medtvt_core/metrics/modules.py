"""Offline metrics as ``evaluate`` modules (instantiate the class; never ``evaluate.load``).

All take one reference string per prediction; scores lie in [0, 1].  Importing this module
imports ``evaluate`` (slow: it pulls in transformers), so the package loads it lazily.

* :class:`ClinicalEfficacy`: :func:`medtvt_core.metrics.clinical.clinical_efficacy`.
* :class:`Bleu`: sacrebleu corpus BLEU (13a tokenizer, lowercased, sacrebleu's default
  ``exp`` smoothing), cumulative BLEU-1..4 as in radiology-report papers; ``bleu`` = BLEU-4.
* :class:`RougeL`: rouge_score ROUGE-L F-measure (its default tokenizer, no stemming),
  mean over samples.
* :class:`Meteor`: nltk ``meteor_score`` (default parameters) on ``wordpunct_tokenize``
  tokens, mean over samples; needs a local WordNet (:mod:`.wordnet`).  These are also the
  reference's METEOR settings.
* :class:`BertScore`: bert_score F1 (also P/R), mean over samples; needs a local checkpoint.

Per-sample metrics also return their per-sample values (``*_per_record`` lists, input order).

A metric that lacks its data or weights returns ``{"available": False, "reason": ...}``
instead of a number.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import datasets
import evaluate

from ..answers import DISEASES
from .base import is_available, unavailable
from .clinical import clinical_efficacy
from .wordnet import load_wordnet

__all__ = ["Bleu", "RougeL", "Meteor", "BertScore", "ClinicalEfficacy"]

_FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})
_INPUTS = """
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
"""


def _info(description: str, citation: str = "", urls: tuple[str, ...] = ()) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(description=description, citation=citation, inputs_description=_INPUTS,
                               features=_FEATURES, reference_urls=list(urls))


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


class Bleu(evaluate.Metric):
    """Corpus BLEU-1..4 (sacrebleu, lowercased 13a tokens) -> ``bleu`` (= BLEU-4), ``bleu_1``..``bleu_4``."""

    def _info(self) -> evaluate.MetricInfo:
        return _info(self.__doc__ or "", urls=("https://github.com/mjpost/sacrebleu",))

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        from sacrebleu.metrics import BLEU

        out: dict[str, Any] = {}
        for n in (1, 2, 3, 4):
            res = BLEU(lowercase=True, max_ngram_order=n).corpus_score(list(predictions), [list(references)])
            out[f"bleu_{n}"] = res.score / 100.0
            if n == 4:
                out["precisions"] = [p / 100.0 for p in res.precisions]
                out["brevity_penalty"] = res.bp
        out["bleu"] = out["bleu_4"]
        return out


class RougeL(evaluate.Metric):
    """ROUGE-L (rouge_score, no stemming) -> mean ``rouge_l`` F-measure, ``_precision``, ``_recall``, ``_per_record`` (F)."""

    def _info(self) -> evaluate.MetricInfo:
        return _info(self.__doc__ or "", urls=("https://github.com/google-research/google-research/tree/master/rouge",))

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(ref, pred)["rougeL"] for pred, ref in zip(predictions, references)]
        return {
            "rouge_l": _mean([s.fmeasure for s in scores]),
            "rouge_l_precision": _mean([s.precision for s in scores]),
            "rouge_l_recall": _mean([s.recall for s in scores]),
            "rouge_l_per_record": [float(s.fmeasure) for s in scores],
        }


class Meteor(evaluate.Metric):
    """METEOR (nltk, WordNet synonyms) -> mean ``meteor``, ``meteor_per_record``; unavailable without WordNet.

    ``Meteor(wordnet_dir=None)``: see :func:`medtvt_core.metrics.wordnet.load_wordnet`.
    """

    def __init__(self, wordnet_dir: str | os.PathLike[str] | None = None, **kwargs: Any):
        self.wordnet_dir = wordnet_dir
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return _info(self.__doc__ or "", urls=("https://www.nltk.org/api/nltk.translate.meteor_score.html",))

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        handle, source = load_wordnet(self.wordnet_dir)
        if handle is None:
            return {"meteor": unavailable(source)}
        from nltk.tokenize import wordpunct_tokenize
        from nltk.translate.meteor_score import meteor_score

        with handle.authorised() as wn:
            scores = [meteor_score([wordpunct_tokenize(ref)], wordpunct_tokenize(pred), wordnet=wn)
                      for pred, ref in zip(predictions, references)]
        return {"meteor": _mean(scores), "meteor_per_record": [float(x) for x in scores], "wordnet": source}


class BertScore(evaluate.Metric):
    """BERTScore (bert_score, local checkpoint) -> mean ``bertscore_f1`` / ``_precision`` / ``_recall``.

    Per sample: ``bertscore_f1_per_record``, ``bertscore_precision_per_record``,
    ``bertscore_recall_per_record``.

    ``BertScore(model_path=None, num_layers=None, batch_size=16, device=None)``: ``model_path``
    is a local Hugging Face checkpoint folder; ``num_layers`` defaults to bert_score's tuned
    layer when the folder is named like a model it knows (``roberta-large`` -> 17).  No IDF
    weighting, no baseline rescaling.  Unavailable without a local model.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, num_layers: int | None = None,
                 batch_size: int = 16, device: str | None = None, **kwargs: Any):
        self.model_path = model_path
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.device = device
        self._scorer: Any = None
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return _info(self.__doc__ or "", urls=("https://github.com/Tiiiger/bert_score",))

    def _load(self) -> Any:
        """The bert_score scorer, or an :func:`unavailable` report."""
        if self._scorer is not None:
            return self._scorer
        if self.model_path is None:
            return unavailable("no local BERTScore model: pass bertscore_model=<checkpoint dir> "
                               "(e.g. a copy of roberta-large) and bertscore_layers")
        path = Path(self.model_path)
        if not (path / "config.json").is_file():
            return unavailable(f"bertscore_model={str(path)!r} is not a local checkpoint folder (no config.json)")
        try:
            import bert_score
            from bert_score.utils import model2layers
        except ImportError:
            return unavailable("bert-score is not installed (pip install bert-score)")
        layers = self.num_layers or model2layers.get(path.name)
        if layers is None:
            return unavailable(f"bertscore_layers not given and {path.name!r} is not a model bert_score knows")
        try:
            self._scorer = bert_score.BERTScorer(model_type=str(path), num_layers=int(layers),
                                                 batch_size=self.batch_size, device=self.device)
        except (OSError, ValueError, KeyError, AssertionError) as exc:
            return unavailable(f"could not load BERTScore model {str(path)!r}: {type(exc).__name__}: {exc}")
        return self._scorer

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        scorer = self._load()
        if not is_available(scorer):
            return {"bertscore_f1": scorer}
        p, r, f = scorer.score(list(predictions), list(references))
        return {"bertscore_f1": float(f.mean()), "bertscore_precision": float(p.mean()),
                "bertscore_recall": float(r.mean()), "bertscore_model": str(self.model_path),
                "bertscore_f1_per_record": f.tolist(), "bertscore_precision_per_record": p.tolist(),
                "bertscore_recall_per_record": r.tolist()}


class ClinicalEfficacy(evaluate.Metric):
    """Clinical efficacy (:func:`clinical_efficacy`) as an ``evaluate`` module: ``ClinicalEfficacy(diseases=...)``."""

    def __init__(self, diseases: Sequence[str] = DISEASES, **kwargs: Any):
        self.diseases = tuple(diseases)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return _info(self.__doc__ or "")

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        return clinical_efficacy(predictions, references, self.diseases)
