"""Which parameters each training stage trains (docs/method.md, "Training").

| stage | trainable | frozen |
|---|---|---|
| PT  | encoder pooling heads, projectors, LoRA | encoders, LLM base; the fusion layer does not run |
| SFT | fusion (MPL), LoRA | encoders, projectors |
| RFT | as SFT | as SFT |

``train_extras`` adds the LLM's norms, biases and input embeddings, as the reference does.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["STAGES_TRAINABLE", "configure_trainable", "freeze", "trainable_parameters", "parameter_group"]

#: Parameter groups trained per stage; the LLM extras are opt-in on top.
STAGES_TRAINABLE: dict[str, tuple[str, ...]] = {
    "pt": ("encoder_heads", "projectors", "lora"),
    "sft": ("fusion", "lora"),
    "rft": ("fusion", "lora"),
}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require grad, by name (``named_parameters`` lists a tied tensor once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def parameter_group(model: Any, group: str) -> list[str]:
    """Parameter names of ``group``: ``encoder_heads``, ``projectors``, ``fusion``, ``lora`` or ``extras``."""
    named = list(model.named_parameters())
    if group == "encoder_heads":
        heads = {id(p) for enc in model.encoders.values() for p in enc.head_parameters()}
        return [n for n, p in named if n.startswith("encoders.") and id(p) in heads]
    if group in ("projectors", "fusion"):
        return [n for n, _ in named if n.startswith(f"{group}.")]
    if group == "lora":
        return [n for n, _ in named if "lora_" in n]
    if group == "extras":
        return [f"llm.{n}" for n in model.llm_plugin.extra_parameter_names(model.llm)]
    raise ConfigError(f"unknown parameter group {group!r}")


def configure_trainable(model: Any, stage: str, *, train_extras: bool = False) -> list[str]:
    """Freeze everything, then unfreeze the groups of ``stage`` (plus the LLM extras when
    ``train_extras``); record the stage in ``model.config``.  Returns the trainable names."""
    if stage not in STAGES_TRAINABLE:
        raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES_TRAINABLE)}")
    groups = list(STAGES_TRAINABLE[stage]) + (["extras"] if train_extras else [])
    names = {n for g in groups for n in parameter_group(model, g)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    model.config.stage = stage
    model.config.extras_trained = bool(model.config.extras_trained or train_extras)
    return list(trainable_parameters(model))


def freeze(model: nn.Module) -> None:
    """Nothing trains (evaluation, a frozen reference); the configured stage is kept."""
    for p in model.parameters():
        p.requires_grad_(False)
