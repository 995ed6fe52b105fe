"""PT and SFT: next-token cross-entropy on answer tokens with transformers' ``Trainer``.

The same code runs on this CPU and under ``accelerate launch`` (DDP, FSDP, DeepSpeed configs in
``examples/accelerate/``): distribution is the Trainer's business, not ours.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback

from ..checkpoints import step_checkpoints
from ..config import StageConfig
from ..model.serialization import is_saved_model, load_weights
from .arguments import training_arguments

log = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.json"  # written last into a Trainer checkpoint


class MedTVTTrainer(Trainer):
    """``Trainer`` whose checkpoints are complete saved models (``model.save_pretrained``) and whose
    resume loads them strictly (every saved tensor present with its shape, none unknown).

    Trainer's own loader only warns about missing keys, which would resume from a half-loaded model.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)


class _HistoryCallback(TrainerCallback):
    def __init__(self, sink: Callable[[dict[str, Any]], None] | None):
        self.sink = sink

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401
        if self.sink and logs:
            self.sink({"step": state.global_step, "epoch": state.epoch, **logs})


class SupervisedCollator:
    """Dataset items -> model inputs: the data collator, then the processor (answer-only labels)."""

    def __init__(self, data_collator: Callable[[list[Any]], dict[str, Any]], processor: Any, max_length: int):
        self.data_collator = data_collator
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        feats = self.processor(self.data_collator(items), answers=True, max_length=self.max_length)
        feats.pop("index")
        return feats


def last_complete_checkpoint(out_dir: Path) -> str | None:
    """The newest Trainer checkpoint under ``out_dir`` that was written to the end, or None.

    Trainer writes ``checkpoint-N/`` in place, ``trainer_state.json`` last: a run killed while saving
    leaves a folder without it (or with it cut short).  Such folders are removed, so that the resumed
    run rewrites them whole.
    """
    for p in reversed(step_checkpoints(out_dir)):
        try:
            json.loads((p / TRAINER_STATE).read_text())
            if is_saved_model(p):
                return str(p)
        except (OSError, ValueError):
            pass
        log.warning("removing incomplete checkpoint %s (the run was stopped while writing it)", p)
        shutil.rmtree(p)
    return None


def run_supervised(
    model: torch.nn.Module,
    train_dataset: torch.utils.data.Dataset,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    cfg: StageConfig,
    out_dir: Path,
    *,
    seed: int,
    device: str = "auto",
    num_workers: int = 0,
    resume: bool = False,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    processor: Any = None,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Train ``model`` (its trainable parameters are already set) and return the log history.

    ``processor`` is saved into every checkpoint, which makes each one a complete model.
    ``callbacks``: extra ``TrainerCallback`` objects (e.g. the run's validation)."""
    from transformers.trainer_callback import PrinterCallback

    args = training_arguments(cfg, out_dir, seed=seed, device=device, num_workers=num_workers, progress=progress)
    trainer = MedTVTTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                            processing_class=processor, callbacks=[_HistoryCallback(on_log), *callbacks])
    if not progress:  # without progress bars Trainer prints every log dict instead
        trainer.remove_callback(PrinterCallback)
    last = last_complete_checkpoint(out_dir) if resume else None
    if last:
        log.info("resuming %s from %s", out_dir.name, last)
    trainer.train(resume_from_checkpoint=last)
    return list(trainer.state.log_history)
