"""Evaluation of a model on a QA split: generation (KV cache), clinical efficacy, NLG metrics,
mean rewards and modality weights per disease.

With several processes each generates a shard of the records and the main process gathers them
(``accelerate.utils.gather_object``), so every rank returns the same result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..answers import answer_set
from ..config import EvalConfig
from ..data.labels import DISEASES
from ..errors import ConfigError
from ..io import atomic_write_text
from ..metrics import compute_protocols, majority_baseline
from ..metrics.clinical import _per_sample, pred_sets, ref_sets
from ..model import generation
from ..model.sampling import SeededRowSampler, row_generators
from ..plugin_calls import call_rewards
from ..plugins import Catalog, get_catalog

log = logging.getLogger("medtvt.eval")

__all__ = ["dataset_reports", "evaluate_records", "evaluate_model", "mean_rewards", "reward_values", "weights_by_disease",
           "write_predictions", "per_record"]


@torch.no_grad()
def dataset_reports(model: Any, processor: Any, dataset: Any, *, batch_size: int = 8, max_new_tokens: int = 600,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                    limit: int | None = None, progress: bool = True, constrain: bool = False) -> list[dict[str, Any]]:
    """One report per record of ``dataset`` (each batch through :func:`~medtvt_core.model.generation.
    generate_reports`): ``id``, ``prompt``, ``reference``, ``prediction``, ``weights`` (modality ->
    weight, or None when the fusion does not weigh modalities)."""
    from accelerate import PartialState

    state = PartialState()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(n))[state.process_index::state.num_processes]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         shuffle=False, collate_fn=dataset.collator())
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="eval", disable=not progress or not state.is_main_process, leave=False):
        if not batch["ids"]:
            continue
        texts = generation.generate_reports(model, processor, batch, do_sample=do_sample, temperature=temperature,
                                            top_p=top_p, max_new_tokens=max_new_tokens, constrain=constrain).texts
        _, weights = model.modality_tokens(batch["modality_mask"], batch["modality_inputs"], batch["modality_features"])
        for i, text in enumerate(texts):
            w = None if weights is None else {m: float(weights[i, j]) for j, m in enumerate(model.modalities)
                                             if bool(batch["modality_mask"][i, j])}
            records.append({"id": batch["ids"][i], "prompt": batch["prompts"][i], "reference": batch["answers"][i],
                            "prediction": text, "weights": w})
    model.train(was_training)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        # Every rank's list, in rank order; then the dataset order (ids are unique).
        rank_of = {dataset.records[i].id: i for i in range(n)}
        records = sorted(gather_object(records), key=lambda r: rank_of[r["id"]])
    return records


def weights_by_disease(records: Sequence[dict[str, Any]], diseases: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean modality weight over the test samples whose reference contains each disease."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if not r.get("weights"):
            continue
        truth = answer_set(r["reference"]) or set()
        for d in truth:
            for m, w in r["weights"].items():
                acc.setdefault(d, {}).setdefault(m, []).append(w)
    return {d: {m: sum(v) / len(v) for m, v in acc[d].items()} for d in diseases if d in acc}


def _reward_columns(records: Sequence[dict[str, Any]], rewards: Sequence[Any], catalog: Catalog) -> list[list[float | None]]:
    """Per reward, its value on each record (None: undefined), scored as in RFT (plugin_calls.call_rewards)."""
    if not rewards:
        return []
    scores = call_rewards([catalog.rewards.spec(rr.name) for rr in rewards], [r["prompt"] for r in records],
                          [r["prediction"] for r in records], answer=[r["reference"] for r in records],
                          ids=[r.get("id", i) for i, r in enumerate(records)], catalog=catalog, dtype=torch.float64)
    return [[None if v != v else v for v in col] for col in scores.t().tolist()]


def reward_values(records: Sequence[dict[str, Any]], rewards: Sequence[Any], catalog: Catalog | None = None) -> list[float | None]:
    """Per record, the weighted sum of the rewards (``None`` where every reward is undefined)."""
    if catalog is None:
        catalog = get_catalog()
    cols = [(rr.weight, c) for rr, c in zip(rewards, _reward_columns(records, rewards, catalog))]
    out: list[float | None] = []
    for i in range(len(records)):
        vals = [(w, c[i]) for w, c in cols if c[i] is not None]
        out.append(sum(w * v for w, v in vals) if vals else None)
    return out


def mean_rewards(records: Sequence[dict[str, Any]], rewards: Sequence[Any], catalog: Catalog | None = None) -> dict[str, float]:
    """Mean of each configured reward on the reports, and their weighted ``total``."""
    if catalog is None:
        catalog = get_catalog()
    out: dict[str, float] = {}
    total = 0.0
    for rr, col in zip(rewards, _reward_columns(records, rewards, catalog)):
        vals = [v for v in col if v is not None]
        out[rr.name] = sum(vals) / max(len(vals), 1)
        total += rr.weight * out[rr.name]
    out["total"] = total
    return out


def evaluate_records(records: Sequence[dict[str, Any]], cfg: EvalConfig, *, train_answers: Sequence[str] = ()) -> dict[str, Any]:
    """Clinical efficacy + NLG metrics under ``cfg.protocols`` (+ majority baseline when ``train_answers``
    are given; the baseline is scored with the strict protocol)."""
    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    by = compute_protocols(preds, refs, protocols=list(cfg.protocols), metrics=list(cfg.metrics),
                           wordnet_dir=cfg.wordnet_dir, bertscore_model=cfg.bertscore_model,
                           bertscore_layers=cfg.bertscore_layers)
    primary = cfg.protocols[0]
    # ce/nlg: the primary protocol's numbers; every protocol's under by_protocol (each says which it is).
    res: dict[str, Any] = {"protocol": primary, "ce": by[primary]["ce"], "nlg": by[primary]["nlg"],
                           "by_protocol": {p: {"protocol": p, "ce": r["ce"], "nlg": r["nlg"]} for p, r in by.items()}}
    res["n"] = len(records)
    res["modality_weights"] = weights_by_disease(records, DISEASES)
    if train_answers:
        # Both majority-class baselines; the stronger one is what a model has to beat.
        base = {s: majority_baseline(list(train_answers), refs, strategy=s) for s in ("per_category", "most_frequent_set")}
        best = max(base, key=lambda s: base[s]["f1"])
        res["baseline"] = {**base[best], "strategy": best, "all": base}
    return res


@torch.no_grad()
def sampled_rewards(model: Any, processor: Any, dataset: Any, rewards: Sequence[Any], *, samples: int,
                    temperature: float, top_p: float, max_new_tokens: int, batch_size: int = 8, seed: int = 0,
                    limit: int | None = None, constrain: bool = False) -> dict[str, Any]:
    """Mean rewards of ``samples`` sampled reports per record (what GRPO maximises), each row drawn
    from its own generator seeded by (seed, record id, row): the same numbers whatever the batching.

    Returns ``{"samples", "temperature", "top_p", <reward name>: mean, "total": weighted mean,
    "per_record": {id: mean weighted total of its samples}}``.
    """
    cat = get_catalog()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         shuffle=False, collate_fn=dataset.collator())
    was = model.training
    model.eval()
    scored: list[dict[str, str]] = []
    per_record: dict[str, float | None] = {}
    for batch in loader:
        if not batch["ids"]:
            continue
        gens = row_generators(seed, batch["ids"], samples, "eval")
        # Sampling is the seeded per-row sampler's (temperature and top-p applied there, as in GRPO).
        texts = generation.generate_reports(model, processor, batch, do_sample=True, num_return_sequences=samples,
                                            max_new_tokens=max_new_tokens,
                                            logits_processor=[SeededRowSampler(gens, temperature=temperature,
                                                                               top_p=top_p, max_steps=max_new_tokens)],
                                            constrain=constrain).texts
        rows = [{"id": batch["ids"][i // samples], "prompt": batch["prompts"][i // samples],
                 "reference": batch["answers"][i // samples], "prediction": t}
                for i, t in enumerate(texts)]  # record-major, as row_generators
        scored.extend(rows)
        totals = reward_values(rows, rewards, cat)  # the greedy rule: None where every reward is undefined
        for i, rid in enumerate(batch["ids"]):
            mine = [t for t in totals[i * samples:(i + 1) * samples] if t is not None]
            per_record[rid] = sum(mine) / len(mine) if mine else None
    model.train(was)
    out: dict[str, Any] = {"samples": samples, "temperature": temperature, "top_p": top_p}
    out.update(mean_rewards(scored, rewards, cat))  # per reward and "total", as the greedy ``reward``
    out["per_record"] = per_record
    return out


def evaluate_model(model: Any, processor: Any, dataset: Any, cfg: EvalConfig, *, rewards: Sequence[Any] = (),
                   train_answers: Sequence[str] = (), predictions_path: Path | None = None,
                   progress: bool = True, sampling: Any = None, seed: int = 0,
                   records_out: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Generate the split's reports, write them to ``predictions_path`` (JSON lines) and score them.

    ``sampling`` (an ``RFTConfig``): also the mean rewards of ``cfg.sampled_reward_samples`` sampled
    reports per record at its temperature and top-p (``reward_sampled``). ``records_out`` receives the
    generated reports. With ``cfg.modalities`` the others are absent (``modalities`` in the result)."""
    if cfg.modalities is not None:
        unknown = [m for m in cfg.modalities if m not in dataset.modality_names]
        if unknown:
            raise ConfigError(f"eval.modalities: the model has no {unknown[0]!r} modality "
                              f"(modalities: {', '.join(dataset.modality_names)})")
        dataset = dataset.masked(withheld=[m for m in dataset.modality_names if m not in cfg.modalities])
    records = dataset_reports(model, processor, dataset, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                              do_sample=cfg.do_sample, limit=cfg.limit, progress=progress,
                              constrain=cfg.constrained_decoding)
    if predictions_path is not None:
        write_predictions(records, predictions_path)
    if records_out is not None:
        records_out.extend(records)
    res = evaluate_records(records, cfg, train_answers=train_answers)
    res["modalities"] = [m for m in dataset.modality_names if m not in dataset.withheld]
    if cfg.constrained_decoding:  # the numbers of diagnose's decoding, not of the model as it writes
        res["constrained_decoding"] = True
    if rewards:
        res["reward"] = mean_rewards(records, rewards)
        if sampling is not None and cfg.sampled_reward_samples:
            res["reward_sampled"] = sampled_rewards(
                model, processor, dataset, rewards, samples=cfg.sampled_reward_samples,
                temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=cfg.max_new_tokens,
                batch_size=max(1, cfg.batch_size // cfg.sampled_reward_samples), seed=seed, limit=cfg.limit,
                constrain=cfg.constrained_decoding)
    return res


def write_predictions(records: Sequence[dict[str, Any]], path: Path) -> None:
    """JSON lines, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def per_record(records: Sequence[dict[str, Any]], rewards: Sequence[Any],
               sampled: dict[str, float] | None = None) -> dict[str, dict[str, float | None]]:
    """``{metric: {record id: score}}`` of one run's predictions: the strict protocol's per-sample
    precision/recall/F1, the weighted sum of the run's rewards on the greedy report, the mean
    reward of the sampled reports (``sampled``, when evaluated), and per disease ``named/<d>``:
    1 if the report names ``d``, 0 if not, for records whose reference holds ``d`` (undefined for
    the others), i.e. each disease's sensitivity as a per-record score."""
    ids = [r["id"] for r in records]
    preds, refs = pred_sets(r["prediction"] for r in records), ref_sets(r["reference"] for r in records)
    per = [_per_sample(a, b) for a, b in zip(preds, refs)]
    p, rc, f = ([x[i] for x in per] for i in range(3))
    out: dict[str, dict[str, float | None]] = {
        "f1": dict(zip(ids, f)), "precision": dict(zip(ids, p)), "recall": dict(zip(ids, rc)),
        "reward": dict(zip(ids, reward_values(records, rewards)))}
    if sampled:
        out["reward_sampled"] = {i: sampled.get(i) for i in ids}
    for d in DISEASES:
        out[f"named/{d}"] = {i: (float(d in pr) if d in rf else None) for i, pr, rf in zip(ids, preds, refs)}
    return out
