"""Validation during training: a split carved from the training records, scored every
``<stage>.eval_steps`` optimiser steps (and at step 0 and the last step), the best step kept.

The split (``validation.fraction``) is taken from the disease-level training records before
``data.rft_holdout`` divides the rest between SFT and RFT (``validation.source: train``), or from
RFT's share only (``rft_prompts``: SFT's records stay as without validation); no stage trains on
it and the test split is never touched.  A validation scores greedy reports (F1, F1 per disease, answer rate, each reward
and their weighted total) and ``validation.samples`` sampled reports per record (their mean
weighted reward: what GRPO maximises).  With several processes each generates its share of the
records and the main process gathers them (as :mod:`.evaluation`), so every rank logs the same
entry.  The entry goes into the Trainer's ``log_history`` (so into ``history.json`` and every
checkpoint's ``trainer_state.json``: a resumed run keeps its earlier validations), with the
per-record scores under ``val_records`` for the reward-hacking alarm (:mod:`.alarm`).

Validation runs under ``torch.random.fork_rng``: generate's multinomial draw consumes the global
RNG even when the row samplers decide, so without it a validated run would train on a different
random stream than an unvalidated one.  With ``eval_steps: 0`` (the default) nothing here runs.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback

from ..answers import answer_set
from ..io import atomic_dir, save_figure
from ..metrics.clinical import clinical_efficacy, per_record_scores
from ..model.serialization import load_weights
from ..plugins import Catalog, get_catalog
from .alarm import alarms_over_training, reward_hacking_alarm, validations
from .evaluation import dataset_reports, sampled_rewards

log = logging.getLogger("medtvt.validation")

BEST_PREFIX = "best-"  # <stage>/best-<step>/: the model of the best validation so far


def carve_validation(records: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(rest, validation)``: a record is held out when the hash of ``(seed, id)`` falls below
    ``fraction`` (independent of file order and of the other records; another seed, another split)."""
    def u(r: Any) -> float:
        return int.from_bytes(hashlib.sha256(f"validation:{seed}:{r.id}".encode()).digest()[:8], "big") / 2**64

    val = [r for r in records if u(r) < fraction]
    held = {id(r) for r in val}
    return [r for r in records if id(r) not in held], val


def _reward_columns(prompts: list[str], preds: list[str], refs: list[str], rewards: Sequence[Any],
                    catalog: Catalog) -> dict[str, list[float | None]]:
    cols = {}
    for rr in rewards:
        vals = list(catalog.rewards.get(rr.name)(prompts=prompts, completions=preds, answer=refs))
        cols[rr.name] = [None if v is None else float(v) for v in vals]
    return cols


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


