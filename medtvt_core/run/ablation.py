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

from ..build import validate_run
from ..config import RunConfig
from ..data.labels import DISEASES
from ..data.manifest import read_manifest
from ..data.synth import ensure_synthetic
from ..errors import ConfigError
from ..io import atomic_write_text, write_json
from ..stats import ablation_markdown, noise_sentences, summarize_ablation, write_ablation
from .evaluation import per_record
from .orchestrator import Run
from .subsets import aggregate_subsets

__all__ = ["parse_grid", "variant_name", "run_grid", "PER_RECORD_METRICS", "PAPER_TABLES"]

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


def check_one_test_split(configs: Sequence[RunConfig]) -> None:
    """Refuse a grid whose variants could differ in their test records or in how they are read."""
    # rft_holdout only splits the training records between SFT and RFT, and val_file names the validation
    # split, so the test records stay the same and a grid may vary them (data.rft_holdout=0.3,0.5); any other
    # data field could change them or how they are read (train_file/pt_files also change statistics fitted on
    # training data and applied to test; data.synth writes one cohort for the whole grid).
    train_only = {"rft_holdout", "val_file"}
    if len({json.dumps(c.data.model_dump(mode="json", exclude=train_only), sort_keys=True) for c in configs}) > 1:
        raise ConfigError("--grid: the variants do not share one test split (their data settings differ); "
                          "vary data.* in separate ablations")


