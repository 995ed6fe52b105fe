"""Evaluation by available modalities (``eval.modalities``, ``eval.modality_subsets``).

A subset ``S`` of the run's modalities is evaluated by generating the test split's reports with
every other modality absent, exactly as an absent modality is presented in training, in modality
dropout and in ``medtvt diagnose`` (masked, its placeholder replaced by ``"(<m> not available)"``;
:meth:`medtvt_core.data.dataset.QADataset.masked`).  Each subset's row gives F1, answer rate and
rewards with 95% paired bootstrap intervals of the difference to the full-input row over the same
test records (:func:`medtvt_core.stats.summarize_ablation`), and the F1 of the diseases whose
evidence modalities are all in ``S`` next to the same diseases' F1 with every modality.  The
evidence table (disease -> modalities) comes from ``eval.evidence`` or the dataset manifest's
``evidence`` (the synthetic cohort writes one).  docs/partial_patients.md describes it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..answers import DISEASES, answer_set
from ..config import expand_subsets
from ..data.manifest import read_manifest
from ..errors import ConfigError
from ..io import save_figure
from ..metrics.clinical import clinical_efficacy
from ..plugins import get_catalog
from ..stats import MIN_RECORDS, summarize_ablation
from .evaluation import dataset_reports, mean_rewards, per_record

__all__ = ["subset_name", "evidence_of", "score_records", "evaluate_subsets", "subsets_markdown",
           "plot_subsets", "aggregate_subsets"]

ALL = "all"


def subset_name(modalities: Sequence[str]) -> str:
    return "+".join(modalities)


def evidence_of(configured: Mapping[str, Sequence[str]] | None, data_root: Path | None,
                modalities: Sequence[str]) -> tuple[dict[str, list[str]] | None, str | None]:
    """``(disease -> evidence modalities, where it came from)``: ``eval.evidence`` when given, else the
    manifest's ``evidence`` table; ``(None, None)`` without either. Names outside the run's
    modalities are an error (a typo would silently drop a disease from the table)."""
    if configured:
        table, source = {d: list(m) for d, m in configured.items()}, "eval.evidence"
    else:
        man = read_manifest(data_root) if data_root is not None and Path(data_root).is_dir() else None
        ev = (man or {}).get("evidence") or {}
        if not ev:
            return None, None
        table, source = {d: list(e.get("modalities", [])) for d, e in ev.items()}, "medtvt_dataset.json evidence"
    for d, ms in table.items():
        bad = [m for m in ms if m not in modalities]
        if not ms or bad:
            raise ConfigError(f"{source}: {d!r} -> {ms}: evidence modalities must be a non-empty subset of "
                              f"{', '.join(modalities)}")
    return table, source


def score_records(records: Sequence[dict[str, Any]], rewards: Sequence[Any]) -> dict[str, dict[str, float | None]]:
    """Per-record scores: the strict protocol's f1/precision/recall, ``answered`` (a valid
    ``<answer>`` block), ``reward`` (weighted total) and ``reward/<name>`` of each reward."""
    out = {k: v for k, v in per_record(records, rewards).items() if not k.startswith("named/")}
    ids = [r["id"] for r in records]
    out["answered"] = {i: float(answer_set(r["prediction"], vocabulary=DISEASES) is not None)
                       for i, r in zip(ids, records)}
    cat = get_catalog()
    kw = dict(prompts=[r["prompt"] for r in records], completions=[r["prediction"] for r in records],
              answer=[r["reference"] for r in records])
    for rr in rewards:
        out[f"reward/{rr.name}"] = dict(zip(ids, cat.rewards.get(rr.name)(**kw)))
    return out


def _row(records: Sequence[dict[str, Any]], modalities: Sequence[str], rewards: Sequence[Any]) -> dict[str, Any]:
    ce = clinical_efficacy([r["prediction"] for r in records], [r["reference"] for r in records])
    return {"modalities": list(modalities), "n": ce["n"], "f1": ce["f1"], "precision": ce["precision"],
            "recall": ce["recall"], "answer_rate": ce["answer_rate"],
            "reward": mean_rewards(records, rewards) if rewards else {},
            "per_disease_f1": {d: v["f1"] for d, v in ce["per_category"].items()},
            "support": {d: v["support"] for d, v in ce["per_category"].items()}}


def _macro(per: Mapping[str, float], diseases: Sequence[str]) -> float | None:
    vals = [per[d] for d in diseases if d in per]
    return sum(vals) / len(vals) if vals else None


def evaluate_subsets(model: Any, processor: Any, dataset: Any, eval_cfg: Any, *, rewards: Sequence[Any],
                     full_records: Sequence[dict[str, Any]], subsets: Sequence[Sequence[str]],
                     evidence: Mapping[str, Sequence[str]] | None = None, evidence_source: str | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Generate and score the reports of every subset (module doc); ``full_records``: the reports with
    every modality (the run's own evaluation, not generated again).

    Returns ``{"method", "subsets": [names, "all" first], "rows": {name: row}, "per_disease": {d: {"evidence",
    "f1_all", "f1_evidence_only"}}, "evidence_source", "bootstrap", "notes"}``; a row holds ``modalities``,
    ``n``, ``f1``, ``precision``, ``recall``, ``answer_rate``, ``reward`` (means), ``per_disease_f1``,
    ``stats`` (per metric: mean, CI, difference to ``all`` with its CI and p-value), and with an
    evidence table ``evidence_diseases`` (those whose evidence modalities are all given), ``evidence_f1``
    and ``evidence_f1_all`` (their mean F1 in this row and with every modality).
    """
    names = list(dataset.modality_names)
    full = [r for r in full_records]
    rows: dict[str, dict[str, Any]] = {ALL: _row(full, names, rewards)}
    scores = {ALL: {0: score_records(full, rewards)}}
    for sub in subsets:
        name = subset_name(sub)
        ds = dataset.masked(withheld=[m for m in names if m not in sub])
        recs = dataset_reports(model, processor, ds, batch_size=eval_cfg.batch_size,
                               max_new_tokens=eval_cfg.max_new_tokens, do_sample=eval_cfg.do_sample,
                               limit=len(full), progress=progress, constrain=eval_cfg.constrained_decoding)
        rows[name] = _row(recs, sub, rewards)
        scores[name] = {0: score_records(recs, rewards)}
    metrics = ["f1", "answered", "reward", *(f"reward/{r.name}" for r in rewards)] if rewards else ["f1", "answered"]
    boot = len(full) >= MIN_RECORDS
    summary = summarize_ablation(scores, metrics=metrics, primary="f1", bootstrap=boot)
    for name, row in rows.items():
        row["stats"] = {m: {"mean": s.mean, "ci": [s.ci_low, s.ci_high], "diff": s.diff,
                            "diff_ci": [s.diff_ci_low, s.diff_ci_high], "p": s.p}
                        for m, s in summary.stats[name].items()}
    per_disease: dict[str, Any] = {}
    if evidence:
        for name, row in rows.items():
            given = set(row["modalities"])
            ds_ = [d for d, ms in evidence.items() if set(ms) <= given]
            row["evidence_diseases"] = ds_
            row["evidence_f1"] = _macro(row["per_disease_f1"], ds_)
            row["evidence_f1_all"] = _macro(rows[ALL]["per_disease_f1"], ds_)
        for d, ms in evidence.items():
            own = [m for m in names if m in ms]
            key = subset_name(own) if len(own) < len(names) else ALL
            per_disease[d] = {"evidence": own, "f1_all": rows[ALL]["per_disease_f1"].get(d),
                              "f1_evidence_only": rows[key]["per_disease_f1"].get(d) if key in rows else None,
                              "support": rows[ALL]["support"].get(d)}
    notes = list(summary.notes)
    if not boot:
        notes.append(f"{len(full)} test records: fewer than {MIN_RECORDS}, so no bootstrap intervals")
    return {"method": "greedy reports with the modalities outside each subset absent (masked, placeholder "
                      "'(<m> not available)'); 95% paired bootstrap over test records against 'all'",
            "subsets": list(rows), "rows": rows, "per_disease": per_disease, "evidence_source": evidence_source,
            "bootstrap": boot, "notes": notes}


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(st: Mapping[str, Any], key: str = "diff_ci") -> str:
    lo, hi = st.get(key) or (None, None)
    return "" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]"


