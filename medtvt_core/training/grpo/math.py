"""GRPO math of TRL 1.16, as pure tensor functions: advantages, reward weighting, log-probs, the loss.

Each mirrors ``trl/trainer/grpo_trainer.py`` (1.16); ``tests/test_grpo.py`` checks them against
``GRPOTrainer`` itself on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ...errors import ConfigError, PluginContractError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ScaleRewards = Literal["group", "batch", "none"] | bool
# TRL adds this to the std before dividing (grpo_trainer.py, `std_rewards + 1e-4`).
ADV_EPS = 1e-4


# =========================================================================== pure functions
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (Bessel, n-1) std ignoring NaNs; NaN where fewer than 2 values (as ``trl...utils.nanstd``)."""
    d = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=d, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=d, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=d, keepdim=True)
    corr = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * corr)
    return std if keepdim else std.squeeze(d) if dim is not None else std.reshape(())


def _scale_mode(scale_rewards: ScaleRewards) -> str:
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # type: ignore[arg-type]
    if mode not in ("group", "batch", "none"):
        raise ConfigError(f"scale_rewards={scale_rewards!r}; allowed: True, False, 'group', 'batch', 'none'")
    return mode  # type: ignore[return-value]


def group_advantages(rewards: torch.Tensor, num_generations: int,
                     scale_rewards: ScaleRewards = "group") -> torch.Tensor:
    """Group-relative advantages ``[B*G]`` exactly as TRL 1.16 (``sum_then_normalize``).

    ``rewards`` holds G consecutive completions per prompt. ``A = r - nanmean(group)``, divided by
    ``nanstd(group) + 1e-4`` (unbiased std) for ``"group"``/``True``, by the std of the whole
    batch for ``"batch"``, not at all for ``"none"``/``False``. NaN rewards (unscorable
    completions) are left out of the statistics and get advantage 0.
    """
    mode = _scale_mode(scale_rewards)
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be 1-D with a multiple of num_generations={num_generations} entries, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if mode in ("group", "none"):
        std = (nanstd(grouped, dim=1).repeat_interleave(num_generations) if num_generations > 1
               else torch.zeros_like(rewards))
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    adv = rewards - mean
    if mode != "none":
        adv = adv / (std + ADV_EPS)
    return torch.nan_to_num(adv, nan=0.0)


def weighted_rewards(rewards_per_func: torch.Tensor,
                     weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """``[N, F]`` -> ``[N]``: weighted ``nansum`` over reward functions; NaN where all are NaN (TRL)."""
    w = torch.ones(rewards_per_func.size(1)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    total = (rewards_per_func * w.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
    return total


def compute_rewards(reward_funcs: Sequence[Callable[..., Sequence[float | None]]], prompts: list[Any],
                    completions: list[Any], names: Sequence[str] | None = None, **kwargs: Any) -> torch.Tensor:
    """Call each ``f(prompts=, completions=, **kwargs)`` (TRL's contract); ``[N, F]`` float32, None -> NaN."""
    out = torch.full((len(prompts), len(reward_funcs)), float("nan"))
    for j, f in enumerate(reward_funcs):
        vals = f(prompts=prompts, completions=completions, **kwargs)
        name = names[j] if names else getattr(f, "__name__", type(f).__name__)
        if vals is None or len(vals) != len(prompts):
            n = "None" if vals is None else len(vals)
            raise PluginContractError(f"reward {name!r} returned {n} values for {len(prompts)} completions; "
                                      "expected one float or None per completion")
        out[:, j] = torch.tensor([float("nan") if v is None else float(v) for v in vals], dtype=torch.float32)
    return out


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` without materialising the full log-softmax.

    Same result as ``trl.trainer.utils.selective_log_softmax`` (written here because that module is
    TRL-internal and its signature changed across releases). Row loop for half precision, where
    ``logsumexp`` is less stable.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = [torch.gather(torch.log_softmax(lg, -1), -1, ix.unsqueeze(-1)).squeeze(-1)
            for lg, ix in zip(logits, index)]
    return torch.stack(rows)


def completion_mask_after_eos(completion_ids: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    """Long mask ``[N, L]``: 1 up to and including the first EOS, 0 after it (all 1 without EOS)."""
    eos = torch.as_tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids),
                          device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos)
    none = torch.full_like(is_eos[:, 0], is_eos.size(1), dtype=torch.long)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), none)
    return (torch.arange(completion_ids.size(1), device=completion_ids.device)[None] <= first[:, None]).long()


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO objective of TRL 1.16 (token-level importance sampling).

    ``ratio = exp(logp - old)`` (``old=None``: ``logp.detach()``, i.e. on-policy),
    per token ``-min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A) + beta*k3`` with
    ``k3 = exp(ref-logp) - (ref-logp) - 1``. Only tokens where ``completion_mask`` is 1 count.
    Aggregation: ``grpo`` mean per sequence then over sequences; ``bnpo`` sum / mask tokens;
    ``dr_grpo`` sum / (N * max_completion_length); ``dapo`` sum / ``num_items_in_batch`` (the
    active tokens of the whole accumulation window divided by the process count, TRL's
    normaliser; defaults to this batch's tokens). The loss is *not* divided by gradient
    accumulation (the caller does, except for ``dapo``).

    Returns ``(loss, metrics)``; metrics (detached 0-d tensors, means over active tokens): ``kl``
    (when ``beta != 0``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type={loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask.to(per_token_logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_kl = None
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps")
        diff = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(diff) - diff - 1
        per_token_loss = per_token_loss + beta * per_token_kl

    masked = per_token_loss * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = masked.sum() / (per_token_loss.size(0) * max_completion_length)
    else:  # dapo
        n = (mask.sum() if num_items_in_batch is None
             else torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device))
        loss = masked.sum() / n.clamp(min=1.0)

    with torch.no_grad():
        denom = mask.sum().clamp(min=1.0)

        def mmean(x: torch.Tensor) -> torch.Tensor:
            return (x.to(mask.dtype) * mask).sum() / denom

        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + eps_high) & (adv > 0)
        metrics = {"clip_ratio/low_mean": mmean(low), "clip_ratio/high_mean": mmean(high),
                   "clip_ratio/region_mean": mmean(low | high)}
        if per_token_kl is not None:
            metrics["kl"] = mmean(per_token_kl)
    return loss, metrics


