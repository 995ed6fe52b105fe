"""The device a run uses and the ``TrainingArguments`` of every stage: one builder for PT, SFT and RFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ..errors import ConfigError

__all__ = ["resolve_device", "training_arguments"]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; a CUDA device that is not there is a :class:`ConfigError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA device is available; use device=cpu or auto")
    return torch.device(device)


def _report_to() -> list[str]:
    try:
        import tensorboard  # noqa: F401  (optional extra: logs go to TensorBoard when it is installed)

        return ["tensorboard"]
    except ImportError:
        return []


def training_arguments(cfg: Any, out_dir: Path, *, seed: int, device: str, num_workers: int = 0,
                       progress: bool = True) -> TrainingArguments:
    """``TrainingArguments`` of a stage from its config section.

    ``cfg``: a ``StageConfig`` (PT/SFT: ``epochs`` unless ``max_steps`` > 0, a checkpoint each epoch
    unless ``save_steps``) or an ``RFTConfig`` (``max_steps``, ``save_steps``, ``max_grad_norm``).
    """
    use_cpu = resolve_device(device).type == "cpu"
    bf16 = (not use_cpu) and torch.cuda.is_bf16_supported()
    by_epochs = {"num_train_epochs": cfg.epochs} if hasattr(cfg, "epochs") else {}
    clip = getattr(cfg, "max_grad_norm", 1.0)
    return TrainingArguments(
        output_dir=str(out_dir),
        **by_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": cfg.min_lr},
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        save_only_model=False,  # optimizer + scheduler + RNG states: needed for an exact resume
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        bf16=bf16,
        dataloader_num_workers=num_workers,
        remove_unused_columns=False,
        report_to=_report_to(),
        disable_tqdm=not progress,
        max_grad_norm=clip if clip is not None else 0.0,
    )