def subsets_markdown(res: Mapping[str, Any], image: str | None = None) -> list[str]:
    """The report.md section of :func:`evaluate_subsets`'s result."""
    rows = res["rows"]
    rnames = [k for k in next(iter(rows.values()))["reward"] if k != "total"]
    has_ev = any("evidence_f1" in r for r in rows.values())
    lines = ["## Evaluation by available modalities", "",
             "Each row: the test split's greedy reports with only these modalities given (the others absent, as "
             "`medtvt diagnose` presents a missing one). Differences to `all` with 95% paired bootstrap intervals "
             "over the same records" + ("" if res.get("bootstrap") else " (not computed: too few records)") + "."
             + (" Evidence F1: mean F1 of the diseases whose evidence modalities (" + str(res.get("evidence_source"))
                + ") are all given, in this row and with every modality." if has_ev else ""), "",
             "| modalities | F1 | ΔF1 vs all | answer rate | " + " | ".join(f"{r} reward" for r in rnames)
             + " | total reward | Δ total | " + ("evidence diseases | evidence F1 | same, all given |" if has_ev else ""),
             "|---|---|---|---|" + "---|" * len(rnames) + "---|---|" + ("---|---|---|" if has_ev else "")]
    for name, r in rows.items():
        st = r.get("stats", {})
        rw = r.get("reward", {})
        diff = lambda m: "" if name == ALL else f"{_f(st.get(m, {}).get('diff'), 3)}{_ci(st.get(m, {}))}"  # noqa: E731
        ev = ""
        if has_ev:
            ev = (f" {len(r.get('evidence_diseases', []))} | {_f(r.get('evidence_f1'))} | "
                  f"{_f(r.get('evidence_f1_all'))} |")
        lines.append(f"| {name} | {_f(r['f1'])} | {diff('f1')} | {_f(r['answer_rate'])} | "
                     + " | ".join(_f(rw.get(k)) for k in rnames) + f" | {_f(rw.get('total'))} | {diff('reward')} |"
                     + ev)
    if res.get("per_disease"):
        lines += ["", "| disease | evidence | support | F1, all given | F1, only its evidence given |", "|---|---|---|---|---|"]
        for d, v in res["per_disease"].items():
            lines.append(f"| {d} | {' + '.join(v['evidence'])} | {v.get('support', '')} | {_f(v['f1_all'])} | "
                         + (_f(v["f1_evidence_only"]) if v["f1_evidence_only"] is not None
                            else f"not evaluated (add {subset_name(v['evidence'])} to eval.modality_subsets)") + " |")
    for n in res.get("notes", []):
        lines += ["", f"- {n}"]
    if image:
        lines += ["", f"![evaluation by available modalities]({image})"]
    return lines


