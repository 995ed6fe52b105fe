"""``medtvt export``: a standalone model directory with a model card, optionally with LoRA merged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..io import atomic_dir
from ..metrics.display import undefined_reasons
from ..model.serialization import is_saved_model
from .diagnose import load_model_dir
from .layout import FINAL

__all__ = ["export_model", "model_card"]

_WARNING = ("**Research model, not a medical device.** It was trained to reproduce and study the MedTVT-R1 "
            "method; it must not be used to diagnose, treat or triage patients, and its reports are not "
            "clinical advice.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict) and v.get("available") is False:
        return "n/a"
    return "n/a" if v is None else str(v)


def model_card(run_dir: Path, stage: str, model: Any, *, merged: bool) -> str:
    """``README.md`` of an exported model: data, stages, the run's metrics, intended use, warning."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    data = cfg.get("data", {})
    if data.get("root") is None:
        s = data.get("synth", {})
        source = (f"the embedded **synthetic** cohort (`medtvt data synth`: {s.get('n_patients')} patients, seed "
                  f"{s.get('seed')}, test fraction {s.get('test_fraction')}); no real patient data")
    else:
        source = f"the dataset at `{data['root']}` (MedTVT-QA records; see its `medtvt_dataset.json`)"
    stages = cfg.get("stages", [])
    done = stages[: stages.index(stage) + 1] if stage in stages else [stage]
    c = model.config
    lines = [
        "---", "library_name: transformers", "tags: [medtvt, multimodal, research]", "---", "",
        f"# medtvt model: `{stage}` stage of `{run_dir.name}`", "", _WARNING, "",
        "## Model", "",
        f"- modalities: {', '.join(c.modalities)} (encoders: "
        + ", ".join(f"{m} `{c.encoders[m]['name']}`" for m in c.modalities) + ")",
        f"- fusion: `{c.fusion['name']}` {c.fusion.get('options') or ''}; LLM: `{c.llm['name']}` {c.llm.get('options') or ''}",
        f"- tokens per modality: {c.tokens_per_modality}; LoRA {'merged into the LLM weights' if merged else 'adapter'}",
        f"- stages trained: {' -> '.join(s.upper() for s in done)} (preset `{cfg.get('preset')}`, seed {cfg.get('seed')})",
    ]
    if c.weight_references:
        lines.append("- weights referenced, not copied (the same files must exist to load this model):")
        lines += [f"  - {r['component']}: `{r['path']}` (sha256 {r['sha256'][:16]}...)" for r in c.weight_references]
    lines += ["", "## Training data", "", f"Trained on {source}.", "", "## Metrics of this run (test split)", ""]
    m = metrics.get("stages", {}).get(stage)
    if m:
        ce, nlg = m["ce"], m.get("nlg", {})
        lines += ["| F1 | precision | recall | AUC | BLEU | ROUGE-L | METEOR | BERTScore |", "|---|---|---|---|---|---|---|---|",
                  f"| {_fmt(ce['f1'])} | {_fmt(ce['precision'])} | {_fmt(ce['recall'])} | {_fmt(ce.get('auc'))} | "
                  f"{_fmt(nlg.get('bleu'))} | {_fmt(nlg.get('rouge'))} | {_fmt(nlg.get('meteor'))} | {_fmt(nlg.get('bertscore'))} |"]
        lines += ["", f"Protocol: `{m.get('protocol', 'strict')}`."]
        lines += [f"- {k}: n/a ({r})" for k, r in undefined_reasons(ce).items()]
        base = metrics.get("baseline")
        if base:
            lines += ["", f"Majority-class baseline F1: {_fmt(base.get('f1'))} ({base.get('strategy')})."]
    else:
        lines.append("No evaluation of this stage was recorded in the run.")
    lines += ["", "## Intended use", "",
              "Research on multimodal (ECG, chest X-ray, laboratory) reasoning with language models: reproducing "
              "and extending the MedTVT-R1 experiments, ablations, method development.", "",
              "## Use", "", "```bash", "medtvt diagnose --model <this directory> --ecg <record> --cxr <image.jpg> "
              "--lab <labs.csv>", "```", "", "```python", "import medtvt_core", "from transformers import AutoModel",
              "model = AutoModel.from_pretrained('<this directory>')", "```", ""]
    return "\n".join(lines)


def export_model(run_dir: Path, stage: str, out: Path, *, merge_lora: bool = False) -> Path:
    """Copy ``<run>/<stage>/final`` to ``out`` as a standalone model with a model card; ``merge_lora``
    folds the adapter into the LLM weights (peft ``merge_and_unload``)."""
    run_dir, out = Path(run_dir), Path(out)
    src = run_dir / stage / FINAL
    if not is_saved_model(src):
        raise ConfigError(f"--stage {stage}: {run_dir} has no completed {stage} model ({src})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory")
    model, processor = load_model_dir(src)
    if merge_lora:
        if model.config.lora_merged:
            raise ConfigError(f"{src}: the LoRA adapter is already merged")
        model.llm = model.llm.merge_and_unload()
        model.config.lora_merged = True
    with atomic_dir(out) as tmp:  # ``out`` is absent or empty (checked above)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(run_dir, stage, model, merged=merge_lora))
    return out
