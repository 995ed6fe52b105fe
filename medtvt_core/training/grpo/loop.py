"""GRPO (stage 3, RFT) with TRL 1.16's math, for any policy that follows :class:`GRPOPolicy`.

Why not ``trl.GRPOTrainer`` as is (SPEC, "Environment facts"): it carries only image fields
(``pixel_values`` and kin) through generation and log-prob computation, so our modality
features/tokens cannot reach the model; and with ``beta > 0`` and no peft it rebuilds the
reference from the model's hub id, which our composite model does not have (with peft it uses
the base with the adapter disabled unless a "ref" adapter was loaded: not the SFT model of our
MPL/projector parts either).  So the loop is ours;
the math mirrors ``trl/trainer/grpo_trainer.py`` (1.16) line for line, and
``tests/test_grpo.py`` checks loss, gradients and metrics against ``GRPOTrainer.compute_loss``.

What is reused rather than rewritten: ``accelerate.Accelerator`` (devices, DDP/FSDP wrapping
through :meth:`GRPOPolicy.prepare`, autocast, ``backward``, ``clip_grad_norm_``, ``gather``),
``transformers.get_scheduler`` for the LR schedule, HF ``generate`` (KV cache) inside TRL's
``unwrap_model_for_generation`` in :class:`CausalLMPolicy`, safetensors for checkpoints.

Public API: :func:`group_advantages`, :func:`weighted_rewards`, :func:`selective_log_softmax`,
:func:`completion_mask_after_eos`, :func:`repeat_batch`, :func:`grpo_loss`, :class:`GRPOPolicy`,
:func:`frozen_reference`, :class:`CausalLMPolicy`, :class:`MedTVTPolicy`, :class:`GRPOLoop`,
:class:`LoopState`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ...errors import CheckpointError, ConfigError, DataError

__all__ = [
    "LOSS_TYPES",
    "run_grpo",
    "CausalLMPolicy",
    "GRPOLoop",
    "GRPOPolicy",
    "LoopState",
    "MedTVTPolicy",
    "completion_mask_after_eos",
    "compute_rewards",
    "frozen_reference",
    "group_advantages",
    "grpo_loss",
    "nanstd",
    "repeat_batch",
    "selective_log_softmax",
    "weighted_rewards",
]

from .math import (LOSS_TYPES, _scale_mode, completion_mask_after_eos, compute_rewards,
                   group_advantages, grpo_loss, nanstd, selective_log_softmax, weighted_rewards)

# =========================================================================== policies
@runtime_checkable
class GRPOPolicy(Protocol):
    """What :class:`GRPOLoop` needs from a policy (our multimodal model or a plain causal LM).

    Optional extras the loop uses when present: ``prepare(accelerator, *, evaluation_mode=False)``
    (let accelerate place/wrap the module; returns the wrapped module or None), ``train()``,
    ``eval()``.
    """

    def generate(self, batch: Any, *, num_generations: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> dict[str, Any]:
        """Sample G completions per prompt (G consecutive rows per prompt).

        Returns ``prompt_ids``/``prompt_mask`` ``[N*G, P]`` (left-padded), ``completion_ids``/
        ``completion_mask`` ``[N*G, L]`` (mask cut after the first EOS, EOS kept),
        ``batch_repeated`` (what :meth:`per_token_logps` needs to score the N*G rows:
        :class:`CausalLMPolicy` repeats each record G times, :class:`MedTVTPolicy` keeps the
        batch as is because the model expands it) and ``completions`` (decoded text per row,
        given to reward functions).
        """
        ...

    def per_token_logps(self, batch_repeated: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                        temperature: float = 1.0) -> torch.Tensor:
        """``[N*G, L]`` log-probs of the completion tokens under ``logits / temperature``; 0 where masked."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (and checkpoints store)."""
        ...


