"""``medtvt ablate`` and ``medtvt run --seeds``: variants x seeds, shared stages, tables with intervals.

Every variant runs once per seed (``<out>/<variant>/seed-<s>``); stages are shared through one
stage store (``<out>/stages``, keyed by everything a stage depends on, the seed included), and
one synthetic cohort (``<out>/data``) gives every variant and seed the same test split, so the
comparison is paired by test record.  The tables (:mod:`medtvt_core.stats`) give per variant and
metric the mean and std over seeds, a 95% paired bootstrap CI over test records and a paired
test against the first variant.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError

__all__ = ["parse_grid", "variant_name", "per_record", "run_grid", "PER_RECORD_METRICS", "PAPER_TABLES"]

PAPER_TABLES = {"stages": "table1", "fusion": "table3", "modalities": "table3"}
#: Per-record scores the tables summarise (F1/precision/recall of the strict protocol, rewards).
PER_RECORD_METRICS = ("f1", "precision", "recall", "reward")
FLAG_AXES = ("fusion", "modalities", "stages", "rewards")


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    out = []
    for s in specs:
        if "=" not in s:
            raise ConfigError(f"--grid {s!r}: expected AXIS=V1,V2,... with AXIS in fusion, modalities, stages, or any config key")
        axis, vals = s.split("=", 1)
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {s!r}: no values")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {s!r}: a value is listed twice")
        out.append((axis.strip(), values))
    return out


def variant_name(combo: dict[str, str]) -> str:
    return "__".join(f"{k.replace('.', '-')}-{v.replace('+', '_')}" for k, v in combo.items()) or "base"


def per_record(records: Sequence[dict[str, Any]], rewards: Sequence[Any]) -> dict[str, dict[str, float | None]]:
    """``{metric: {record id: score}}`` of one run's predictions: the strict protocol's per-sample
    precision/recall/F1 and the weighted sum of the run's rewards."""
    from ..metrics.clinical import _per_sample, pred_sets, ref_sets
    from .evaluation import reward_values

    ids = [r["id"] for r in records]
    per = [_per_sample(a, b) for a, b in zip(pred_sets(r["prediction"] for r in records),
                                             ref_sets(r["reference"] for r in records))]
    p, rc, f = ([x[i] for x in per] for i in range(3))
    total = reward_values(records, rewards)
    return {"f1": dict(zip(ids, f)), "precision": dict(zip(ids, p)), "recall": dict(zip(ids, rc)),
            "reward": dict(zip(ids, total))}


def run_grid(resolve: Callable[[dict[str, Any], list[str], str], Any], axes: list[tuple[str, list[str]]],
             seeds: Sequence[int] | None, out: Path, *, sets: Sequence[str], flags: dict[str, Any],
             progress: bool, echo: Callable[[str], None], bootstrap: bool = True) -> dict[str, Any]:
    """Run every variant of ``axes`` for every seed; write ``ablation.{csv,md}`` and ``report.md``.

    ``resolve(flags, sets, output_dir)`` gives a validated RunConfig (the CLI's resolution).
    """
    from ..data.synth import ensure_synthetic
    from ..stats import noise_sentences, summarize_ablation, write_ablation
    from .orchestrator import Run, write_json

    combos = [dict(zip([a for a, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
    configs: dict[str, list[Any]] = {}
    data_sets: list[str] = []
    for combo in combos:
        kw, extra = dict(flags), list(sets)
        for axis, v in combo.items():
            if axis in FLAG_AXES:
                kw[axis] = v
            else:
                extra.append(f"{axis}={v}")
        name = variant_name(combo)
        base = resolve(kw, extra, str(out / name))
        if not data_sets and base.data.root is None and not any(s.startswith("data.root=") for s in sets):
            # One cohort for the whole grid: the variants share the test split (paired comparison).
            ensure_synthetic(out / "data", **base.data.synth.generator_options())
            data_sets = [f"data.root={out / 'data'}"]
        run_seeds = list(seeds) if seeds else [base.seed]
        configs[name] = [resolve(kw, extra + data_sets + [f"seed={s}"],
                                 str(out / name / f"seed-{s}") if seeds else str(out / name)) for s in run_seeds]
    tests = {name: {json.dumps(c.data.model_dump(mode="json"), sort_keys=True) for c in cs} for name, cs in configs.items()}
    if len({t for ts in tests.values() for t in ts}) > 1:
        raise ConfigError("--grid: the variants do not share one test split (their data settings differ); "
                          "vary data.* in separate ablations")
    scores: dict[str, dict[int, dict[str, dict[str, float | None]]]] = {}
    metrics: dict[str, dict[int, dict[str, Any]]] = {}
    for name, cfgs in configs.items():
        for cfg in cfgs:
            echo(f"== variant {name}, seed {cfg.seed}")
            res = Run(cfg, resume=True, stage_store=out / "stages", progress=progress, echo=echo).execute()
            last = cfg.stages[-1]
            preds = [json.loads(line) for line in (Path(cfg.output_dir) / "eval" / f"{last}.jsonl").read_text().splitlines()]
            scores.setdefault(name, {})[cfg.seed] = per_record(preds, cfg.rewards)
            metrics.setdefault(name, {})[cfg.seed] = res[last]
    summary = summarize_ablation(scores, metrics=list(PER_RECORD_METRICS), primary="f1", bootstrap=bootstrap)
    axes_of = {variant_name(c): c for c in combos}
    extra_cols = {}
    for name, per_seed in metrics.items():
        vals = [m for m in per_seed.values()]
        nlg = lambda k: [v["nlg"].get(k) for v in vals if isinstance(v["nlg"].get(k), (int, float))]  # noqa: E731
        extra_cols[name] = {f"{k}_mean": (sum(x) / len(x) if x else None)
                            for k, x in (("auc", [v["ce"]["auc"] for v in vals if v["ce"]["auc"] is not None]),
                                         ("bleu", nlg("bleu")), ("rouge", nlg("rouge")), ("meteor", nlg("meteor")))}
    csv_path, md_path = write_ablation(out, summary, axes_of, extra_cols)
    tables = sorted({PAPER_TABLES.get(a, "other") for a, _ in axes} - {"other"})
    lines = ["# Ablation report", "",
             f"Variants: {', '.join(configs)}; seeds: {', '.join(str(s) for s in (seeds or [configs[next(iter(configs))][0].seed]))}; "
             f"shaped like the paper's {', '.join(t.replace('table', 'Table ') for t in tables) or 'tables'}.", "",
             "## What is distinguishable from noise", ""]
    lines += [f"- {s}" for s in noise_sentences(summary)]
    lines += ["", f"Tables: [{md_path.name}]({md_path.name}), [{csv_path.name}]({csv_path.name}).", ""]
    (out / "report.md").write_text("\n".join(lines))
    write_json(out / "ablation.json", {"summary": summary.to_dict(), "metrics": metrics})
    return {"summary": summary, "csv": csv_path, "md": md_path}
