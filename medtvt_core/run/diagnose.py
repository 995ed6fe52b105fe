"""One patient -> one generated report, from a saved model (``medtvt diagnose``).

The model directory is self-contained: the readers (with their training statistics), the
tokenizer and the default question come from its processor, so neither the run's data nor its
configuration is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..answers import answer_set
from ..errors import ConfigError
from ..model.generation import generate_reports
from ..model.modeling import MedTVTForConditionalGeneration
from ..model.processing import MedTVTProcessor
from ..model.serialization import is_saved_model
from ..plugins import Catalog
from .attribution import patient_attribution
from .layout import FINAL

__all__ = ["load_model_dir", "model_dir_of_run", "diagnose", "diagnose_json", "missing_notice"]

#: ``progress(fraction done, what comes next)``: called between the steps of :func:`diagnose`.
Progress = Callable[[float, str], None]


def model_dir_of_run(run_dir: Path, stage: str | None = None) -> Path:
    """``<run>/<stage>/final`` (default: the last stage of the run that completed)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: not a medtvt run directory (no config.yaml)")
    stages = [stage] if stage else ["rft", "sft", "pt"]
    # A run of `ablate` or `run --seeds` keeps its models in the shared stage store (metrics.json says where).
    metrics = run_dir / "metrics.json"
    try:
        stored = json.loads(metrics.read_text()).get("models", {}) if metrics.is_file() else {}
    except ValueError:
        stored = {}
    for s in stages:
        for d in (run_dir / s / FINAL, Path(stored[s]) if s in stored else None):
            if d is not None and is_saved_model(d):
                return d
    want = f"stage {stage!r}" if stage else "any stage"
    raise ConfigError(f"--run {run_dir}: {want} has no completed model ({run_dir / (stage or '<stage>') / FINAL})")


def load_model_dir(model_dir: Path, *, device: str | None = None, catalog: Catalog | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` saved in ``model_dir``, in eval mode."""
    model = MedTVTForConditionalGeneration.from_pretrained(model_dir, catalog=catalog, device_map=device)
    processor = MedTVTProcessor.from_pretrained(model_dir, catalog=catalog)
    model.eval()
    return model, processor


def missing_notice(model: Any, given: Any) -> str | None:
    """One line when modalities are absent and the model was not trained for that (no modality dropout)."""
    absent = [m for m in model.modalities if m not in given]
    if not absent or getattr(model.config, "trained_for_missing_modalities", False):
        return None
    return (f"note: this model was not trained for missing modalities (no modality dropout); without "
            f"{', '.join(absent)} its report may be unreliable or malformed")


@torch.no_grad()
def diagnose(model: Any, processor: Any, inputs: Mapping[str, tuple[str, Mapping[str, str]]], *,
             question: str | None = None, max_new_tokens: int | None = None,
             attribution: bool = True, samples: int = 8, seed: int = 0,
             progress: Progress | None = None, batch: Mapping[str, Any] | None = None,
             constrain: bool = True) -> dict[str, Any]:
    """Report, disease set, modality weights and (optionally) per-disease attributions of one patient.

    Returns ``{"report", "diseases" (None without a valid answer block), "modality_weights"
    (None when the fusion weighs none), "attribution", "modalities_given", "question", "notice"}``;
    ``notice`` is one line when a modality is absent and the model never trained with one missing
    (no modality dropout saved in its config), else None. ``constrain``: every report (the greedy one and
    the attribution's samples) is decoded under the report grammar, so it is well-formed unless it runs out
    of ``max_new_tokens`` (:func:`~medtvt_core.model.generation.report_constraint`; ``"constrained"`` in
    the result).
    """
    step = progress or (lambda f, d: None)
    step(0.0, "reading the inputs")
    if batch is None:  # ``batch``: the same inputs already read (the web app shows what the reader made)
        batch = processor.read_patient(inputs, question, modalities=model.modalities)
    # generations: the greedy report; with attributions, the samples with every modality and (given more
    # than one) without each
    n_gen = 1 + (1 + (len(inputs) if len(inputs) > 1 else 0) if attribution else 0)
    step(0.05, "writing the report")
    text = generate_reports(model, processor, batch, max_new_tokens=max_new_tokens or processor.max_new_tokens,
                            constrain=constrain).texts[0]
    _, w = model.modality_tokens(batch["modality_mask"], batch["modality_inputs"], batch["modality_features"])
    weights = None if w is None else {m: float(w[0, j]) for j, m in enumerate(model.modalities)
                                      if bool(batch["modality_mask"][0, j])}
    found = answer_set(text)
    out = {"report": text, "diseases": sorted(found) if found is not None else None, "modality_weights": weights,
           "modalities_given": [m for m in model.modalities if m in inputs], "question": batch["prompts"][0],
           "notice": missing_notice(model, inputs), "constrained": constrain}
    if attribution:
        done = lambda k, what: step(0.05 + 0.95 * (1 + k) / n_gen, what)  # noqa: E731
        done(0, "sampling reports with every modality")
        out["attribution"] = patient_attribution(model, processor, batch, text, samples=samples, seed=seed,
                                                 max_new_tokens=max_new_tokens, progress=done, constrain=constrain)
    step(1.0, "done")
    return out


def diagnose_json(model_dir: Path, model: Any, processor: Any, inputs: Mapping[str, tuple[str, Mapping[str, str]]],
                  *, question: str | None = None, max_new_tokens: int | None = None, samples: int = 8,
                  progress: Progress | None = None, batch: Mapping[str, Any] | None = None,
                  constrain: bool = True) -> dict[str, Any]:
    """What ``medtvt diagnose --json`` prints, and what the web app shows and its HTTP API returns:
    :func:`diagnose` (attributions from ``samples`` sampled reports, none when 0) plus ``"model"``."""
    res = diagnose(model, processor, inputs, question=question, max_new_tokens=max_new_tokens,
                   attribution=samples > 0, samples=samples, progress=progress, batch=batch, constrain=constrain)
    res["model"] = str(model_dir)
    return res