def frozen_reference(policy: Any, *, share_frozen: bool = True) -> Any:
    """Deep copy of ``policy`` with every parameter frozen, in eval mode: pi_ref = the SFT model.

    Call it on the SFT policy *before* training. With LoRA this keeps the trained SFT adapter
    (and MPL weights) in the copy; the base with the adapter disabled would be the pre-SFT model
    (SPEC). Memory: with ``share_frozen`` the parameters that are already frozen (LLM base,
    encoders) are shared with the policy, not copied, so the reference costs about the size of
    the trainable parameters (LoRA + MPL); they never change during RFT. Without it (needed when
    FSDP/DeepSpeed will shard or flatten the policy's parameters) the copy is a full second model.
    Not needed when ``beta == 0``.
    """
    memo: dict[int, Any] = {}
    if share_frozen:
        memo = {id(p): p for p in _all_parameters(policy) if not p.requires_grad}
    ref = copy.deepcopy(policy, memo)
    for p in _all_parameters(ref):
        p.requires_grad_(False)
    if hasattr(ref, "eval"):
        ref.eval()
    return ref


def _all_parameters(policy: Any) -> list[nn.Parameter]:
    if isinstance(policy, nn.Module):
        return list(policy.parameters())
    mods = [v for v in vars(policy).values() if isinstance(v, nn.Module)]
    ps = [p for m in mods for p in m.parameters()]
    return ps or list(policy.trainable_parameters())


def repeat_batch(batch: Any, num_generations: int) -> Any:
    """Every row of ``batch`` repeated G times consecutively (tensors along dim 0, lists, tuples, dicts).

    For our collator's layout this is exact: ``modality_mask [B,M]`` and the present-rows-only
    ``modality_features[m] [n_m, ...]`` are both repeat-interleaved, so present rows stay in batch
    order. Non-sequence values (strings, numbers, None) are kept as they are.
    """
    if isinstance(batch, torch.Tensor):
        return batch.repeat_interleave(num_generations, 0) if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: repeat_batch(v, num_generations) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(x for x in batch for _ in range(num_generations))
    return batch


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


