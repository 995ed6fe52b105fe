"""``medtvt run``, ``eval``, ``ablate`` and ``diagnose``."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from medtvt_core.errors import ConfigError

from .common import config_options, resolve_from_cli


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()


@click.command("run")
@config_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def run_cmd(preset, config_file, fusion, modalities, rewards, stages, output_dir, sets, resume, quiet, verbose) -> None:
    """Train PT -> SFT -> RFT and evaluate, from one configuration.

    \b
    Examples:
      medtvt run --preset demo                         # synthetic cohort, tiny models, CPU, minutes
      medtvt run --preset demo --fusion cmha --out runs/cmha
      medtvt run --preset demo --modalities cxr,lab    # ablate the ECG
      medtvt run --config my.yaml --set rft.num_generations=4
      accelerate launch --config_file examples/accelerate/ddp.yaml -m medtvt_cli.main run --preset paper ...

    The run directory (--out) receives config.yaml, per-stage checkpoints, metrics.json and report.md.
    """
    from medtvt_core.orchestrator import Run

    _logging(verbose)
    cfg = resolve_from_cli(preset, config_file, fusion, modalities, rewards, stages, output_dir, sets, default_preset="demo")
    Run(cfg, resume=resume, progress=not quiet, echo=click.echo).execute()


@click.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="Run directory.")
@click.option("--stage", type=click.Choice(["pt", "sft", "rft"]), help="Stage checkpoint to evaluate (default: the last).")
@click.option("--set", "sets", multiple=True, metavar="eval.KEY=VALUE", help="Evaluation overrides, e.g. eval.limit=20.")
@click.option("--quiet", is_flag=True)
def eval_cmd(run_dir: str, stage: str | None, sets: tuple[str, ...], quiet: bool) -> None:
    """Evaluate a stage of a finished run on its test split (CE + NLG metrics)."""
    from medtvt_core.config import resolve_config
    from medtvt_core.orchestrator import FINAL, Run

    _logging(False)
    bad = [s for s in sets if not s.startswith("eval.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: medtvt eval only takes eval.* overrides")
    cfg = resolve_config(config_file=Path(run_dir) / "config.yaml", sets=list(sets))
    stage = stage or cfg.stages[-1]
    # stdout carries the JSON summary only: what rebuilding the model prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        r = Run(cfg, resume=True, progress=not quiet, echo=click.echo)
        r.setup(check_config=False)
        final = r._stage_dir(stage) / FINAL
        if not (final / "config.json").is_file():
            raise ConfigError(f"stage {stage!r} of {run_dir} has no completed checkpoint ({final})")
        r.load_stage_result(stage)
        r.model.configure_trainable(stage)  # sets whether fusion runs (not in PT)
        res = r.evaluate_stage(stage)
    path = Path(run_dir) / "metrics.json"
    summary = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
    summary.setdefault("stages", {})[stage] = res
    if "baseline" in res:
        summary["baseline"] = res["baseline"]
    path.write_text(json.dumps(summary, indent=2, default=float))
    ce = res["ce"]
    click.echo(json.dumps({"stage": stage, "f1": ce["f1"], "precision": ce["precision"], "recall": ce["recall"],
                           "auc": ce["auc"], "nlg": res["nlg"], "baseline_f1": res.get("baseline", {}).get("f1")},
                          indent=2, default=float))


# ------------------------------------------------------------------------------ ablate
def _grid(specs: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    out = []
    for s in specs:
        if "=" not in s:
            raise ConfigError(f"--grid {s!r}: expected AXIS=V1,V2,... with AXIS in fusion, modalities, stages, or any config key")
        axis, vals = s.split("=", 1)
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {s!r}: no values")
        out.append((axis.strip(), values))
    return out


def _variant_name(combo: dict[str, str]) -> str:
    return "__".join(f"{k.replace('.', '-')}-{v.replace('+', '_')}" for k, v in combo.items())


PAPER_TABLES = {"stages": "table1", "fusion": "table3", "modalities": "table3"}


@click.command("ablate")
@config_options
@click.option("--grid", "grids", multiple=True, required=True, metavar="AXIS=V1,V2",
              help="Axis to vary: fusion=mpl,cmha,cao  modalities=ecg+cxr+lab,cxr+lab  stages=pt+sft+rft,sft+rft  "
                   "or any config key (rft.beta=0,0.04). Repeat for a product of axes.")
@click.option("--quiet", is_flag=True)
def ablate_cmd(preset, config_file, fusion, modalities, rewards, stages, output_dir, sets, grids, quiet) -> None:
    """Run a grid of variants and write tables shaped like the paper's Table 1 and Table 3.

    Stage checkpoints are shared between variants whose earlier stages are identical (e.g. every
    fusion variant reuses one PT stage). Results: <out>/ablation.md and ablation.csv.
    """
    from medtvt_core.orchestrator import Run

    _logging(False)
    axes = _grid(grids)
    out = Path(output_dir or "runs/ablate")
    # Variants share one synthetic cohort (when data.root is unset) and one stage store.
    extra_data = [] if any(s.startswith("data.root=") for s in sets) else [f"data.root={out / 'data'}"]
    rows: list[dict[str, Any]] = []
    shared_data = False
    for values in itertools.product(*[v for _, v in axes]):
        combo = dict(zip([a for a, _ in axes], values))
        kw: dict[str, Any] = dict(fusion=fusion, modalities=modalities, rewards=rewards, stages=stages)
        extra = list(sets)
        for axis, v in combo.items():
            if axis in ("fusion", "modalities", "stages", "rewards"):
                kw[axis] = v
            else:
                extra.append(f"{axis}={v}")
        name = _variant_name(combo)
        if not shared_data:
            base = resolve_from_cli(preset, config_file, kw["fusion"], kw["modalities"], kw["rewards"], kw["stages"],
                                    str(out / name), extra, default_preset="demo")
            if base.data.root is None and extra_data:
                from medtvt_core.data.synth import ensure_synthetic

                s = base.data.synth
                ensure_synthetic(out / "data", n_patients=s.n_patients, seed=s.seed, test_fraction=s.test_fraction)
            else:
                extra_data = []
            shared_data = True
        extra = extra + extra_data
        cfg = resolve_from_cli(preset, config_file, kw["fusion"], kw["modalities"], kw["rewards"], kw["stages"],
                               str(out / name), extra, default_preset="demo")
        click.echo(f"== variant {name}")
        metrics = Run(cfg, resume=True, stage_store=out / "stages", progress=not quiet, echo=click.echo).execute()
        last = metrics[cfg.stages[-1]]
        ce, nlg = last["ce"], last["nlg"]
        num = lambda v: v if isinstance(v, (int, float)) else None  # noqa: E731  (unavailable -> empty cell)
        rows.append({**combo, "variant": name, "meteor": num(nlg.get("meteor")), "rouge": num(nlg.get("rouge")),
                     "bleu": num(nlg.get("bleu")), "precision": ce["precision"], "recall": ce["recall"],
                     "f1": ce["f1"], "auc": ce["auc"],
                     **{f"f1/{d}": v["f1"] for d, v in ce.get("per_category", {}).items()}})
    _write_tables(out, [a for a, _ in axes], rows)
    click.echo(f"wrote {out / 'ablation.md'} and {out / 'ablation.csv'}")


def _write_tables(out: Path, axes: list[str], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = list(axes) + ["meteor", "rouge", "bleu", "precision", "recall", "f1", "auc"]
    cat_cols = sorted({k for r in rows for k in r if k.startswith("f1/")})
    with (out / "ablation.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + cat_cols + ["variant"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols + cat_cols + ["variant"]})
    fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# Ablation", ""]
    tables = sorted({PAPER_TABLES.get(a, "other") for a in axes})
    lines.append(f"Shaped like the paper's {', '.join(t.replace('table', 'Table ') for t in tables if t != 'other') or 'tables'}"
                 " (METEOR / ROUGE-L / recall / F1 on the test split; n/a = metric unavailable offline).")
    lines += ["", "| " + " | ".join(c.upper() if c in ("meteor", "rouge", "bleu", "auc") else c for c in cols) + " |",
              "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    if cat_cols:
        lines += ["", "## F1 per disease", "", "| variant | " + " | ".join(c[3:] for c in cat_cols) + " |",
                  "|---|" + "---|" * len(cat_cols)]
        for r in rows:
            lines.append(f"| {r['variant']} | " + " | ".join(fmt(r.get(c)) for c in cat_cols) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ diagnose
@click.command("diagnose")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="Run directory.")
@click.option("--stage", type=click.Choice(["pt", "sft", "rft"]), help="Stage checkpoint (default: the last).")
@click.option("--ecg", type=click.Path(), help="WFDB record path without extension (.hea/.dat beside it).")
@click.option("--cxr", type=click.Path(dir_okay=False), help="Chest radiograph (JPEG/PNG).")
@click.option("--lab", type=click.Path(dir_okay=False), help="Symile-format labs CSV.")
@click.option("--lab-id", help="Row of --lab (its hadm_id); default: the CSV's only row.")
@click.option("--question", help="Question (default: the run's disease-level question).")
@click.option("--max-new-tokens", type=int, default=None, help="Default: the run's eval.max_new_tokens.")
def diagnose_cmd(run_dir, stage, ecg, cxr, lab, lab_id, question, max_new_tokens) -> None:
    """Print the generated report for one patient; any modality may be absent."""
    from medtvt_core.diagnose import diagnose

    _logging(False)
    # stdout carries the report only: what rebuilding the model prints (Trainer logs) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        text, weights = diagnose(Path(run_dir), stage=stage, ecg=ecg, cxr=cxr, lab=lab, lab_id=lab_id,
                                 question=question, max_new_tokens=max_new_tokens)
    click.echo(text)
    if weights:
        click.echo("modality weights: " + ", ".join(f"{m} {w:.3f}" for m, w in weights.items()), err=True)


COMMANDS = [run_cmd, eval_cmd, ablate_cmd, diagnose_cmd]
