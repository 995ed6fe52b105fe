"""Evaluation of a model on a QA split: generation (KV cache), clinical efficacy, NLG metrics,
modality weights per disease."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .config import EvalConfig

log = logging.getLogger("medtvt.eval")


@torch.no_grad()
def generate_reports(model: Any, dataset: Any, *, batch_size: int = 8, max_new_tokens: int = 600,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                     limit: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One generated report per record: ``id``, ``prompt``, ``reference``, ``prediction``,
    ``weights`` (modality -> weight, or None when the fusion does not weigh modalities)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    collate = dataset.collator()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate)
    model.eval()
    proc = model.processor
    out: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        if not batch["ids"]:
            continue
        feats = proc.generation_features(batch["prompts"])
        modal = dict(modality_mask=batch["modality_mask"], modality_inputs=batch["modality_inputs"],
                     modality_features=batch["modality_features"])
        new = model.generate(feats["input_ids"], feats["attention_mask"], **modal, do_sample=do_sample,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        texts = proc.decode(new)
        _, weights = model.modality_tokens(batch["modality_mask"], batch["modality_inputs"], batch["modality_features"])
        for i, text in enumerate(texts):
            w = None if weights is None else {m: float(weights[i, j]) for j, m in enumerate(model.modalities)
                                             if bool(batch["modality_mask"][i, j])}
            out.append({"id": batch["ids"][i], "prompt": batch["prompts"][i], "reference": batch["answers"][i],
                        "prediction": text, "weights": w})
    return out


def weights_by_disease(records: Sequence[dict[str, Any]], diseases: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean modality weight over the test samples whose reference contains each disease."""
    from .answers import answer_set

    acc: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if not r.get("weights"):
            continue
        truth = answer_set(r["reference"]) or set()
        for d in truth:
            for m, w in r["weights"].items():
                acc.setdefault(d, {}).setdefault(m, []).append(w)
    return {d: {m: sum(v) / len(v) for m, v in acc[d].items()} for d in diseases if d in acc}


def evaluate_records(records: Sequence[dict[str, Any]], cfg: EvalConfig, *, train_answers: Sequence[str] = ()) -> dict[str, Any]:
    """Clinical efficacy + NLG metrics (+ majority baseline when ``train_answers`` are given)."""
    from .data.labels import DISEASES
    from .metrics import compute_all, majority_baseline

    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    res = compute_all(preds, refs, metrics=list(cfg.metrics), wordnet_dir=cfg.wordnet_dir,
                      bertscore_model=cfg.bertscore_model, bertscore_layers=cfg.bertscore_layers)
    res["n"] = len(records)
    res["modality_weights"] = weights_by_disease(records, DISEASES)
    if train_answers:
        # Both majority-class baselines; the stronger one is what a model has to beat.
        base = {s: majority_baseline(list(train_answers), refs, strategy=s) for s in ("per_category", "most_frequent_set")}
        best = max(base, key=lambda s: base[s]["f1"])
        res["baseline"] = {**base[best], "strategy": best, "all": base}
    return res


def write_predictions(records: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
