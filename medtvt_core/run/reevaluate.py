"""``medtvt eval``: a saved model or a run's stage evaluated again, on its test split or another one;
with ``--run`` the run's ``metrics.json`` and ``report.md`` are updated (module above evaluation,
subsets, attribution and report, so that those need not know it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..config import resolve_config
from ..data.cache import FeatureCache, encode_dataset
from ..data.dataset import open_splits
from ..data.manifest import read_manifest
from ..io import write_json
from ..metrics.display import undefined_reasons
from ..training.arguments import resolve_device
from .attribution import dataset_attribution, gate_check
from .diagnose import load_model_dir, model_dir_of_run
from .evaluation import evaluate_model
from .report import write_report
from .subsets import subsets_of_config

__all__ = ["evaluate_saved"]


def evaluate_saved(*, run_dir: Path | None = None, stage: str | None = None, model_dir: Path | None = None,
                   data_root: Path | None = None, split: str = "test", sets: Sequence[str] = (),
                   progress: bool = True) -> dict[str, Any]:
    """``medtvt eval``: a saved model (``model_dir``, or the stage of ``run_dir``) on a split.

    With ``run_dir`` the run's own test split, feature cache and evaluation settings are used (so
    the numbers of its ``metrics.json`` are reproduced, the last stage's attributions included) and its
    ``metrics.json`` is updated.
    """
    if run_dir is not None:
        cfg = resolve_config(config_file=Path(run_dir) / "config.yaml", sets=list(sets))
        model_dir = model_dir_of_run(Path(run_dir), stage)
        root = Path(cfg.data.root) if cfg.data.root is not None else Path(run_dir) / "data"
        train_file, test_file = cfg.data.train_file, cfg.data.test_file
        cache_dir = (cfg.data.cache_dir or Path(run_dir) / "cache") if cfg.data.use_cache else None
    else:
        cfg = resolve_config(sets=list(sets))
        root = Path(data_root)
        qa = (read_manifest(root) or {}).get("qa") or {}
        test_file = qa.get(split) or f"qa/disease_{split}.json"
        train_file = qa.get("train") if split != "train" else None
        cache_dir = None
    model, processor = load_model_dir(Path(model_dir))

    model.to(resolve_device(cfg.device))
    train_file = train_file if train_file and (root / train_file).is_file() else None
    splits = open_splits(root, modalities=processor.readers, train_file=train_file, test_file=test_file,
                         on_bad_sample=cfg.data.on_bad_sample, fit_stats=False, persist_stats=False)
    test = splits["test"]
    if cache_dir is not None:
        test.attach_cache(dict(model.encoders), FeatureCache(cache_dir))
        encode_dataset(test, batch_size=32)
    stage = stage or Path(model_dir).parent.name
    # An evaluation with fewer modalities, or decoded under the report grammar, is kept apart: it never
    # replaces the run's own numbers (metrics.json by_modalities / constrained_decoding, its own predictions).
    mods = None if cfg.eval.modalities is None else "+".join(m for m in test.modality_names if m in cfg.eval.modalities)
    constrained = cfg.eval.constrained_decoding
    pred_name = f"{stage}{'-' + mods if mods else ''}{'-constrained' if constrained else ''}.jsonl"
    records: list[dict[str, Any]] = []
    res = evaluate_model(model, processor, test, cfg.eval, rewards=cfg.rewards,
                         train_answers=[r.answer for r in splits["train"].records] if "train" in splits else (),
                         predictions_path=(Path(run_dir) / "eval" / pred_name) if run_dir else None,
                         progress=progress, sampling=cfg.rft, seed=cfg.seed, records_out=records)
    if run_dir is not None and cfg.eval.attribution and stage == cfg.stages[-1] and len(model.modalities) > 1:
        masked = test if mods is None else test.masked(withheld=[m for m in test.modality_names if m not in cfg.eval.modalities])
        res["attribution"] = dataset_attribution(model, processor, masked, batch_size=cfg.eval.batch_size,
                                                 max_new_tokens=cfg.eval.max_new_tokens, limit=cfg.eval.limit,
                                                 constrain=cfg.eval.constrained_decoding)
        res["gate_check"] = gate_check(res.get("modality_weights") or {}, res["attribution"])
    if cfg.eval.modality_subsets:
        res["subsets"] = subsets_of_config(model, processor, test, cfg, full_records=records, data_root=root,
                                           progress=progress)
    if run_dir is not None:
        path = Path(run_dir) / "metrics.json"
        summary = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        if constrained:
            summary.setdefault("constrained_decoding", {}).setdefault(mods or "all", {})[stage] = res
        elif mods is None:
            summary.setdefault("stages", {})[stage] = res
            if "baseline" in res:
                summary["baseline"] = res["baseline"]
        else:
            summary.setdefault("by_modalities", {}).setdefault(mods, {})[stage] = res
        write_json(path, summary)
        if mods is None and not constrained and res.get("subsets"):  # report.md shows the new table
            hist = Path(run_dir) / "history.json"
            write_report(Path(run_dir), cfg, summary, json.loads(hist.read_text()) if hist.is_file() else {})
    ce = res["ce"]
    out = {"model": str(model_dir), "stage": stage, "f1": ce["f1"], "precision": ce["precision"],
           "recall": ce["recall"], "auc": ce["auc"], "n": res["n"], "nlg": res["nlg"], "reward": res.get("reward"),
           "reward_sampled": {k: v for k, v in (res.get("reward_sampled") or {}).items() if k != "per_record"} or None,
           "baseline_f1": res.get("baseline", {}).get("f1"), "protocol": res["protocol"],
           "modalities": res["modalities"],
           # null metrics above with the reason (e.g. the reference protocol's F1 when no report has an <answer>)
           "undefined": undefined_reasons(ce)}
    if res.get("subsets"):
        out["subsets"] = {n: {"f1": r["f1"], "answer_rate": r["answer_rate"], "reward": r["reward"],
                              "evidence_f1": r.get("evidence_f1"), "evidence_f1_all": r.get("evidence_f1_all")}
                          for n, r in res["subsets"]["rows"].items()}
    return out
