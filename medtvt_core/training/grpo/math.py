"""GRPO math of TRL 1.16, as pure tensor functions: advantages, reward weighting, log-probs, the loss.

Each mirrors ``trl/trainer/grpo_trainer.py`` (1.16); ``tests/test_grpo.py`` and
``tests/test_grpo_parity.py`` check them against ``GRPOTrainer`` itself on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ...errors import ConfigError
from ...plugin_calls import call_rewards

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
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
    """Call each ``f(prompts=, completions=, **kwargs)`` (TRL's contract); ``[N, F]`` float32, None -> NaN.

    Through :func:`medtvt_core.plugin_calls.call_rewards` (as evaluation and the contract kit): a reward
    that raises or returns a non-finite or out-of-range value is a one-line error naming it."""
    return call_rewards(reward_funcs, prompts, completions, names=names, **kwargs)


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


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int = 1,
    use_bias_correction_kl: bool = True,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    entropies: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss ``GRPOTrainer._compute_loss`` of TRL 1.16 returns, and the metrics it logs.

    Covers one-turn rollouts without vLLM importance sampling, entropy masking/bonus, off-policy
    masking or MoE aux loss (none is on by default), and the loss types ``grpo``, ``bnpo``,
    ``dr_grpo``, ``dapo``, ``cispo``, ``sapo`` (not ``luspo``/``vespo``). Defaults are TRL 1.16's
    ``GRPOConfig`` defaults: ``beta=0.0``, ``epsilon=0.2``, ``epsilon_high=None`` (=
    ``epsilon_low``), ``delta=None``, ``loss_type="dapo"``, ``use_bias_correction_kl=True``,
    ``importance_sampling_level="token"``, ``sapo_temperature_pos=1.0``, ``sapo_temperature_neg=1.05``.

    Per token (all of it differentiable, nothing detached but ``old`` itself)::

        r      = logp - old                           # old=None: logp.detach() (on-policy, value 0)
        r      = sum_t(r * mask) / max(len, 1)        # importance_sampling_level="sequence" (GSPO): one
                                                      # ratio per completion, broadcast over its tokens
        coef_1 = exp(r)
        # grpo, bnpo, dr_grpo, dapo (PPO clipping):
        coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        coef_1 = clamp(coef_1, max=delta)             # only if delta is not None (two-sided clipping)
        loss_t = -min(coef_1 * A, coef_2 * A)
        # cispo (MiniMax-M1): the clipped ratio is a constant weight of the REINFORCE term
        loss_t = -clamp(coef_1, max=epsilon_high).detach() * A * logp
        # sapo (soft gate instead of clipping): tau = sapo_temperature_pos if A > 0 else _neg
        loss_t = -sigmoid(tau * (coef_1 - 1)) * 4 / tau * A
        kl_t   = exp(ref - logp) - (ref - logp) - 1   # k3; only if beta != 0
        kl_t   = kl_t * coef_1                        # use_bias_correction_kl: the *unclipped* ratio
                                                      # (token or sequence), differentiable (changes the
                                                      # gradient even on-policy)
        loss_t = loss_t + beta * kl_t

    Only tokens with ``completion_mask`` 1 count. Aggregation, with ``S = sum(loss_t * mask)``:

    - ``grpo``, ``sapo``: ``mean_i(sum_t / max(len_i, 1)) / gradient_accumulation_steps``
    - ``bnpo``: ``S / max(sum(mask), 1) / gradient_accumulation_steps``
    - ``dr_grpo``: ``S / (B * max_completion_length) / gradient_accumulation_steps``
    - ``dapo``, ``cispo``: ``S / (max(num_items_in_batch, 1) / num_processes * gradient_accumulation_steps
      / steps_per_generation)``; ``num_items_in_batch=None`` means ``sum(mask)`` of this batch.

    ``cispo`` uses ``epsilon_high`` as the maximum ratio (TRL: its recommended value is 5.0; unset,
    it falls back to ``epsilon_low`` as in TRL, which caps every ratio far below 1).

    To get exactly TRL's value, pass (in train mode):

    - ``num_items_in_batch``: TRL's ``inputs["num_items_in_batch"]``, i.e.
      ``accelerator.gather(loss_mask.sum()).sum()`` computed once per *generation batch* in
      ``_generate_and_score_completions``: the active completion tokens (``completion_mask``, times
      ``tool_mask`` if any, after ``mask_truncated_completions``) of all ``steps_per_generation``
      micro-batches of that generation batch, summed over all processes. The same number for every
      micro-batch sliced from it (and for every ``num_iterations`` pass over it); not pre-divided.
    - ``num_processes``: ``accelerator.num_processes``.
    - ``gradient_accumulation_steps``: the Trainer's ``current_gradient_accumulation_steps`` (set by
      transformers per accumulation window; smaller for a truncated last window).
    - ``steps_per_generation``: ``args.steps_per_generation``.

    In eval mode TRL uses no accumulation: pass ``gradient_accumulation_steps=1`` and
    ``steps_per_generation=1`` (then ``dapo`` is ``S / (num_items / num_processes)``, the others
    are undivided). The returned loss is final: like TRL (``loss_is_scaled_for_ga = True``), the
    caller must not divide it by the accumulation steps again; under DDP the gradient average over
    processes is what ``num_processes`` accounts for. With the defaults ``num_processes=1``,
    ``gradient_accumulation_steps=1``, ``steps_per_generation=1`` the function returns the
    unscaled per-batch loss (``dapo``: ``S / num_items_in_batch``).

    Returns ``(loss, metrics)``; metrics are detached 0-d tensors, computed as TRL logs them:
    ``kl`` (only when ``beta != 0``; the bias-corrected value when the correction is on),
    ``entropy`` (only if ``entropies`` is given); for the PPO-clipped types ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (masked means over active tokens, ``low``:
    ``coef_1 < 1-eps_low`` and ``A < 0``, ``high``: ``coef_1 > 1+eps_high`` and ``A > 0``, with
    ``coef_1`` after the ``delta`` clamp as in TRL), ``clip_ratio/low_min`` and
    ``clip_ratio/high_max`` (min / max over sequences of the per-sequence clip fraction,
    NaN-ignoring; sequences without active tokens are skipped); for ``cispo``
    ``cispo_clip_ratio`` (``coef_1 > epsilon_high`` and ``A > 0``); none for ``sapo``. At sequence
    level the clip means are over sequences (every row counts, as in TRL), not tokens.
    Multi-process: TRL's ``global_masked_mean`` sums ``[sum, count]`` over processes before
    dividing, and the min/max are over gathered sequences. Pass ``reduce`` (sum over processes,
    e.g. ``lambda t: accelerator.reduce(t, reduction="sum")``) and ``gather`` (concatenate over
    processes along dim 0, e.g. ``accelerator.gather``) to get those global values; both are
    collective, so every process must call this function. Without them the metrics are local.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type={loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ConfigError(f"importance_sampling_level={importance_sampling_level!r}; allowed: "
                          f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps")
    if min(num_processes, gradient_accumulation_steps, steps_per_generation) < 1:
        raise ValueError("num_processes, gradient_accumulation_steps and steps_per_generation must be >= 1")
    reduce = reduce or _identity
    gather = gather or _identity
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask  # as TRL: kept in its own dtype (exact token counts even for bf16 log-probs)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps

    log_ratio = per_token_logps - old
    if importance_sampling_level == "sequence":  # GSPO: one ratio per completion, shape [B, 1]
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    per_token_kl = None
    if beta != 0.0:
        diff = ref_per_token_logps - per_token_logps  # type: ignore[operator]
        per_token_kl = torch.exp(diff) - diff - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * per_token_logps
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    masked = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / gradient_accumulation_steps
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0) / gradient_accumulation_steps
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token_loss.size(0) * max_completion_length) / gradient_accumulation_steps
    else:  # dapo, cispo
        n = (mask.sum() if num_items_in_batch is None
             else torch.as_tensor(num_items_in_batch, device=per_token_loss.device))
        normalizer = n.clamp(min=1.0) / num_processes
        normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        loss = masked.sum() / normalizer

    with torch.no_grad():
        def global_masked_mean(x: torch.Tensor) -> torch.Tensor:
            if x.size(-1) == 1:  # sequence level: one value per row, every row counts (TRL)
                local = torch.stack([x.sum(), torch.tensor(float(x.size(0)), device=x.device, dtype=x.dtype)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum().float()])
            totals = reduce(local)
            return totals[0] / totals[1].clamp(min=1.0)

        def masked_seq_mean(x: torch.Tensor) -> torch.Tensor:
            if x.size(-1) == 1:
                return x.squeeze(-1)
            return (x * mask).sum(-1) / mask.sum(-1)  # NaN for rows without active tokens, as TRL

        def nan_extreme(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            keep = ~torch.isnan(x)
            return fn(x[keep]) if keep.any() else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)

        metrics: dict[str, torch.Tensor] = {}
        if per_token_kl is not None:
            metrics["kl"] = global_masked_mean(per_token_kl.detach())
        if entropies is not None:
            metrics["entropy"] = global_masked_mean(entropies.detach())
        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > eps_high) & (adv > 0)).float())
        elif loss_type != "sapo":
            low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).float()
            high = ((coef_1 > 1 + eps_high) & (adv > 0)).float()
            region = ((low + high) > 0).float()
            metrics["clip_ratio/low_mean"] = global_masked_mean(low)
            metrics["clip_ratio/high_mean"] = global_masked_mean(high)
            metrics["clip_ratio/region_mean"] = global_masked_mean(region)
            metrics["clip_ratio/low_min"] = nan_extreme(gather(masked_seq_mean(low)), torch.min)
            metrics["clip_ratio/high_max"] = nan_extreme(gather(masked_seq_mean(high)), torch.max)
    return loss, metrics
