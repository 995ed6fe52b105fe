"""``report.md`` of a run: metrics per stage against the majority baseline, and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..io import atomic_write_text, save_figure
from ..metrics.display import undefined_reasons
from .attribution import gate_sentence
from .subsets import plot_subsets, subsets_markdown
from .validation import report_section


def _fmt(x: Any) -> str:
    if isinstance(x, dict) and x.get("available") is False:
        return "n/a"
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def _undefined_notes(ces: dict[str, dict[str, Any]], where: str = "") -> list[str]:
    """One line per stage whose clinical-efficacy numbers are n/a, saying why."""
    out = []
    for s, ce in ces.items():
        why = undefined_reasons(ce)
        for reason in dict.fromkeys(why.values()):
            keys = ", ".join(k for k, r in why.items() if r == reason)
            out.append(f"- {s.upper()}{f' ({where})' if where else ''}: {keys} n/a: {reason}")
    return out


def _plot_curves(out: Path, history: dict[str, list[dict[str, Any]]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    sup = {s: [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h and s != "rft"]
           for s, hist in history.items() if s != "rft"}
    if any(sup.values()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s, pts in sup.items():
            if pts:
                ax.plot(*zip(*pts), label=s.upper())
        ax.set_xlabel("optimiser step"), ax.set_ylabel("cross-entropy"), ax.set_title("PT / SFT loss"), ax.legend()
        fig.tight_layout(), save_figure(fig, out / "loss.png"), plt.close(fig)
        files.append("loss.png")
    rft = [h for h in history.get("rft", []) if "reward" in h]
    if rft:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [h["step"] for h in rft]
        ax.plot(steps, [h["reward"] for h in rft], label="total reward")
        for k in sorted({k for h in rft for k in h if k.startswith("rewards/") and k.endswith("/mean")}):
            ax.plot(steps, [h.get(k, float("nan")) for h in rft], label=k.split("/")[1], alpha=0.7)
        ax.set_xlabel("GRPO step"), ax.set_ylabel("mean reward"), ax.set_title("RFT rewards"), ax.legend()
        fig.tight_layout(), save_figure(fig, out / "rewards.png"), plt.close(fig)
        files.append("rewards.png")
    return files


def _plot_weights(out: Path, weights: dict[str, dict[str, float]], attribution: dict[str, Any] | None,
                  stage: str) -> str | None:
    """Bars per disease: the mean CAO gate of each modality and, when computed, the drop in the rate
    of naming the disease when that modality is masked."""
    per = (attribution or {}).get("per_disease", {})
    if not weights and not per:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, d) for t, d in (("mean CAO gate", {k: v for k, v in weights.items()}),
                                  ("drop in P(named) when masked", {k: v["delta"] for k, v in per.items()})) if d]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        diseases = list(data)
        mods = sorted({m for w in data.values() for m in w})
        width = 0.8 / max(len(mods), 1)
        for i, m in enumerate(mods):
            ax.bar([j + i * width for j in range(len(diseases))], [data[d].get(m, 0.0) for d in diseases], width,
                   label=m.upper())
        ax.set_xticks([j + width * (len(mods) - 1) / 2 for j in range(len(diseases))])
        ax.set_xticklabels([d.replace(" ", "\n") for d in diseases], fontsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(f"{title} ({stage.upper()})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = "modality_weights.png"
    save_figure(fig, out / name)
    plt.close(fig)
    return name


def _saturation(weights: dict[str, dict[str, float]]) -> str | None:
    vals = [v for w in weights.values() for v in w.values()]
    if not vals:
        return None
    hi, lo = sum(v > 0.95 for v in vals), sum(v < 0.05 for v in vals)
    if hi + lo >= 0.8 * len(vals):
        return (f"The CAO gates saturate: {hi} of {len(vals)} (disease, modality) means are above 0.95 and {lo} "
                f"below 0.05. A saturated gate scales a modality's tokens by ~1 or ~0 for every patient, so it "
                f"does not say which modality drove a diagnosis; read the masking column instead.")
    return None


def write_report(out: Path, cfg: RunConfig, summary: dict[str, Any], history: dict[str, list[dict[str, Any]]]) -> Path:
    stages = summary.get("stages", {})
    lines = ["# medtvt run report", "",
             f"- preset: `{cfg.preset}`, seed {cfg.seed}, stages {' -> '.join(s.upper() for s in cfg.stages)}",
             f"- modalities: {', '.join(cfg.modalities)}; fusion `{cfg.fusion.name}` {cfg.fusion.options or ''}; "
             f"LLM `{cfg.llm.name}` {cfg.llm.options or ''}",
             f"- rewards: {', '.join(f'{r.name} x{r.weight:g}' for r in cfg.rewards)}", ""]
    plugins = summary.get("plugins") or []
    if plugins:  # every plugin a result depends on, with the distribution and version that shipped it
        lines += ["## Plugins", "", "| role | plugin | distribution | version |", "|---|---|---|---|"]
        lines += [f"| {p['role']} | `{p['name']}` | {p['distribution']} | {p['version'] or '?'} |" for p in plugins]
        lines.append("")
    if stages:
        lines += [f"## Clinical efficacy (test split, `{next(iter(stages.values())).get('protocol', 'strict')}` protocol)", "",
                  "| stage | precision | recall | F1 | AUC | answer rate | BLEU-4 | ROUGE-L | METEOR | BERTScore | mean reward |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, m in stages.items():
            ce, nlg = m["ce"], m.get("nlg", {})
            lines.append(f"| {s.upper()} | {_fmt(ce['precision'])} | {_fmt(ce['recall'])} | {_fmt(ce['f1'])} | "
                         f"{_fmt(ce.get('auc'))} | {_fmt(ce.get('answer_rate'))} | {_fmt(nlg.get('bleu_4', nlg.get('bleu')))} | "
                         f"{_fmt(nlg.get('rouge'))} | {_fmt(nlg.get('meteor'))} | {_fmt(nlg.get('bertscore'))} | "
                         f"{_fmt(m.get('reward', {}).get('total'))} |")
        base = summary.get("baseline")
        if base:
            lines.append(f"| majority baseline ({base['strategy']}: {'; '.join(base['prediction']) or 'empty set'}) | "
                         f"{_fmt(base['precision'])} | {_fmt(base['recall'])} | {_fmt(base['f1'])} | {_fmt(base.get('auc'))} | | | | | | |")
        lines.append("")
        unavailable = {k: v["reason"] for m in stages.values() for k, v in m.get("nlg", {}).items()
                       if isinstance(v, dict) and v.get("available") is False}
        for k, why in unavailable.items():
            lines.append(f"- {k}: unavailable ({why})")
        lines += _undefined_notes({s: m["ce"] for s, m in stages.items()})
        last = list(stages)[-1]
        per, proto = stages[last]["ce"].get("per_category", {}), stages[last].get("protocol", "strict")
        if per and not all("precision" in v for v in per.values()):
            # the reference protocol reports per category only tp/fp/fn and AUC: the table is the strict one's
            proto = "strict"
            per = stages[last].get("by_protocol", {}).get(proto, {}).get("ce", {}).get("per_category", {})
        if per:
            lines += ["", f"## Per category ({last.upper()}, `{proto}` protocol)", "",
                      "| category | support | precision | recall | F1 | AUC |",
                      "|---|---|---|---|---|---|"]
            for d, v in per.items():
                lines.append(f"| {d} | {v.get('support')} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | {_fmt(v.get('auc'))} |")
        w = stages[last].get("modality_weights") or {}
        att = stages[last].get("attribution")
        img = _plot_weights(out, w, att, last)
        per = (att or {}).get("per_disease", {})
        if w or per:
            mods = sorted({m for x in list(w.values()) + [v["delta"] for v in per.values()] for m in x})
            lines += ["", f"## Modality attributions per disease ({last.upper()})", "",
                      "Per disease, over test records whose reference holds it: the mean CAO gate of each modality, "
                      "the share of greedy reports naming the disease with every modality, and the drop in that "
                      "share when one modality is masked (re-generation; " + (att or {}).get("method", "not computed")
                      + ").", "",
                      "| category | n | named | " + " | ".join(f"gate {m.upper()}" for m in mods) + " | "
                      + " | ".join(f"drop w/o {m.upper()}" for m in mods) + " |",
                      "|---|---|---|" + "---|" * (2 * len(mods))]
            for d in dict.fromkeys([*w, *per]):
                pa = per.get(d, {})
                lines.append(f"| {d} | {pa.get('n', '')} | {_fmt(pa.get('named'))} | "
                             + " | ".join(_fmt(w.get(d, {}).get(m)) for m in mods) + " | "
                             + " | ".join(_fmt(pa.get("delta", {}).get(m)) for m in mods) + " |")
            sat = _saturation(w)
            if sat:
                lines += ["", sat]
            if stages[last].get("gate_check"):
                lines += ["", gate_sentence(stages[last]["gate_check"])]
            if img:
                lines += ["", f"![modality attributions]({img})"]
        if stages[last].get("subsets"):
            lines += [""] + subsets_markdown(stages[last]["subsets"], plot_subsets(out, stages[last]["subsets"], last))
        ref = {s_: m["by_protocol"]["reference"] for s_, m in stages.items() if "reference" in m.get("by_protocol", {})}
        if ref:
            lines += ["", "## Reference protocol (the reference code's evaluate.py; comparable with the paper's tables)", "",
                      "| stage | METEOR | ROUGE-L (recall) | BLEU | BERTScore (recall) | precision | recall | F1 | AUC (pooled) | n averaged |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for s_, m in ref.items():
                ce, nlg = m["ce"], m["nlg"]
                lines.append(f"| {s_.upper()} | {_fmt(nlg.get('meteor'))} | {_fmt(nlg.get('rouge'))} | {_fmt(nlg.get('bleu'))} | "
                             f"{_fmt(nlg.get('bertscore'))} | {_fmt(ce.get('precision'))} | {_fmt(ce.get('recall'))} | "
                             f"{_fmt(ce.get('f1'))} | {_fmt(ce.get('auc'))} | {ce.get('n_averaged', '')} |")
            lines += ["", *_undefined_notes({s_: m["ce"] for s_, m in ref.items()}, "reference protocol")]
            prim = next(iter(stages.values())).get("protocol", "strict")
            lines += ["", f"The tables above use the `{prim}` protocol (metrics.json: `ce`/`nlg`; every protocol under "
                          f"`by_protocol`)."]
    for f in _plot_curves(out, history):
        lines += ["", f"![{f[:-4]}]({f})"]
    if summary.get("validation"):
        lines += report_section(out, summary, history)
    t = summary.get("timings_s", {})
    if t:
        lines += ["", "## Time (s)", "", " | ".join(f"{k} {v:.1f}" for k, v in t.items())]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")  # a reader never sees half a report
    return path
