"""One patient -> one generated report, from a finished run (``medtvt diagnose``)."""

from __future__ import annotations

from pathlib import Path


from .errors import ConfigError, DataError


def diagnose(run_dir: Path, *, stage: str | None = None, ecg: str | None = None, cxr: str | None = None,
             lab: str | None = None, lab_id: str | None = None, question: str | None = None,
             max_new_tokens: int | None = None) -> tuple[str, dict[str, float] | None]:
    """Generated report and modality weights for the given files (absent modalities are masked)."""
    import torch

    from .config import resolve_config
    from .data.dataset import QADataset
    from .data.schema import QARecord
    from .orchestrator import FINAL, Run

    cfg = resolve_config(config_file=Path(run_dir) / "config.yaml")
    given = {"ecg": ecg, "cxr": cxr, "lab": lab}
    unused = [m for m, v in given.items() if v and m not in cfg.modalities]
    if unused:
        raise ConfigError(f"--{unused[0]}: the run at {run_dir} was trained without the {unused[0]} modality "
                          f"(modalities: {', '.join(cfg.modalities)})")
    if not any(given.values()):
        raise ConfigError("give at least one of --ecg, --cxr, --lab")
    stage = stage or cfg.stages[-1]
    r = Run(cfg, resume=True, progress=False, echo=lambda s: None)
    r.setup(check_config=False, encode=False)
    final = r._stage_dir(stage) / FINAL
    if not (final / "config.json").is_file():
        raise ConfigError(f"stage {stage!r} of {run_dir} has no completed checkpoint ({final})")
    # PT does not run the fusion; a PT shared by `medtvt ablate` holds another variant's fusion tensors
    r.model.load_weights(final, exclude=("fusion.",) if stage == "pt" else ())
    r.model.configure_trainable(stage)
    r.model.eval()

    modalities = dict(r.modalities)
    refs: dict[str, list[str]] = {}
    if ecg:
        refs[modalities["ecg"].record_field] = [str(Path(ecg).resolve())]
    if cxr:
        refs[modalities["cxr"].record_field] = [str(Path(cxr).resolve())]
    if lab:
        # A reader of the user's CSV with the run's training statistics (never refitted on one row).
        import pandas as pd

        old = modalities["lab"]
        opts = {**old.config.model_dump(), "csv": str(Path(lab).resolve())}
        new = type(old)(**opts)
        new.set_stats(old.stats)
        modalities["lab"] = new
        if lab_id is None:
            try:
                ids = pd.read_csv(lab, usecols=[opts["key_column"]])[opts["key_column"]].tolist()
            except (ValueError, OSError) as exc:
                raise DataError(f"--lab {lab}: cannot read column {opts['key_column']!r}: {exc}") from None
            if len(ids) != 1:
                raise DataError(f"--lab {lab}: {len(ids)} rows; pick one with --lab-id (its {opts['key_column']})")
            lab_id = str(ids[0])
        refs[new.record_field] = [str(lab_id)]
    q = question or r.splits["test"].records[0].question
    rec = QARecord.model_validate({"id": "patient", "messages": [{"role": "user", "content": q},
                                                                {"role": "assistant", "content": "(to be generated)"}],
                                   **refs})
    ds = QADataset([rec], root=Path("/"), modalities=modalities, train=False)
    batch = ds.collator()([ds[0]])
    proc = r.model.processor
    feats = proc.generation_features(batch["prompts"])
    with torch.no_grad():  # inference only: no autograd graph (and no requires_grad warning on float())
        new_ids = r.model.generate(feats["input_ids"], feats["attention_mask"], modality_mask=batch["modality_mask"],
                                   modality_inputs=batch["modality_inputs"], modality_features=batch["modality_features"],
                                   max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, do_sample=False)
        _, w = r.model.modality_tokens(batch["modality_mask"], batch["modality_inputs"], batch["modality_features"])
    weights = None if w is None else {m: float(w[0, j]) for j, m in enumerate(r.model.modalities)
                                      if bool(batch["modality_mask"][0, j])}
    return proc.decode(new_ids)[0], weights