class CausalLMPolicy:
    """:class:`GRPOPolicy` over a text-only HF causal LM (``AutoModelForCausalLM``, peft models too).

    ``batch``: a list of records (``record[prompt_key]`` is the prompt text) or of strings.
    Prompts are tokenized as TRL does (``tokenizer(text)``), cut from the left to
    ``max_prompt_length`` tokens, left-padded. Generation: ``model.generate`` with the KV cache,
    ``do_sample``, ``num_return_sequences=G``; ``generation_kwargs`` are added (e.g.
    ``min_new_tokens``). ``position_ids_from_mask`` scores with the positions ``generate`` used
    (cumsum of the mask); TRL scores with ``arange`` positions, which for RoPE models differs only
    by rounding (a common shift per row) but is wrong for absolute-position models.
    ``logps_batch_size`` scores rows in chunks (as TRL's ``batch_size``) to bound the
    ``[rows, L, vocab]`` logits held at once.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_prompt_length: int | None = None,
                 prompt_key: str = "prompt", generation_kwargs: Mapping[str, Any] | None = None,
                 eos_token_ids: Sequence[int] | None = None, position_ids_from_mask: bool = True,
                 logps_batch_size: int | None = None):
        self.model = model
        self._forward_module: nn.Module = model  # replaced by the accelerate-wrapped module in prepare()
        self._accelerator: Any = None
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.prompt_key = prompt_key
        self.generation_kwargs = dict(generation_kwargs or {})
        self.position_ids_from_mask = position_ids_from_mask
        self.logps_batch_size = logps_batch_size
        if eos_token_ids is None:  # as TRL: the tokenizer's EOS plus every EOS the model declares
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
            eos_token_ids = ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in gen_eos else []) + gen_eos
        self.eos_token_ids = [int(e) for e in eos_token_ids if e is not None]
        if not self.eos_token_ids:
            raise ConfigError("CausalLMPolicy: the tokenizer and model define no EOS token")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])

    # -- optional hooks used by GRPOLoop
    def prepare(self, accelerator: Any, *, evaluation_mode: bool = False) -> nn.Module:
        """Let accelerate place (and for training wrap: DDP/FSDP) the model; generation uses the unwrapped one."""
        self._forward_module = accelerator.prepare_model(self.model, evaluation_mode=evaluation_mode)
        self.model = accelerator.unwrap_model(self._forward_module)
        self._accelerator = accelerator
        return self._forward_module

    @contextlib.contextmanager
    def _generation_model(self) -> Any:
        """The model to call ``generate`` on: TRL's unwrapping (gathers DeepSpeed ZeRO-3 weights,
        pauses gradient checkpointing so the KV cache is used) plus FSDP1's full-parameter view."""
        if self._accelerator is None:
            yield self.model
            return
        from trl.models import unwrap_model_for_generation

        try:
            from trl.distributed import DistributedBackend  # TRL >= 1.x

            summon = DistributedBackend(self._accelerator).summon_full_params(self._forward_module, recurse=False)
        except ImportError:
            summon = contextlib.nullcontext()
        with warnings.catch_warnings():  # TRL probes a deprecated transformers attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            with unwrap_model_for_generation(self._forward_module, self._accelerator) as model, summon:
                yield model

    def train(self) -> "CausalLMPolicy":
        self.model.train()
        return self

    def eval(self) -> "CausalLMPolicy":
        self.model.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- protocol
    def _prompts(self, batch: Sequence[Any]) -> list[str]:
        return [b if isinstance(b, str) else b[self.prompt_key] for b in batch]

    def tokenize_prompts(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(prompt_ids, prompt_mask)`` ``[N, P]`` on the model's device."""
        rows = self.tokenizer(self._prompts(batch))["input_ids"]
        if self.max_prompt_length is not None:
            rows = [r[-self.max_prompt_length:] for r in rows]
        ids, mask = _left_pad([list(r) for r in rows], self.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, batch: Sequence[Any], *, num_generations: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> dict[str, Any]:
        prompt_ids, prompt_mask = self.tokenize_prompts(batch)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                      max_new_tokens=max_new_tokens, num_return_sequences=num_generations, use_cache=True,
                      pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids)
        kwargs.update(self.generation_kwargs)
        with self._generation_model() as model:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        completion_ids = out[:, prompt_ids.size(1):]
        completion_mask = completion_mask_after_eos(completion_ids, self.eos_token_ids)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_token_id)
        texts = self.tokenizer.batch_decode([c[m.bool()].tolist() for c, m in zip(completion_ids, completion_mask)],
                                            skip_special_tokens=True)
        return {
            "prompt_ids": prompt_ids.repeat_interleave(num_generations, 0),
            "prompt_mask": prompt_mask.repeat_interleave(num_generations, 0),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "batch_repeated": repeat_batch(list(batch), num_generations),
            "completions": texts,
        }

    def per_token_logps(self, batch_repeated: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                        temperature: float = 1.0) -> torch.Tensor:
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attn = torch.cat([prompt_mask, completion_mask], 1)
        n = completion_ids.size(1)
        step = self.logps_batch_size or input_ids.size(0)
        out = []
        for i in range(0, input_ids.size(0), step):
            ids, am = input_ids[i:i + step], attn[i:i + step]
            kw: dict[str, Any] = {}
            if self.position_ids_from_mask:
                kw["position_ids"] = (am.long().cumsum(-1) - 1).clamp(min=0)
            # logits of the last n+1 positions only: position t predicts token t+1
            logits = self._forward_module(input_ids=ids, attention_mask=am, use_cache=False,
                                          logits_to_keep=n + 1, **kw).logits[:, :-1]
            out.append(selective_log_softmax(logits / temperature, completion_ids[i:i + step]))
        return torch.cat(out).masked_fill(completion_mask == 0, 0.0)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class MedTVTPolicy:
    """:class:`GRPOPolicy` over :class:`~medtvt_core.model.modeling.MedTVTForConditionalGeneration`.

    ``batch``: the collator's output (``prompts``, ``modality_mask``, ``modality_inputs`` and/or
    ``modality_features``, optional ``ids``). Prompts go through ``processor`` and are never
    truncated (that could cut a placeholder): a prompt over ``max_prompt_length`` raises
    :class:`DataError`. Generation is the model's KV-cached ``generate``; log-probs come from its
    ``forward`` (``logits_to_keep``; the modality tokens of a prompt computed once for its G rows).
    """

    def __init__(self, model: Any, processor: Any, *, max_prompt_length: int | None = None,
                 generation_kwargs: Mapping[str, Any] | None = None):
        self.model = model
        self.processor = processor
        self._forward_module: nn.Module = model
        self.max_prompt_length = max_prompt_length
        self.generation_kwargs = dict(generation_kwargs or {})
        self.eos_token_ids = list(processor.stop_token_ids)

    def prepare(self, accelerator: Any, *, evaluation_mode: bool = False) -> None:
        if accelerator.num_processes > 1:
            raise ConfigError("GRPOLoop runs MedTVTPolicy in one process only")
        self.model = accelerator.prepare_model(self.model, evaluation_mode=evaluation_mode)
        self._forward_module = self.model
        return None

    def train(self) -> "MedTVTPolicy":
        self.model.train()
        return self

    def eval(self) -> "MedTVTPolicy":
        self.model.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _modal(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        dev = self.model.device
        return {"modality_mask": batch["modality_mask"].to(dev),
                "modality_inputs": _to_device(batch.get("modality_inputs"), dev),
                "modality_features": _to_device(batch.get("modality_features"), dev)}

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Any], *, num_generations: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> dict[str, Any]:
        prompts = list(batch["prompts"])
        proc = self.processor
        feats = proc.generation_features(prompts, self.max_prompt_length, ids=batch.get("ids"))
        if feats["index"].numel() != len(prompts):
            raise DataError(f"{len(prompts) - feats['index'].numel()} prompt(s) over max_prompt_length="
                            f"{self.max_prompt_length} were dropped; GRPO needs every prompt of the batch")
        dev = self.model.device
        pid, pmask = feats["input_ids"].to(dev), feats["attention_mask"].to(dev)
        kw = {"do_sample": True, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
              "num_return_sequences": num_generations, "eos_token_id": self.eos_token_ids,
              "pad_token_id": proc.pad_token_id, **self.generation_kwargs}
        new = self.model.generate(pid, pmask, **self._modal(batch), **kw)
        cmask = completion_mask_after_eos(new, self.eos_token_ids)
        new = new.masked_fill(cmask == 0, proc.pad_token_id)
        texts = proc.decode([c[m.bool()].tolist() for c, m in zip(new, cmask)])
        return {"prompt_ids": pid.repeat_interleave(num_generations, 0),
                "prompt_mask": pmask.repeat_interleave(num_generations, 0),
                "completion_ids": new, "completion_mask": cmask, "batch_repeated": batch, "completions": texts}

    def per_token_logps(self, batch_repeated: Mapping[str, Any], prompt_ids: torch.Tensor,
                        prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                        temperature: float = 1.0) -> torch.Tensor:
        b = batch_repeated["modality_mask"].shape[0]
        g = completion_ids.size(0) // b  # rows of one prompt are adjacent
        t = completion_ids.size(1)
        ids = torch.cat([prompt_ids, completion_ids], 1)
        am = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], 1)
        # Only the logits that predict completion tokens: the last T+1 positions, minus the final one.
        logits = self._forward_module(input_ids=ids, attention_mask=am, **self._modal(batch_repeated),
                                      rows_per_sample=g, logits_to_keep=t + 1).logits[:, :-1]
        logps = selective_log_softmax(logits.float() / temperature, completion_ids)
        return logps.masked_fill(completion_mask == 0, 0.0)