def run_grid(resolve: Callable[[dict[str, Any], list[str], str], Any], axes: list[tuple[str, list[str]]],
             seeds: Sequence[int] | None, out: Path, *, sets: Sequence[str], flags: dict[str, Any],
             progress: bool, echo: Callable[[str], None], bootstrap: bool = True,
             store: Path | None = None) -> dict[str, Any]:
    """Run every variant of ``axes`` for every seed; write ``ablation.{csv,md}`` and ``report.md``.

    ``resolve(flags, sets, output_dir)`` gives a RunConfig (the CLI's resolution); every variant's is
    validated here, before the first one runs.
    ``store``: where the shared cohort (``data/``) and stages (``stages/``) live (default: ``out``), so
    several ablations can share them.
    """
    from accelerate import PartialState

    state = PartialState()  # several processes (accelerate launch / torchrun): the main one writes
    store = Path(store) if store is not None else out

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
            if state.is_main_process:
                ensure_synthetic(store / "data", **base.data.synth.generator_options())
            state.wait_for_everyone()
            data_sets = [f"data.root={store / 'data'}"]
        run_seeds = list(seeds) if seeds else [base.seed]
        configs[name] = [resolve(kw, extra + data_sets + [f"seed={s}"],
                                 str(out / name / f"seed-{s}") if seeds else str(out / name)) for s in run_seeds]
    check_one_test_split([c for cs in configs.values() for c in cs])
    for cfgs in configs.values():
        for cfg in cfgs:
            validate_run(cfg)
    scores: dict[str, dict[int, dict[str, dict[str, float | None]]]] = {}
    metrics: dict[str, dict[int, dict[str, Any]]] = {}
    # variant -> {previous stage, last stage} -> seed -> per-record scores: what the last stage added
    by_stage: dict[str, dict[str, dict[int, dict[str, dict[str, float | None]]]]] = {}
    for name, cfgs in configs.items():
        for cfg in cfgs:
            echo(f"== variant {name}, seed {cfg.seed}")
            res = Run(cfg, resume=True, stage_store=store / "stages", progress=progress, echo=echo,
                      validated=True).execute()
            for st in cfg.stages[-2:]:
                preds = [json.loads(line) for line in
                         (Path(cfg.output_dir) / "eval" / f"{st}.jsonl").read_text().splitlines()]
                sampled = (res[st].get("reward_sampled") or {}).get("per_record")
                by_stage.setdefault(name, {}).setdefault(st, {})[cfg.seed] = per_record(preds, cfg.rewards, sampled)
            last = cfg.stages[-1]
            scores.setdefault(name, {})[cfg.seed] = by_stage[name][last][cfg.seed]
            metrics.setdefault(name, {})[cfg.seed] = res[last]
    present = {m for v in scores.values() for sc in v.values() for m in sc}
    metrics_ = [m for m in (*PER_RECORD_METRICS, "reward_sampled", *(f"named/{d}" for d in DISEASES)) if m in present]
    summary = summarize_ablation(scores, metrics=metrics_, primary="f1", bootstrap=bootstrap)
    axes_of = {variant_name(c): c for c in combos}
    extra_cols = {}
    for name, per_seed in metrics.items():
        vals = [m for m in per_seed.values()]
        nlg = lambda k: [v["nlg"].get(k) for v in vals if isinstance(v["nlg"].get(k), (int, float))]  # noqa: E731
        extra_cols[name] = {f"{k}_mean": (sum(x) / len(x) if x else None)
                            for k, x in (("auc", [v["ce"]["auc"] for v in vals if v["ce"]["auc"] is not None]),
                                         ("bleu", nlg("bleu")), ("rouge", nlg("rouge")), ("meteor", nlg("meteor")))}
    csv_path, md_path = out / "ablation.csv", out / "ablation.md"
    if not state.is_main_process:
        state.wait_for_everyone()
        return {"summary": summary, "csv": csv_path, "md": md_path}
    csv_path, md_path = write_ablation(out, summary, axes_of, extra_cols)
    tables = sorted({PAPER_TABLES.get(a, "other") for a, _ in axes} - {"other"})
    lines = ["# Ablation report", "",
             f"Variants: {', '.join(configs)}; seeds: {', '.join(str(s) for s in (seeds or [configs[next(iter(configs))][0].seed]))}; "
             f"shaped like the paper's {', '.join(t.replace('table', 'Table ') for t in tables) or 'tables'}.", "",
             "## What is distinguishable from noise", ""]
    lines += [f"- {s}" for s in noise_sentences(summary)]
    extra_metrics = [m for m in summary.metrics if m == "reward_sampled" or m.startswith("named/")]
    if extra_metrics:
        lines += ["", "## Rewards and per-disease sensitivity", "",
                  "`reward_sampled`: mean reward of sampled reports (what GRPO maximises); `named/<disease>`: share of "
                  "test records holding the disease whose greedy report names it.", ""]
        lines += [f"- {s}" for s in noise_sentences(summary, metrics=extra_metrics)]
    man = read_manifest(store / "data") if (store / "data").is_dir() else None
    if man and man.get("evidence"):
        lines += ["", "## Where the cohort puts each disease's evidence", "", "| disease | modalities | joint |",
                  "|---|---|---|"]
        for d, e in man["evidence"].items():
            lines.append(f"| {d} | {', '.join(e.get('modalities', []))} | {'yes' if e.get('joint') else 'no'} |")
    stage_md = _stage_comparison(by_stage, bootstrap)
    if stage_md:
        lines += ["", "## What the last stage added", "",
                  "Per variant, its last stage against the one before it, on the same test records and seeds "
                  "(tables: [stages.md](stages.md)).", ""]
        for name, sentences in stage_md[1].items():
            lines += [f"- `{name}`: " + " ".join(sentences)]
        atomic_write_text(out / "stages.md", stage_md[0])
    else:
        (out / "stages.md").unlink(missing_ok=True)  # never leave an earlier run's table behind
    for name, per_seed in metrics.items():  # eval.modality_subsets: the subset table over seeds
        subs = {s: m["subsets"] for s, m in per_seed.items() if m.get("subsets")}
        if subs:
            lines += ["", f"Variant `{name}`:", ""] + aggregate_subsets(subs)
    lines += ["", f"Tables: [{md_path.name}]({md_path.name}), [{csv_path.name}]({csv_path.name}).", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    write_json(out / "ablation.json", {"summary": summary.to_dict(), "metrics": metrics})
    state.wait_for_everyone()
    return {"summary": summary, "csv": csv_path, "md": md_path}


def _stage_comparison(by_stage: dict[str, dict[str, dict[int, dict[str, dict[str, float | None]]]]],
                      bootstrap: bool) -> tuple[str, dict[str, list[str]]] | None:
    """``stages.md`` (last stage vs the one before it, per variant) and the report's sentences; None when
    no variant ran two stages."""
    md, sentences = [], {}
    for name, stages in by_stage.items():
        if len(stages) < 2:
            continue
        present = {m for sc in next(iter(stages.values())).values() for m in sc}
        mets = [m for m in ("f1", "reward", "reward_sampled") if m in present]
        summ = summarize_ablation(stages, metrics=mets, primary="f1", bootstrap=bootstrap)
        md.append(ablation_markdown(summ, title=f"Stages of `{name}`"))
        prev, last = summ.variants
        if bootstrap:
            # the first sentence explains the test (the same for every variant): keep it once
            sentences[name] = noise_sentences(summ, metrics=mets)[0 if not md[1:] else 1:]
        else:  # no test, but the difference itself is still worth a line
            diffs = ", ".join(f"{m} {summ.stats[last][m].diff:+.4f}" for m in mets
                              if summ.stats[last][m].diff is not None)
            sentences[name] = [f"`{last}` minus `{prev}` (mean over seeds, no bootstrap): {diffs or 'n/a'}."]
        seeds = summ.seeds[last]
        if len(seeds) > 1 and summ.seeds[prev] == seeds:  # a change that is not there on every seed is noted as such
            per = "; ".join(
                f"{m} " + ", ".join("n/a" if a is None or b is None else f"{b - a:+.4f}"
                                    for a, b in zip(summ.stats[prev][m].per_seed, summ.stats[last][m].per_seed))
                for m in mets)
            sentences[name].append(f"Per seed ({', '.join(map(str, seeds))}), `{last}` minus `{prev}`: {per}.")
    if not md:
        return None
    return "\n".join(md), sentences
