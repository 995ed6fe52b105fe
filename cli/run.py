"""``medtvt run``, ``eval``, ``ablate``, ``diagnose``, ``app`` and ``export``.

Each command imports its medtvt_core module inside its function: those pull transformers, peft and
TRL (4.3 s measured on 2 cores), which ``medtvt --help``, ``config`` and ``data`` do not need.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from medtvt_core.errors import ConfigError
from medtvt_core.plugins import get_catalog
from medtvt_core.stats import parse_seeds

from . import common
from .common import config_options, resolve_from_cli


def _logging(verbose: bool) -> None:
    common.VERBOSE = verbose  # -v: an error also shows its traceback
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()


def _resolver(preset: str | None, config_file: str | None):
    def resolve(flags: dict[str, Any], sets: list[str], output_dir: str) -> Any:
        return resolve_from_cli(preset=preset, config_file=config_file, **flags, output_dir=output_dir, sets=sets,
                                default_preset="demo", validate=False)

    return resolve


def _run_sets(random_weights: bool, deterministic: bool) -> list[str]:
    return (["weights_required=false"] if random_weights else []) + (["deterministic=true"] if deterministic else [])


@click.command("run")
@config_options
@click.option("--seeds", help="Run once per seed, e.g. 0,1,2 (or 0-2), into <out>/seed-<s>; writes a table with "
                              "mean, std and 95% bootstrap intervals.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last checkpoint.")
@click.option("--deterministic", is_flag=True, help="Turn on torch's deterministic algorithms (recorded in environment.json).")
@click.option("--random-weights", is_flag=True, help="Allow random encoder/LLM weights where a preset requires real ones.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def run_cmd(preset, config_file, fusion, modalities, rewards, stages, output_dir, sets, seeds, resume, deterministic,
            random_weights, quiet, verbose) -> None:
    """Train PT -> SFT -> RFT and evaluate, from one configuration.

    \b
    Examples:
      medtvt run --preset demo                         # synthetic cohort, tiny models, CPU, minutes
      medtvt run --preset demo --fusion cmha --out runs/cmha
      medtvt run --preset demo --modalities cxr,lab    # ablate the ECG
      medtvt run --preset demo --seeds 0,1,2 --out runs/demo3
      torchrun --nproc_per_node 2 -m medtvt_cli.main run --preset demo --out runs/ddp

    The run directory (--out) receives config.yaml, per-stage models (<stage>/final), metrics.json and report.md.
    """
    from medtvt_core.run.orchestrator import Run

    _logging(verbose)
    sets = tuple(_run_sets(random_weights, deterministic)) + tuple(sets)
    if seeds:
        from medtvt_core.run.ablation import run_grid
        seed_list = parse_seeds(seeds)
        cfg = resolve_from_cli(preset=preset, config_file=config_file, fusion=fusion, modalities=modalities,
                               rewards=rewards, stages=stages, output_dir=output_dir, sets=sets, default_preset="demo",
                               validate=False)
        res = run_grid(_resolver(preset, config_file), [], seed_list, Path(cfg.output_dir), sets=list(sets),
                       flags=dict(fusion=fusion, modalities=modalities, rewards=rewards, stages=stages),
                       progress=not quiet, echo=click.echo)
        click.echo(f"wrote {res['md']} and {res['csv']}")
        return
    cfg = resolve_from_cli(preset=preset, config_file=config_file, fusion=fusion, modalities=modalities, rewards=rewards,
                           stages=stages, output_dir=output_dir, sets=sets, default_preset="demo", validate=False)
    Run(cfg, resume=resume, progress=not quiet, echo=click.echo).execute()  # validates cfg before any work


@click.command("ablate")
@config_options
@click.option("--grid", "grids", multiple=True, required=True, metavar="AXIS=V1,V2",
              help="Axis to vary: fusion=mpl,cmha,cao  modalities=ecg+cxr+lab,cxr+lab  stages=pt+sft+rft,sft+rft  "
                   "or any config key (rft.beta=0,0.04). Repeat for a product of axes; the first value is the baseline.")
@click.option("--seeds", help="Seeds, e.g. 0,1,2 (default: the config's seed only).")
@click.option("--no-bootstrap", is_flag=True, help="Means and std only (allows fewer than 20 test records).")
@click.option("--store", type=click.Path(file_okay=False), help="Shared cohort and stages of several ablations (default: --out).")
@click.option("--random-weights", is_flag=True, help="Allow random encoder/LLM weights where a preset requires real ones.")
@click.option("--quiet", is_flag=True)
def ablate_cmd(preset, config_file, fusion, modalities, rewards, stages, output_dir, sets, grids, seeds, no_bootstrap,
               store, random_weights, quiet) -> None:
    """Run a grid of variants (x seeds) and write tables shaped like the paper's Table 1 and Table 3.

    Stages are shared between variants whose earlier stages are identical (every fusion variant
    reuses one PT stage per seed). Results: <out>/ablation.md, ablation.csv and report.md, with the
    mean and std over seeds, a 95% paired bootstrap interval over test records and a paired test
    against the first variant.
    """
    from medtvt_core.run.ablation import parse_grid, run_grid
    _logging(False)
    axes = parse_grid(grids)
    seed_list = parse_seeds(seeds) if seeds else None
    out = Path(output_dir or "runs/ablate")
    res = run_grid(_resolver(preset, config_file), axes, seed_list, out,
                   sets=list(_run_sets(random_weights, False)) + list(sets),
                   flags=dict(fusion=fusion, modalities=modalities, rewards=rewards, stages=stages),
                   progress=not quiet, echo=click.echo, bootstrap=not no_bootstrap,
                   store=Path(store) if store else None)
    click.echo(f"wrote {res['md']}, {res['csv']} and {out / 'report.md'}")


# ------------------------------------------------------------------------------ eval
@click.command("eval")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), help="Run directory (its test split).")
@click.option("--stage", type=click.Choice(["pt", "sft", "rft"]), help="Stage of --run (default: the last completed).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True), help="A saved model directory.")
@click.option("--data", "data_root", type=click.Path(file_okay=False, exists=True), help="Dataset root (with --model).")
@click.option("--split", default="test", show_default=True, help="Split of --data: its manifest's QA file, or qa/disease_<split>.json.")
@click.option("--set", "sets", multiple=True, metavar="eval.KEY=VALUE", help="Evaluation overrides, e.g. eval.limit=20.")
@click.option("--modalities", "given", help="Evaluate with only these modalities given, e.g. ecg,lab (the others "
                                            "absent, as diagnose presents a missing one); same as --set eval.modalities=...")
@click.option("--quiet", is_flag=True)
def eval_cmd(run_dir, stage, model_dir, data_root, split, sets, given, quiet) -> None:
    """Evaluate a saved model on a QA split (clinical efficacy, NLG metrics, rewards).

    \b
      medtvt eval --run runs/demo --stage sft          # the run's test split; updates its metrics.json
      medtvt eval --model runs/demo/rft/final --data data/synth --split test
      medtvt eval --run runs/demo --modalities ecg,lab # kept apart in metrics.json (by_modalities)
      medtvt eval --run runs/demo --set eval.modality_subsets=all-singles   # table in report.md
    """
    from medtvt_core.run.reevaluate import evaluate_saved

    _logging(False)
    bad = [s for s in sets if not s.startswith("eval.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: medtvt eval only takes eval.* overrides")
    if bool(run_dir) == bool(model_dir):
        raise ConfigError("give exactly one of --run DIR or --model DIR")
    if model_dir and not data_root:
        raise ConfigError("--model needs --data ROOT (the dataset to evaluate on)")
    if run_dir and data_root:
        raise ConfigError("--data goes with --model; --run evaluates on the run's own test split")
    if given:
        sets = (*sets, f"eval.modalities={given}")
    # stdout carries the JSON summary only
    with contextlib.redirect_stdout(sys.stderr):
        summary = evaluate_saved(run_dir=Path(run_dir) if run_dir else None, stage=stage,
                                 model_dir=Path(model_dir) if model_dir else None,
                                 data_root=Path(data_root) if data_root else None, split=split, sets=list(sets),
                                 progress=not quiet)
    click.echo(json.dumps(summary, indent=2, default=float))


# ------------------------------------------------------------------------------ diagnose
def _modality_options(f: Any) -> Any:
    """One option per installed modality (``--ecg``, ``--note``, ...), and its extras (``--lab-id``)."""
    cat = get_catalog()
    for name in reversed(cat.modalities.list()):
        cls = cat.modalities.get(name)
        for key, helptext in reversed(list(getattr(cls, "cli_extras", {}).items())):
            f = click.option(f"--{name}-{key}", f"x_{name}__{key}", help=helptext)(f)
        f = click.option(f"--{name}", f"m_{name}", help=getattr(cls, "cli_help", "") or f"{name} input file")(f)
    return f


@click.command("diagnose")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True), help="A saved model directory.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), help="A run directory.")
@click.option("--stage", type=click.Choice(["pt", "sft", "rft"]), help="Stage of --run (default: the last completed).")
@_modality_options
@click.option("--question", help="Question with the placeholders of the given modalities (default: the model's).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Default: the model's.")
@click.option("--samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Sampled reports per condition for the modality attribution (0: no attribution).")
@click.option("--unconstrained", is_flag=True,
              help="Decode without the report grammar (the model's own format, malformed or not); by default "
                   "every report is well-formed unless it reaches --max-new-tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def diagnose_cmd(model_dir, run_dir, stage, question, max_new_tokens, samples, unconstrained, as_json,
                 **inputs) -> None:
    """Print the report, the disease set and the modality weights for one patient; any modality may be absent.

    \b
      medtvt diagnose --run runs/demo --ecg data/.../40000017 --cxr data/.../x.jpg --lab data/labs.csv --lab-id 20000017
      medtvt diagnose --model exported/ --cxr image.jpg --json
    """
    from medtvt_core.run.diagnose import diagnose_json, load_model_dir, model_dir_of_run

    _logging(False)
    if bool(run_dir) == bool(model_dir):
        raise ConfigError("give exactly one of --model DIR or --run DIR")
    if stage and not run_dir:
        raise ConfigError("--stage goes with --run")
    given: dict[str, tuple[str, dict[str, str]]] = {}
    extras: dict[str, dict[str, str]] = {}
    for key, value in inputs.items():
        if value is None:
            continue
        if key.startswith("m_"):
            given[key[2:]] = (value, {})
        else:
            m, opt = key[2:].split("__", 1)
            extras.setdefault(m, {})[opt] = value
    for m, ex in extras.items():
        if m not in given:
            raise ConfigError(f"--{m}-{next(iter(ex))} needs --{m}")
        given[m] = (given[m][0], ex)
    path = Path(model_dir) if model_dir else model_dir_of_run(Path(run_dir), stage)
    with contextlib.redirect_stdout(sys.stderr):
        model, processor = load_model_dir(path)
        res = diagnose_json(path, model, processor, given, question=question, max_new_tokens=max_new_tokens,
                            samples=samples, constrain=not unconstrained)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    if res.get("notice"):
        click.echo(res["notice"])
    click.echo(res["report"])
    click.echo("diseases: " + ("; ".join(res["diseases"]) if res["diseases"] else
                               "(none)" if res["diseases"] is not None else
                               "(no <answer> block" + (": the report reached its token budget)" if res["constrained"]
                                                       else ")")))
    if res["modality_weights"]:
        click.echo("modality weights (CAO gates): " + ", ".join(f"{m} {w:.3f}" for m, w in res["modality_weights"].items()))
    att = res.get("attribution")
    if att and att["p_named_without"]:
        click.echo(f"attribution ({att['method']}): P(named) with all modalities -> without each")
        for d, p in att["p_named"].items():
            click.echo(f"  {d}: {p:.2f} -> " + ", ".join(f"without {m} {att['p_named_without'][m][d]:.2f}"
                                                        for m in att["p_named_without"]))
        if att.get("other_names"):
            click.echo(f"  ({att['other_names']} sampled report(s) also named something outside the disease list)")


# ------------------------------------------------------------------------------ app
@click.command("app")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True), help="A saved model directory.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True),
              help="A run directory (its test patients become examples).")
@click.option("--stage", type=click.Choice(["pt", "sft", "rft"]), help="Stage of --run (default: the last completed).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Default sampled reports per condition for the attribution (as diagnose).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Default: the model's.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
def app_cmd(model_dir, run_dir, stage, host, port, samples, max_new_tokens, open_browser) -> None:
    """Serve a saved model as a web page and an HTTP API (needs pip install 'medtvt[app]').

    \b
      medtvt app --run runs/demo --open
      curl -F ecg=@r.hea -F ecg=@r.dat -F cxr=@x.jpg -F lab=@labs.csv -F lab-id=2000 localhost:7860/api/diagnose
    """
    from medtvt_core.run.app import serve
    from medtvt_core.run.diagnose import model_dir_of_run

    _logging(False)
    if bool(run_dir) == bool(model_dir):
        raise ConfigError("give exactly one of --model DIR or --run DIR")
    if stage and not run_dir:
        raise ConfigError("--stage goes with --run")
    path = Path(model_dir) if model_dir else model_dir_of_run(Path(run_dir), stage)
    serve(path, run_dir=Path(run_dir) if run_dir else None, host=host, port=port, samples=samples,
          max_new_tokens=max_new_tokens, open_browser=open_browser, echo=lambda s: click.echo(s, err=True))


# ------------------------------------------------------------------------------ export
@click.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="Run directory.")
@click.option("--stage", required=True, type=click.Choice(["pt", "sft", "rft"]), help="Stage to export.")
@click.option("--out", "out", required=True, type=click.Path(), help="New directory for the model.")
@click.option("--merge-lora", is_flag=True, help="Fold the LoRA adapter into the LLM weights (peft merge_and_unload).")
def export_cmd(run_dir, stage, out, merge_lora) -> None:
    """Write a standalone model directory with a model card (README.md)."""
    from medtvt_core.run.export import export_model

    _logging(False)
    with contextlib.redirect_stdout(sys.stderr):
        path = export_model(Path(run_dir), stage, Path(out), merge_lora=merge_lora)
    click.echo(f"exported {stage} of {run_dir} to {path}" + (" (LoRA merged)" if merge_lora else ""))


COMMANDS = [run_cmd, eval_cmd, ablate_cmd, diagnose_cmd, app_cmd, export_cmd]