def run_grpo(model: Any, processor: Any, dataset: Any, cfg: Any, reward_funcs: Sequence[Callable[..., Any]], *,
             reward_names: Sequence[str], reward_weights: Sequence[float], output_dir: Path, seed: int,
             device: str = "auto", resume: bool = False,
             on_log: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """RFT of ``model`` (trainable parameters already set) with :class:`GRPOLoop`; returns the history."""
    from accelerate import Accelerator

    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    policy = MedTVTPolicy(model, processor, max_prompt_length=cfg.max_prompt_length)
    callbacks = [(lambda ev, loop, logs: on_log(logs) if ev == "log" and logs else None)] if on_log else []
    loop = GRPOLoop(policy, reward_funcs, dataset, cfg, reward_weights=reward_weights, reward_names=reward_names,
                    collate_fn=dataset.collator(), seed=seed, max_grad_norm=cfg.max_grad_norm, min_lr=cfg.min_lr,
                    warmup_ratio=cfg.warmup_ratio, output_dir=output_dir, accelerator=Accelerator(cpu=use_cpu),
                    callbacks=callbacks)
    last = GRPOLoop.latest_checkpoint(output_dir) if resume else None
    return loop.train(resume_from=last)


# =========================================================================== the loop
@dataclass
class LoopState:
    """Progress of a :class:`GRPOLoop` (saved in ``trainer_state.json``)."""

    global_step: int = 0  # optimiser steps done
    max_steps: int = 0
    epoch: int = 0  # passes over the prompts started
    cursor: int = 0  # next position in this epoch's permutation
    rounds: int = 0  # generation rounds done (one round feeds num_iterations optimiser steps)


@dataclass
class _Rollout:
    batch_repeated: Any
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rewards_per_func: torch.Tensor  # local rows [n, F]
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None


class _Stop(Exception):
    pass


Callback = Callable[[str, "GRPOLoop", dict[str, Any]], None]

_CKPT_PREFIX = "checkpoint-"
_STATE_FILE = "trainer_state.json"


class GRPOLoop:
    """GRPO training loop on :class:`GRPOPolicy` objects, built on ``accelerate.Accelerator``.

    One *round*: take ``batch_size * grad_accum`` prompts (per process), sample G completions
    each, score them with the reward functions (TRL contract; record columns other than
    ``prompt`` come as keyword lists repeated G times, plus ``completion_ids`` and
    ``trainer_state``), compute advantages, old log-probs (only when ``num_iterations > 1``) and
    reference log-probs (``beta > 0``); then ``num_iterations`` optimiser steps, each
    accumulating gradients over the ``grad_accum`` micro-batches (``batch_size`` prompts x G).
    This is TRL's schedule with ``steps_per_generation = gradient_accumulation_steps``.

    ``args`` is a :class:`medtvt_core.config.RFTConfig` (or any object with its fields).
    ``history`` gets one dict per optimiser step; callbacks ``cb(event, loop, logs)`` get
    ``"log"`` (every ``logging_steps`` and the last step), ``"save"`` and ``"end"``.
    Checkpoints (``output_dir/checkpoint-<step>``, every ``save_steps``; with
    ``num_iterations > 1`` deferred to the end of the round, since a checkpoint does not hold the
    rollout buffer) store trainable parameters, optimiser, scheduler, data position, history and
    the Python/NumPy/torch RNG states, so :meth:`train` with ``resume_from`` ends bit-identical
    to an uninterrupted run with the same seed. The reference is built from ``policy`` at
    construction: construct from the SFT weights, then resume.
    """

    def __init__(
        self,
        policy: GRPOPolicy,
        reward_funcs: Sequence[Callable[..., Sequence[float | None]]],
        train_dataset: Sequence[Mapping[str, Any]],
        args: Any,
        *,
        ref_policy: GRPOPolicy | None = None,
        reward_weights: Sequence[float] | None = None,
        reward_names: Sequence[str] | None = None,
        collate_fn: Callable[[list[Mapping[str, Any]]], Any] | None = None,
        prompt_key: str = "prompt",
        seed: int = 0,
        max_grad_norm: float | None = 1.0,
        lr_scheduler_type: str = "cosine_with_min_lr",
        min_lr: float = 0.0,
        warmup_ratio: float = 0.0,
        output_dir: str | os.PathLike[str] | None = None,
        callbacks: Sequence[Callback] = (),
        accelerator: Any = None,
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    ):
        from accelerate import Accelerator

        self.args = args
        if args.loss_type not in LOSS_TYPES:
            raise ConfigError(f"rft.loss_type={args.loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
        _scale_mode(args.scale_rewards)
        if len(train_dataset) == 0:
            raise DataError("GRPO: the training dataset holds no records")
        if not reward_funcs:
            raise ConfigError("GRPO: at least one reward function is required")
        self.reward_funcs = list(reward_funcs)
        self.reward_names = list(reward_names or [getattr(f, "__name__", type(f).__name__) for f in reward_funcs])
        weights = [1.0] * len(reward_funcs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(reward_funcs) or len(self.reward_names) != len(reward_funcs):
            raise ConfigError(f"GRPO: {len(reward_funcs)} reward functions but {len(weights)} weights and "
                              f"{len(self.reward_names)} names")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.dataset = train_dataset
        self.collate_fn = collate_fn or list
        self.prompt_key = prompt_key
        self.seed = seed
        self.max_grad_norm = max_grad_norm
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.callbacks = list(callbacks)
        self.history: list[dict[str, Any]] = []
        self.state = LoopState(max_steps=int(args.max_steps))
        self._num_items: float | None = None  # dapo normaliser of the current round
        # Loss scaling for accumulation is done here as TRL does (per loss type), so accelerate's
        # own division by gradient_accumulation_steps is kept off (=1).
        self.accelerator = accelerator or Accelerator()
        if self.accelerator.gradient_accumulation_steps != 1:
            raise ConfigError("GRPO: pass an Accelerator with gradient_accumulation_steps=1; accumulation is "
                              "rft.grad_accum (the loss is scaled per loss_type, as TRL does)")

        # Reference first (before accelerate wraps the policy), then prepare both.
        self.policy = policy
        if ref_policy is None and args.beta != 0.0:
            from accelerate.utils import DistributedType

            sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
            ref_policy = frozen_reference(policy, share_frozen=not sharded)
        self.ref_policy = ref_policy
        self._module = policy.prepare(self.accelerator) if hasattr(policy, "prepare") else None
        if self.ref_policy is not None and hasattr(self.ref_policy, "prepare"):
            self.ref_policy.prepare(self.accelerator, evaluation_mode=True)

        params, seen = [], set()
        for p in policy.trainable_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ConfigError("GRPO: the policy has no trainable parameters")
        self.params = params
        opt = (optimizer_factory(params) if optimizer_factory
               else torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay))
        self.optimizer = self.accelerator.prepare_optimizer(opt)
        from transformers import get_scheduler

        kw = {"min_lr": min_lr} if lr_scheduler_type == "cosine_with_min_lr" else {}
        # Not passed through accelerator.prepare: AcceleratedScheduler steps num_processes times per
        # call (it assumes epoch-sized schedules); ours is sized in optimiser steps.
        self.scheduler = get_scheduler(lr_scheduler_type, opt,
                                       num_warmup_steps=math.ceil(warmup_ratio * args.max_steps),
                                       num_training_steps=args.max_steps, scheduler_specific_kwargs=kw)

    # ------------------------------------------------------------------ data
    def _take(self, n: int) -> list[Mapping[str, Any]]:
        """Next ``n`` records of the seeded per-epoch permutation (identical on every process)."""
        out: list[Mapping[str, Any]] = []
        size = len(self.dataset)
        while len(out) < n:
            perm = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.state.epoch))
            take = perm[self.state.cursor: self.state.cursor + n - len(out)].tolist()
            out.extend(self.dataset[i] for i in take)
            self.state.cursor += len(take)
            if self.state.cursor >= size:
                self.state.epoch, self.state.cursor = self.state.epoch + 1, 0
        return out

    # ------------------------------------------------------------------ rollout
    def _rollout_round(self) -> tuple[list[_Rollout], dict[str, Any]]:
        a, acc = self.args, self.accelerator
        G, bs, ga = a.num_generations, a.batch_size, a.grad_accum
        nproc, rank = acc.num_processes, acc.process_index
        t0 = time.perf_counter()
        rollouts: list[_Rollout] = []
        gen_seconds, gen_tokens = 0.0, 0
        for _ in range(ga):
            records = self._take(bs * nproc)[rank * bs:(rank + 1) * bs]  # this process's share
            batch = self.collate_fn(records)
            tg = time.perf_counter()
            with torch.no_grad(), acc.autocast():
                out = self.policy.generate(batch, num_generations=G, temperature=a.temperature, top_p=a.top_p,
                                           max_new_tokens=a.max_completion_length)
            gen_seconds += time.perf_counter() - tg
            cmask = out["completion_mask"]
            gen_tokens += int(cmask.sum())
            prompts = [r[self.prompt_key] for r in records for _ in range(G)]
            cols = {k: [r.get(k) for r in records for _ in range(G)]
                    for k in records[0] if k not in (self.prompt_key, "completion", "completion_ids")}
            cids = [c[m.bool()].tolist() for c, m in zip(out["completion_ids"], cmask)]
            rpf = compute_rewards(self.reward_funcs, prompts, out["completions"], self.reward_names,
                                  completion_ids=cids, trainer_state=self.state, **cols)
            ro = _Rollout(out["batch_repeated"], out["prompt_ids"], out["prompt_mask"], out["completion_ids"],
                          cmask, rpf)
            with torch.no_grad(), acc.autocast():
                lp_args = (ro.batch_repeated, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
                if a.num_iterations > 1:  # TRL: only then do old and current policies differ
                    ro.old_logps = self.policy.per_token_logps(*lp_args, temperature=a.temperature)
                if a.beta != 0.0:
                    assert self.ref_policy is not None
                    ro.ref_logps = self.ref_policy.per_token_logps(*lp_args, temperature=a.temperature)
            rollouts.append(ro)

        # Advantages over the gathered round (TRL gathers before normalising; groups never straddle
        # processes, so "group" is local, "batch" needs the gather).
        local = torch.cat([r.rewards_per_func for r in rollouts]).to(acc.device)
        rpf_all = acc.gather(local)
        rewards_all = weighted_rewards(rpf_all, self.reward_weights)
        adv_all = group_advantages(rewards_all, G, a.scale_rewards)
        n_local = local.size(0)
        adv = adv_all[rank * n_local:(rank + 1) * n_local]
        off = 0
        for r in rollouts:
            n = r.rewards_per_func.size(0)
            r.advantages = adv[off:off + n]
            off += n
        std_g = nanstd(rewards_all.view(-1, G), dim=1)
        stats: dict[str, Any] = {
            "reward": torch.nanmean(rewards_all).item(),
            "reward_std": nanstd(rewards_all).item() if rewards_all.numel() > 1 else 0.0,
            "frac_reward_zero_std": torch.isclose(std_g, torch.zeros_like(std_g)).float().mean().item(),
        }
        for j, name in enumerate(self.reward_names):
            stats[f"rewards/{name}/mean"] = torch.nanmean(rpf_all[:, j]).item()
        lengths = acc.gather(torch.cat([r.completion_mask.sum(1) for r in rollouts]).to(acc.device)).float()
        tot = acc.gather(torch.tensor([float(gen_tokens), gen_seconds], device=acc.device)).view(-1, 2)
        stats["completions/mean_length"] = lengths.mean().item()
        stats["rollout/tokens"] = int(tot[:, 0].sum().item())
        stats["rollout/seconds"] = tot[:, 1].max().item()
        stats["rollout/tokens_per_second"] = stats["rollout/tokens"] / max(stats["rollout/seconds"], 1e-9)
        stats["round_seconds"] = time.perf_counter() - t0
        # dapo normaliser (TRL): active tokens of the accumulation window over all processes / nproc
        self._num_items = lengths.sum().item() / nproc
        return rollouts, stats

    # ------------------------------------------------------------------ optimisation
    def _optimizer_step(self, rollouts: list[_Rollout]) -> dict[str, Any]:
        a, acc = self.args, self.accelerator
        ga = len(rollouts)
        sums: dict[str, float] = {}
        loss_total = 0.0
        for i, ro in enumerate(rollouts):
            last = i == ga - 1
            sync = contextlib.nullcontext() if last or self._module is None else acc.no_sync(self._module)
            with sync:
                with acc.autocast():
                    logps = self.policy.per_token_logps(ro.batch_repeated, ro.prompt_ids, ro.prompt_mask,
                                                        ro.completion_ids, ro.completion_mask,
                                                        temperature=a.temperature)
                    loss, m = grpo_loss(logps, ro.old_logps, ro.ref_logps, ro.advantages, ro.completion_mask,
                                        beta=a.beta, epsilon_low=a.epsilon, epsilon_high=a.epsilon_high,
                                        loss_type=a.loss_type, max_completion_length=a.max_completion_length,
                                        num_items_in_batch=self._num_items)
                    if a.loss_type != "dapo":  # dapo is already normalised over the whole window
                        loss = loss / ga
                acc.backward(loss)
            loss_total += loss.detach().item()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + acc.gather(v.detach().reshape(1)).mean().item() / ga
        grad_norm = None
        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            gn = acc.clip_grad_norm_(self.params, self.max_grad_norm)
            grad_norm = float(gn) if gn is not None else None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        loss_all = acc.gather(torch.tensor([loss_total], device=acc.device)).mean().item()
        return {"loss": loss_all, "grad_norm": grad_norm, "learning_rate": lr, **sums}

    # ------------------------------------------------------------------ driver
    def train(self, resume_from: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
        """Run to ``args.max_steps`` optimiser steps; ``resume_from``: a checkpoint dir or ``"latest"``."""
        from accelerate.utils import set_seed

        set_seed(self.seed)
        if resume_from is not None:
            path = self.latest_checkpoint(self.output_dir) if str(resume_from) == "latest" else Path(resume_from)
            if path is None:
                raise CheckpointError(f"--resume: no complete checkpoint under {self.output_dir}")
            self.load_checkpoint(path)
        if hasattr(self.policy, "train"):
            self.policy.train()
        a = self.args
        save_every = int(getattr(a, "save_steps", 0) or 0)
        log_every = int(getattr(a, "logging_steps", 1) or 1)
        try:
            while self.state.global_step < self.state.max_steps:
                t_round = time.perf_counter()
                rollouts, stats = self._rollout_round()
                self.state.rounds += 1
                save_due = False
                for it in range(a.num_iterations):
                    if self.state.global_step >= self.state.max_steps:
                        break
                    t0 = time.perf_counter()
                    rec = {"step": self.state.global_step + 1, "epoch": self.state.epoch, "iteration": it,
                           **self._optimizer_step(rollouts), **stats}
                    rec["step_time"] = time.perf_counter() - (t_round if it == 0 else t0)
                    self.history.append(rec)
                    step = self.state.global_step
                    if step % log_every == 0 or step == self.state.max_steps:
                        self._emit("log", rec)
                    save_due = save_due or (save_every > 0 and step % save_every == 0)
                if save_due and self.output_dir is not None:  # only at round boundaries (see class doc)
                    self.save_checkpoint(self.output_dir / f"{_CKPT_PREFIX}{self.state.global_step}")
        except _Stop:
            return self.history
        self._emit("end", {"step": self.state.global_step})
        return self.history

    def stop(self) -> None:
        """Call from a callback to leave :meth:`train` right after the current event."""
        raise _Stop()

    def _emit(self, event: str, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(event, self, logs)

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def latest_checkpoint(output_dir: str | os.PathLike[str] | None) -> Path | None:
        """The complete ``checkpoint-<step>`` with the highest step under ``output_dir``, or None."""
        from ...checkpoints import step_checkpoints

        return next((p for p in reversed(step_checkpoints(output_dir, _CKPT_PREFIX)) if (p / _STATE_FILE).is_file()),
                    None)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write the resumable state to ``path`` (written to ``path.tmp``, then renamed).

        Own format, not ``accelerator.save_state``: that writes every prepared model whole (the
        frozen LLM base included) at each checkpoint; here only trainable tensors are stored
        (safetensors), optimiser/scheduler with ``torch.save`` (read back ``weights_only``).
        """
        from safetensors.torch import save_file

        acc = self.accelerator
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank = acc.process_index
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / f"rng_{rank}.safetensors"))
        py_state = random.getstate()
        np_state = np.random.get_state()
        (tmp / f"rng_{rank}.json").write_text(json.dumps({
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        }))
        if acc.is_main_process:
            save_file({f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)},
                      str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / _STATE_FILE).write_text(json.dumps({
                "state": asdict(self.state), "seed": self.seed, "history": self.history,
                "num_processes": acc.num_processes,
                "shapes": [list(p.shape) for p in self.params],
            }, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        acc.wait_for_everyone()
        self._emit("save", {"step": self.state.global_step, "path": str(path)})
        return path

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save_checkpoint` wrote (parameters, optimiser, scheduler, RNG, data position)."""
        from safetensors.torch import load_file

        path = Path(path)
        state_file = path / _STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"checkpoint {path}: {_STATE_FILE} is missing (incomplete or not a GRPO checkpoint)")
        rank = self.accelerator.process_index
        for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", f"rng_{rank}.safetensors",
                     f"rng_{rank}.json"):
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint {path}: {name} is missing")
        meta = json.loads(state_file.read_text())
        shapes = [list(p.shape) for p in self.params]
        if meta.get("shapes") != shapes:
            raise CheckpointError(f"checkpoint {path}: trainable parameters {len(meta.get('shapes', []))} with shapes "
                                  f"that do not match this policy's {len(shapes)}")
        if meta.get("num_processes", 1) != self.accelerator.num_processes:
            raise CheckpointError(f"checkpoint {path}: written by {meta.get('num_processes')} processes, resuming "
                                  f"with {self.accelerator.num_processes}; use the same process count")
        tensors = load_file(str(path / "trainable.safetensors"))
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        self.state = LoopState(**{**meta["state"], "max_steps": self.state.max_steps})
        self.history = list(meta["history"])
        rng = load_file(str(path / f"rng_{rank}.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        js = json.loads((path / f"rng_{rank}.json").read_text())
        random.setstate((js["python"][0], tuple(js["python"][1]), js["python"][2]))
        npv = js["numpy"]
        np.random.set_state((npv[0], np.asarray(npv[1], dtype=np.uint32), npv[2], npv[3], npv[4]))