@torch.no_grad()
def validate(model: Any, processor: Any, dataset: Any, *, rewards: Sequence[Any], max_new_tokens: int,
             batch_size: int, samples: int, temperature: float, top_p: float, seed: int, step: int) -> dict[str, Any]:
    """One validation entry (see the module doc); every process must call it (collective)."""
    from accelerate import PartialState

    cat = get_catalog()
    state = PartialState()
    t0 = time.perf_counter()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        recs = dataset_reports(model, processor, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               progress=False)
        sampled: dict[str, float | None] = {}
        if samples:
            mine = dataset.subset(dataset.records[state.process_index::state.num_processes])
            if len(mine):
                sampled = sampled_rewards(model, processor, mine, rewards, samples=samples, temperature=temperature,
                                          top_p=top_p, max_new_tokens=max_new_tokens,
                                          batch_size=max(1, batch_size // samples), seed=seed)["per_record"]
            if state.num_processes > 1:
                from accelerate.utils import gather_object

                merged: dict[str, float | None] = {}
                for part in gather_object([sampled]):
                    merged.update(part)
                sampled = merged
    ids = [r["id"] for r in recs]
    preds, refs, prompts = [r["prediction"] for r in recs], [r["reference"] for r in recs], [r["prompt"] for r in recs]
    ce = clinical_efficacy(preds, refs)
    f1 = per_record_scores(preds, refs)["f1"]
    answered = [float(answer_set(p) is not None) for p in preds]
    cols = _reward_columns(prompts, preds, refs, rewards, cat)
    total: list[float | None] = []
    for i in range(len(recs)):
        vals = [(rr.weight, cols[rr.name][i]) for rr in rewards if cols[rr.name][i] is not None]
        total.append(sum(w * v for w, v in vals) if vals else None)
    entry: dict[str, Any] = {"step": int(step), "val_n": len(recs), "val_f1": ce["f1"],
                             "val_answer_rate": ce["answer_rate"], "val_reward": _mean(total)}
    for rr in rewards:
        entry[f"val_reward/{rr.name}"] = _mean(cols[rr.name])
    if samples:
        entry["val_reward_sampled"] = _mean([sampled.get(i) for i in ids])
    for d, v in ce["per_category"].items():
        entry[f"val_f1/{d}"] = v["f1"]
    per = {"f1": f1, "answer_rate": answered, "reward": total, **{f"reward/{k}": v for k, v in cols.items()}}
    if samples:
        per["reward_sampled"] = [sampled.get(i) for i in ids]
    entry["val_records"] = {k: dict(zip(ids, v)) for k, v in per.items()}
    entry["val_time_s"] = time.perf_counter() - t0
    return entry


def best_validation(history: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The validation after step 0 with the highest ``metric`` (the earliest among equals), or None."""
    best = None
    for h in validations(history):
        v = h.get(metric)
        if h["step"] > 0 and v is not None and (best is None or v > best[metric]):
            best = h
    return best


def best_dirs(stage_dir: Path) -> dict[int, Path]:
    out = {}
    for p in Path(stage_dir).glob(f"{BEST_PREFIX}*"):
        tail = p.name[len(BEST_PREFIX):]
        if tail.isdigit() and p.is_dir():
            out[int(tail)] = p
    return out


class ValidationCallback(TrainerCallback):
    """Validates at step 0 (a fresh stage), every ``eval_steps`` and at the last step; logs the entry;
    keeps the model of the best validation under ``<stage_dir>/best-<step>`` (main process);
    calls ``on_validation(history)`` after each (the alarm)."""

    def __init__(self, *, eval_steps: int, run: Callable[[Any, int], dict[str, Any]], stage_dir: Path,
                 metric: str | None, save: Callable[[Any, Path], None], is_main: bool,
                 barrier: Callable[[], None], on_validation: Callable[[list[dict[str, Any]]], None] | None = None):
        self.eval_steps, self.run, self.stage_dir, self.metric = eval_steps, run, Path(stage_dir), metric
        self.save, self.is_main, self.barrier, self.on_validation = save, is_main, barrier, on_validation

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.is_main and self.metric:
            # A resumed run redoes the steps after its checkpoint: best models saved after it are redone too.
            keep = (best_validation(state.log_history, self.metric) or {}).get("step")
            for s, p in best_dirs(self.stage_dir).items():
                if s > state.global_step or s != keep:
                    shutil.rmtree(p, ignore_errors=True)
        self.barrier()
        if state.global_step == 0:
            self._validate(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_steps == 0 or state.global_step >= state.max_steps:
            self._validate(state, model)

    def on_save(self, args, state, control, **kwargs):
        # Superseded best models go once a checkpoint holds the history that supersedes them.
        if self.is_main and self.metric:
            keep = (best_validation(state.log_history, self.metric) or {}).get("step")
            for s, p in best_dirs(self.stage_dir).items():
                if s != keep:
                    shutil.rmtree(p, ignore_errors=True)

    def _validate(self, state, model) -> None:
        if any(h.get("step") == state.global_step and "val_f1" in h for h in state.log_history):
            return  # the last step is also a multiple of eval_steps
        before = best_validation(state.log_history, self.metric) if self.metric else None
        entry = self.run(model, state.global_step)
        state.log_history.append(entry)
        if self.metric:
            now = best_validation(state.log_history, self.metric)
            if now is entry and now is not before:
                if self.is_main:
                    self.save(model, self.stage_dir / f"{BEST_PREFIX}{state.global_step}")
                self.barrier()
        if self.on_validation is not None:
            self.on_validation(list(state.log_history))


_HOW = {
    "train": "disease-level training records whose sha256('validation:<seed>:<record id>') falls below the fraction, "
             "removed before data.rft_holdout splits the rest between SFT and RFT; no stage trains on them; the "
             "test split is not used",
    "rft_prompts": "of the disease-level training records data.rft_holdout keeps for RFT (never in SFT), those whose "
                   "sha256('validation:<seed>:<record id>') falls below the fraction, removed from RFT's prompts; "
                   "no stage trains on them; the test split is not used",
    "file": "every record of data.val_file, a split of the dataset no stage trains on (the synthetic cohort's "
            "validation patients: data.synth.val_patients); the test split is not used",
}


def validation_summary(history: Sequence[dict[str, Any]], metric: str | None, *, n: int, fraction: float,
                       seed: int, source: str = "train", file: str | None = None) -> dict[str, Any]:
    """``metrics.json``'s account of a stage's validation: the split, the steps and the chosen one
    (``file``: the split's QA file, source ``file``; ``fraction`` is then not recorded)."""
    vals = validations(history)
    split: dict[str, Any] = ({"n_records": n, "file": file} if source == "file" else
                             {"n_records": n, "fraction": fraction, "seed": seed})
    out: dict[str, Any] = {
        "split": {**split, "source": source, "how": _HOW[source]},
        "steps": [h["step"] for h in vals],
        "val_f1": [h.get("val_f1") for h in vals],
    }
    if vals:
        out["last"] = {"step": vals[-1]["step"], "val_f1": vals[-1].get("val_f1"),
                       "val_reward": vals[-1].get("val_reward")}
    if metric:
        best = best_validation(history, metric)
        out["metric_for_best_model"] = metric
        if best is not None:
            out["chosen"] = {"step": best["step"], metric: best[metric], "val_f1": best.get("val_f1"),
                             "why": f"highest {metric} ({best[metric]:.4f}) of the validations after step 0 at steps "
                                    f"{', '.join(str(h['step']) for h in vals if h['step'] > 0)} (the earliest among "
                                    f"equals; step 0, the stage's starting model, is not a candidate)"}
    elif vals:  # no selection: the model kept is the last step's, and metrics.json says so
        out["chosen"] = {"step": vals[-1]["step"], "val_f1": vals[-1].get("val_f1"),
                         "why": "no metric_for_best_model: the last step's model is kept"}
    return out


# ------------------------------------------------------------------------------------ run glue
def make_callback(run: Any, stage: str, sdir: Path) -> list[Any]:
    """The stage's :class:`ValidationCallback` for a :class:`~medtvt_core.run.orchestrator.Run`
    (none when ``<stage>.eval_steps`` is 0)."""

    cfg = run.cfg
    scfg, v = getattr(cfg, stage), cfg.validation
    if not scfg.eval_steps:
        return []

    def one(model: Any, step: int) -> dict[str, Any]:
        e = validate(model, run.processor, run.splits["val"], rewards=cfg.rewards,
                     max_new_tokens=v.max_new_tokens or cfg.eval.max_new_tokens,
                     batch_size=v.batch_size or cfg.eval.batch_size, samples=v.samples, temperature=cfg.rft.temperature,
                     top_p=cfg.rft.top_p, seed=cfg.seed, step=step)
        run.echo(f"[{stage}] step {step} validation ({e['val_n']} records): F1 {e['val_f1']:.4f} answer rate "
                 f"{e['val_answer_rate']:.2f} reward {_fmt(e['val_reward'])}"
                 + (f" sampled reward {_fmt(e.get('val_reward_sampled'))}" if v.samples else ""))
        return e

    def save(model: Any, path: Path) -> None:
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            run.processor.save_pretrained(tmp)

    def alarm(history: list[dict[str, Any]]) -> None:
        verdict = reward_hacking_alarm(history, stage=stage, metric=v.alarm_metric, window=v.alarm_window,
                                       confidence_level=v.confidence_level, n_resamples=v.n_resamples, seed=cfg.seed)
        if verdict["raised"]:
            log.warning(verdict["message"])
            run.echo(verdict["message"])

    return [ValidationCallback(eval_steps=scfg.eval_steps, run=one, stage_dir=sdir, metric=scfg.metric_for_best_model,
                               save=save, is_main=run.is_main, barrier=run.barrier, on_validation=alarm)]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def keep_best(run: Any, stage: str, sdir: Path, history: Sequence[dict[str, Any]]) -> None:
    """After a stage with ``metric_for_best_model``: the trained model is written to ``<stage>/last``
    and the best validation's weights are loaded into ``run.model`` (which the caller saves as
    ``final`` and evaluates)."""

    metric = getattr(run.cfg, stage).metric_for_best_model
    best = best_validation(history, metric) if metric else None
    if best is None:
        return
    bdir = sdir / f"{BEST_PREFIX}{best['step']}"
    if not bdir.is_dir():
        raise FileNotFoundError(f"{stage}: the best validation (step {best['step']}) has no saved model {bdir}; "
                                f"rerun the stage (remove {sdir})")
    if run.is_main:
        with atomic_dir(sdir / "last") as tmp:
            run.model.save_pretrained(tmp)
            run.processor.save_pretrained(tmp)
    run.barrier()
    load_weights(run.model, bdir)
    run.echo(f"[{stage}] {stage}/final: the model of step {best['step']} ({metric} {best[metric]:.4f}); "
             f"{stage}/last: the last step's")


def run_summary(run: Any) -> dict[str, Any]:
    """``metrics.json["validation"]``: per validated stage the split, steps, chosen step and alarms."""
    cfg, v = run.cfg, run.cfg.validation
    out: dict[str, Any] = {}
    for stage in cfg.stages:
        hist = run.history.get(stage) or []
        if not getattr(cfg, stage).eval_steps or not validations(hist):
            continue
        kw = dict(stage=stage, metric=v.alarm_metric, window=v.alarm_window, confidence_level=v.confidence_level,
                  n_resamples=v.n_resamples, seed=cfg.seed)
        s = validation_summary(hist, getattr(cfg, stage).metric_for_best_model, n=len(run.splits["val"]),
                               fraction=v.fraction, seed=cfg.seed, source=v.source, file=cfg.data.val_file)
        s["alarm"] = reward_hacking_alarm(hist, **kw)
        s["alarms_during_training"] = alarms_over_training(hist, **kw)
        out[stage] = s
    return out


# ------------------------------------------------------------------------------------ report
def report_section(out: Path, summary: dict[str, Any], history: dict[str, list[dict[str, Any]]]) -> list[str]:
    """``report.md`` lines: per validated stage a table, the chosen step, the alarm in words, and one
    figure per stage (``validation_<stage>.png``): the training reward (RFT) or loss and the held-out
    F1 over optimiser steps."""
    val = summary.get("validation") or {}
    lines: list[str] = []
    for stage, s in val.items():
        hist = history.get(stage) or []
        vals = validations(hist)
        if not vals:
            continue
        split = s["split"]
        held = "records of the dataset's validation split" if split["source"] == "file" else "held-out training records"
        whence = (f"file {split['file']}" if split["source"] == "file"
                  else f"fraction {split['fraction']}, seed {split['seed']}")
        lines += ["", f"## Validation during {stage.upper()} ({split['n_records']} {held})", "",
                  f"Validation split: {split['how']} ({whence}).", "",
                  "| step | F1 | answer rate | reward (greedy) | reward (sampled) |", "|---|---|---|---|---|"]
        for h in vals:
            lines.append(f"| {h['step']} | {_fmt(h.get('val_f1'))} | {_fmt(h.get('val_answer_rate'))} | "
                         f"{_fmt(h.get('val_reward'))} | {_fmt(h.get('val_reward_sampled'))} |")
        if "chosen" in s:
            c = s["chosen"]
            last = "; `{stage}/last` is the last step's" if "metric_for_best_model" in s else ""
            lines += ["", f"`{stage}/final` is the model of step {c['step']} (validation F1 {_fmt(c.get('val_f1'))}): "
                          f"{c['why']}{last.format(stage=stage)}."]
        lines += ["", s["alarm"]["message"]]
        for a in s.get("alarms_during_training", []):
            if a["steps"] != s["alarm"].get("steps"):
                lines += ["", f"During training: {a['message']}"]
        img = _plot_validation(out, stage, hist, vals)
        if img:
            lines += ["", f"![validation {stage}]({img})"]
    return lines


def _plot_validation(out: Path, stage: str, hist: Sequence[dict[str, Any]], vals: Sequence[dict[str, Any]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "reward" if any("reward" in h and "val_f1" not in h for h in hist) else "loss"
    train = [(h["step"], h[key]) for h in hist if key in h and h[key] is not None and "val_f1" not in h]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.8, label=f"training {key}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"training {key}", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([h["step"] for h in vals], [h.get("val_f1") for h in vals], "o-", color="tab:red", label="held-out F1")
    ax2.set_ylabel("held-out F1", color="tab:red")
    ax.set_title(f"{stage.upper()}: training {key} and held-out F1")
    fig.tight_layout()
    name = f"validation_{stage}.png"
    save_figure(fig, out / name)
    plt.close(fig)
    return name
