"""``report.md`` of a run: metrics per stage against the majority baseline, and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import RunConfig


def _fmt(x: Any) -> str:
    if isinstance(x, dict) and x.get("available") is False:
        return "n/a"
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


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
        fig.tight_layout(), fig.savefig(out / "loss.png", dpi=110), plt.close(fig)
        files.append("loss.png")
    rft = [h for h in history.get("rft", []) if "reward" in h]
    if rft:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [h["step"] for h in rft]
        ax.plot(steps, [h["reward"] for h in rft], label="total reward")
        for k in sorted({k for h in rft for k in h if k.startswith("rewards/") and k.endswith("/mean")}):
            ax.plot(steps, [h.get(k, float("nan")) for h in rft], label=k.split("/")[1], alpha=0.7)
        ax.set_xlabel("GRPO step"), ax.set_ylabel("mean reward"), ax.set_title("RFT rewards"), ax.legend()
        fig.tight_layout(), fig.savefig(out / "rewards.png", dpi=110), plt.close(fig)
        files.append("rewards.png")
    return files


def _plot_weights(out: Path, weights: dict[str, dict[str, float]], stage: str) -> str | None:
    if not weights:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diseases = list(weights)
    mods = sorted({m for w in weights.values() for m in w})
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(mods), 1)
    for i, m in enumerate(mods):
        ax.bar([j + i * width for j in range(len(diseases))], [weights[d].get(m, 0.0) for d in diseases], width, label=m.upper())
    ax.set_xticks([j + width * (len(mods) - 1) / 2 for j in range(len(diseases))])
    ax.set_xticklabels([d.replace(" ", "\n") for d in diseases], fontsize=7)
    ax.set_ylabel("mean CAO gate"), ax.set_title(f"Modality weights per disease ({stage.upper()})"), ax.legend()
    fig.tight_layout()
    name = "modality_weights.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def write_report(out: Path, cfg: RunConfig, summary: dict[str, Any], history: dict[str, list[dict[str, Any]]]) -> Path:
    stages = summary.get("stages", {})
    lines = ["# medtvt run report", "",
             f"- preset: `{cfg.preset}`, seed {cfg.seed}, stages {' -> '.join(s.upper() for s in cfg.stages)}",
             f"- modalities: {', '.join(cfg.modalities)}; fusion `{cfg.fusion.name}` {cfg.fusion.options or ''}; "
             f"LLM `{cfg.llm.name}` {cfg.llm.options or ''}",
             f"- rewards: {', '.join(f'{r.name} x{r.weight:g}' for r in cfg.rewards)}", ""]
    if stages:
        lines += ["## Clinical efficacy (test split)", "",
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
        last = list(stages)[-1]
        per = stages[last]["ce"].get("per_category", {})
        if per:
            lines += ["", f"## Per category ({last.upper()})", "", "| category | support | precision | recall | F1 | AUC |",
                      "|---|---|---|---|---|---|"]
            for d, v in per.items():
                lines.append(f"| {d} | {v.get('support')} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | {_fmt(v.get('auc'))} |")
        w = stages[last].get("modality_weights")
        img = _plot_weights(out, w, last) if w else None
        if w:
            mods = sorted({m for x in w.values() for m in x})
            lines += ["", f"## Modality weights per disease ({last.upper()}, mean CAO gate)", "",
                      "| category | " + " | ".join(m.upper() for m in mods) + " |", "|---|" + "---|" * len(mods)]
            for d, x in w.items():
                lines.append(f"| {d} | " + " | ".join(_fmt(x.get(m)) for m in mods) + " |")
            if img:
                lines += ["", f"![modality weights]({img})"]
    for f in _plot_curves(out, history):
        lines += ["", f"![{f[:-4]}]({f})"]
    t = summary.get("timings_s", {})
    if t:
        lines += ["", "## Time (s)", "", " | ".join(f"{k} {v:.1f}" for k, v in t.items())]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