def plot_subsets(out: Path, res: Mapping[str, Any], stage: str) -> str | None:
    """``modality_subsets.png``: F1 per subset with its 95% bootstrap interval, and the evidence F1
    next to the same diseases' F1 with every modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names)), 3.6))
    x = range(len(names))
    f1 = [rows[n]["f1"] for n in names]
    ci = [rows[n].get("stats", {}).get("f1", {}).get("ci") or [None, None] for n in names]
    err = [[f - lo if lo is not None else 0 for f, (lo, _) in zip(f1, ci)],
           [hi - f if hi is not None else 0 for f, (_, hi) in zip(f1, ci)]]
    w = 0.38 if any("evidence_f1" in rows[n] for n in names) else 0.7
    ax.bar([i - (w / 2 if w < 0.5 else 0) for i in x], f1, w, yerr=err, capsize=3, label="F1 (all diseases)")
    if w < 0.5:
        ax.bar([i + w / 2 for i in x], [rows[n].get("evidence_f1") or 0 for n in names], w,
               label="F1 of diseases with their evidence given")
        ax.scatter([i + w / 2 for i in x], [rows[n].get("evidence_f1_all") or 0 for n in names], color="black",
                   marker="_", s=200, zorder=3, label="same diseases, all given")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(f"Evaluation by available modalities ({stage.upper()})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "modality_subsets.png"
    save_figure(fig, out / name)
    plt.close(fig)
    return name


def aggregate_subsets(per_seed: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """Markdown: per subset, mean ± std over seeds of F1, answer rate, format-like rewards and the
    evidence F1 against the same diseases with every modality (``run --seeds`` / ``ablate``)."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    rnames = [k for k in next(iter(first["rows"].values()))["reward"] if k != "total"]
    cols = [("F1", lambda r: r["f1"]), ("answer rate", lambda r: r["answer_rate"]),
            *((f"{k} reward", (lambda k: lambda r: r["reward"].get(k))(k)) for k in rnames),
            ("evidence F1", lambda r: r.get("evidence_f1")), ("same diseases, all given", lambda r: r.get("evidence_f1_all")),
            ("evidence F1 − all", lambda r: None if r.get("evidence_f1") is None or r.get("evidence_f1_all") is None
             else r["evidence_f1"] - r["evidence_f1_all"])]

    def cell(vals: list[Any]) -> str:
        v = [x for x in vals if x is not None]
        if not v:
            return "n/a"
        return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    lines = [f"## Evaluation by available modalities (mean ± std over seeds {', '.join(map(str, seeds))})", "",
             "| modalities | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in first["subsets"]:
        rs = [per_seed[s]["rows"].get(name) for s in seeds]
        rs = [r for r in rs if r is not None]
        lines.append(f"| {name} | " + " | ".join(cell([g(r) for r in rs]) for _, g in cols) + " |")
    return lines


def subsets_of_config(model: Any, processor: Any, dataset: Any, cfg: Any, *, full_records: Sequence[dict[str, Any]],
                      data_root: Path | None, progress: bool = True) -> dict[str, Any] | None:
    """:func:`evaluate_subsets` as ``cfg.eval.modality_subsets`` asks (None when it is off)."""
    spec = cfg.eval.modality_subsets
    if not spec:
        return None
    names = list(dataset.modality_names)
    try:
        subsets = expand_subsets(list(spec), names)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    evidence, source = evidence_of(cfg.eval.evidence, data_root, names)
    if cfg.eval.modalities is not None:  # the run's own reports lack some modalities: "all" is generated here
        e = cfg.eval
        full_records = dataset_reports(model, processor, dataset, batch_size=e.batch_size,
                                       max_new_tokens=e.max_new_tokens, do_sample=e.do_sample, limit=e.limit,
                                       progress=progress, constrain=e.constrained_decoding)
    return evaluate_subsets(model, processor, dataset, cfg.eval, rewards=cfg.rewards, full_records=full_records,
                            subsets=[s for s in subsets if len(s) < len(names)], evidence=evidence,
                            evidence_source=source, progress=progress)
