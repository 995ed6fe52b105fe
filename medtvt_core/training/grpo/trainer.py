"""GRPO (stage 3, RFT) as a ``transformers.Trainer``, in the manner of TRL's ``GRPOTrainer``.

Why not ``trl.GRPOTrainer`` itself (docs/method.md, "Environment facts"): it carries only image fields
through generation and log-prob computation, so modality features/tokens cannot reach our model,
and with ``beta > 0`` it rebuilds its reference from the model's hub id (or, with peft, uses the
base with the adapter disabled: not the SFT model).  So the trainer is ours, built the way TRL's
is: a ``Trainer`` subclass whose ``_prepare_inputs`` generates and buffers rollouts for a window
of ``grad_accum`` micro-steps, whose ``compute_loss`` is TRL 1.16's loss
(:func:`~medtvt_core.training.grpo.math.grpo_loss`), and whose checkpoints, callbacks, optimiser,
scheduler and distribution (DDP/FSDP/DeepSpeed through accelerate) are the Trainer's.

Everything that needs gradients goes through the (wrapped) model's ``forward``: the completion
log-probs are ``forward(..., logits_to_keep=T + 1, rows_per_sample=G)`` followed by a log-softmax,
so DDP/FSDP hooks see every parameter use.  Each process generates the G completions of its own
prompts (a group never spans processes); rewards are gathered before the advantages are
normalised, and metrics are reduced over processes as TRL does.

Sampling is reproducible per completion: every row draws its tokens from its own generator,
seeded by (seed, optimiser step, record id, row of the group) (:class:`SeededRowSampler`), so a
run's rollouts do not depend on how prompts are batched or on the number of processes (up to the
float rounding of a differently padded batch), and a resumed run redraws what an uninterrupted
one draws.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import TrainingArguments

from ...errors import ConfigError, DataError
from ...model.generation import completion_mask, generate_reports
from ...model.processing import pad_sequences, subset_modalities
from ...model.sampling import SeededRowSampler, row_generators
from ..arguments import training_arguments
from ..supervised import MedTVTTrainer, last_complete_checkpoint
from .math import compute_rewards, group_advantages, grpo_loss, nanstd, selective_log_softmax, weighted_rewards

log = logging.getLogger(__name__)

__all__ = ["MedTVTGRPOTrainer", "PromptWindowSampler", "frozen_reference", "run_grpo",
           "check_rft_layout"]


def frozen_reference(model: nn.Module, *, share_frozen: bool = True) -> nn.Module:
    """Deep copy of ``model`` with every parameter frozen, in eval mode: pi_ref = the SFT model.

    Call it on the SFT model *before* RFT. With LoRA this keeps the trained SFT adapter (and the
    MPL weights) in the copy; the base with the adapter disabled would be the pre-SFT model (docs/method.md, "GRPO").
    With ``share_frozen`` the parameters already frozen (LLM base, encoders) are shared, not copied:
    they never change during RFT, so the reference costs about the size of LoRA + MPL. Without it
    (FSDP/DeepSpeed shard or flatten the policy's parameters) the copy is a full second model.
    """
    memo: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad} if share_frozen else {}
    ref = copy.deepcopy(model, memo)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def check_rft_layout(cfg: Any, *, world_size: int, n_prompts: int | None = None) -> None:
    """Refuse, before any training, an RFT layout the processes cannot share (one line, what to change)."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    if n_prompts is not None and n_prompts < per_step:
        raise ConfigError(f"rft: {world_size} process(es) x rft.batch_size={cfg.batch_size} x rft.grad_accum="
                          f"{cfg.grad_accum} = {per_step} prompts per step, but RFT has {n_prompts} training "
                          f"record(s); lower rft.batch_size or rft.grad_accum, use fewer processes, or raise data.rft_holdout")
    if cfg.save_steps and cfg.num_iterations > 1 and cfg.save_steps % cfg.num_iterations:
        raise ConfigError(f"rft.save_steps={cfg.save_steps} must be a multiple of rft.num_iterations="
                          f"{cfg.num_iterations}: a checkpoint holds no rollout buffer, so it must fall at the end "
                          f"of a generation window")


class PromptWindowSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of record indices, one per micro-step: this process's prompts of each generation window.

    Per epoch, a permutation seeded by ``(seed, epoch)`` (identical on every process) is cut into
    windows of ``per_process * num_processes`` prompts (an incomplete last window is dropped, so
    every process runs the same number of steps); process ``rank`` takes its slice of each window
    and yields it ``repeats`` times (``grad_accum * num_iterations``: every micro-step that uses the
    window's rollouts).  The epoch comes from ``epoch_of()``, so a resumed run restarts the epoch
    it was in.
    """

    def __init__(self, n: int, *, per_process: int, num_processes: int, rank: int, repeats: int, seed: int,
                 epoch_of: Callable[[], int] = lambda: 0):
        self.n, self.per_process, self.num_processes, self.rank = n, per_process, num_processes, rank
        self.repeats, self.seed, self.epoch_of = repeats, seed, epoch_of
        self.window = per_process * num_processes
        if n < self.window:
            raise ConfigError(f"rft: {self.window} prompts per step over {num_processes} process(es), but RFT has "
                              f"{n} training record(s)")

    def __len__(self) -> int:
        return (self.n // self.window) * self.repeats

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(self.epoch_of()))
        perm = torch.randperm(self.n, generator=g).tolist()
        for w in range(self.n // self.window):
            mine = perm[w * self.window + self.rank * self.per_process:][: self.per_process]
            for _ in range(self.repeats):
                yield mine


class _EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader the Trainer uses as is (no accelerate sharding: the sampler is per process)."""


class MedTVTGRPOTrainer(MedTVTTrainer):
    """GRPO on :class:`~medtvt_core.model.modeling.MedTVTForConditionalGeneration` (see the module doc).

    ``train_dataset``: a :class:`~medtvt_core.data.dataset.QADataset` (its collator batches records;
    bad samples under ``on_bad_sample="skip"`` come back as ``None`` and are left out of the window,
    counted in the ``skipped_prompts`` metric). ``rft``: an ``RFTConfig``. ``reward_funcs`` follow
    TRL's contract; they get the ground truth as ``answer`` and the record ids as ``ids``.
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, *, rft: Any, processor: Any, train_dataset: Any,
                 reward_funcs: Sequence[Callable[..., Sequence[float | None]]], reward_names: Sequence[str],
                 reward_weights: Sequence[float] | None = None, ref_model: nn.Module | None = None,
                 callbacks: Sequence[Any] = ()):
        if not reward_funcs:
            raise ConfigError("rft: at least one reward function is required")
        weights = [1.0] * len(reward_funcs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(reward_funcs) or len(reward_names) != len(reward_funcs):
            raise ConfigError(f"rft: {len(reward_funcs)} reward functions but {len(weights)} weights and "
                              f"{len(reward_names)} names")
        self.rft = rft
        self.processor_ = processor
        self.reward_funcs = list(reward_funcs)
        self.reward_names = list(reward_names)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.num_generations = int(rft.num_generations)
        # Reference before the Trainer (and accelerate) wrap or shard the policy.
        self.ref_model = ref_model if ref_model is not None or rft.beta == 0.0 else None
        self._make_ref = ref_model is None and rft.beta != 0.0
        self._ref_source = model
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._buffered: list[dict[str, Any]] | None = None
        self._step: int | None = None
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=train_dataset.collator(),
                         processing_class=processor, callbacks=list(callbacks))
        # The loss is already normalised over the accumulation window (TRL does the same).
        self.loss_is_scaled_for_ga = True
        if self._make_ref:
            from accelerate.utils import DistributedType

            sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
            ref = frozen_reference(model, share_frozen=not sharded)
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                from trl.models.utils import prepare_deepspeed

                ref = prepare_deepspeed(ref, self.accelerator)
            elif self.accelerator.distributed_type == DistributedType.FSDP:
                from trl.models.utils import prepare_fsdp

                ref = prepare_fsdp(ref, self.accelerator)
            else:
                ref = self.accelerator.prepare_model(ref, evaluation_mode=True)
            self.ref_model = ref

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        acc = self.accelerator
        ga = self.args.gradient_accumulation_steps
        sampler = PromptWindowSampler(len(self.train_dataset), per_process=self.rft.batch_size * ga,
                                      num_processes=acc.num_processes, rank=acc.process_index,
                                      repeats=ga * self.rft.num_iterations, seed=self.args.seed)
        steps_per_epoch = max(len(sampler) // ga, 1)
        # The epoch a (resumed) run is in follows from the optimiser steps done.
        sampler.epoch_of = lambda: self.state.global_step // steps_per_epoch
        return _EpochLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)

    # ------------------------------------------------------------------ rollouts
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        out = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return out

    def _prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        ga = self.args.gradient_accumulation_steps
        if self._step is None:  # a fresh or resumed run: micro-steps done so far
            self._step = self.state.global_step * ga
        generate_every = ga * self.rft.num_iterations
        if self._step % generate_every == 0 or self._buffered is None:
            self._buffered = self._generate_and_score(batch, ga)
        return self._buffered[self._step % ga]

    @contextlib.contextmanager
    def _generation_model(self):
        """The model to sample from: TRL's unwrapping (gathers ZeRO-3 weights, pauses gradient
        checkpointing so the KV cache works), in eval mode unless ``rft.sampling_mode`` is train."""
        from trl.models import unwrap_model_for_generation

        with warnings.catch_warnings():  # TRL probes a deprecated transformers attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
                was = model.training
                model.train(self.rft.sampling_mode == "train")
                try:
                    yield model
                finally:
                    model.train(was)

    @torch.no_grad()
    def _generate_and_score(self, batch: dict[str, Any], ga: int) -> list[dict[str, Any]]:
        acc, proc, rft, G = self.accelerator, self.processor_, self.rft, self.num_generations
        device = acc.device
        n = len(batch["ids"])
        if n == 0:
            raise DataError(f"every prompt of a generation window failed to load ({batch.get('n_skipped')} skipped); "
                            f"see the skipped-sample warnings")
        if batch.get("n_skipped"):
            self._metrics["skipped_prompts"].append(float(batch["n_skipped"]))
        names = batch["modality_names"]
        gens = row_generators(self.args.seed, batch["ids"], G, self.state.global_step)
        with self._generation_model() as gen_model:
            # Sampling is the seeded per-row sampler's (temperature and top-p there, see model/sampling.py).
            made = generate_reports(gen_model, proc, batch, do_sample=True, top_k=0,
                                    max_new_tokens=rft.max_completion_length, num_return_sequences=G,
                                    max_prompt_length=rft.max_prompt_length, length_option="rft.max_prompt_length",
                                    logits_processor=[SeededRowSampler(gens, temperature=rft.temperature,
                                                                       top_p=rft.top_p,
                                                                       max_steps=rft.max_completion_length)])
        prompt_rows = [row[m.bool()] for row, m in zip(made.prompt_ids, made.prompt_mask)]
        comp_rows = list(made.completion_ids.cpu())
        prompt_ids, prompt_mask = pad_sequences(prompt_rows, proc.pad_token_id, side="left")
        completion_ids, _ = pad_sequences(comp_rows, proc.pad_token_id, side="right")
        cmask = completion_mask(completion_ids, proc.stop_token_ids)
        completion_ids = completion_ids.masked_fill(cmask == 0, proc.pad_token_id)
        texts = proc.decode([c[m.bool()].tolist() for c, m in zip(completion_ids, cmask)])
        rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
        rpf = compute_rewards(self.reward_funcs, rep(batch["prompts"]), texts, self.reward_names,
                              answer=rep(batch["answers"]), ids=rep(batch["ids"]),
                              completion_ids=[c[m.bool()].tolist() for c, m in zip(completion_ids, cmask)],
                              trainer_state=self.state)
        # Advantages over everything gathered (groups never straddle processes, so "group" scaling is
        # local, "batch" needs the gather); processes may hold different row counts after skips.
        local = rpf.to(device)
        rpf_all = self._gather_ragged(local)
        rewards_all = weighted_rewards(rpf_all, self.reward_weights)
        adv_all = group_advantages(rewards_all, G, rft.scale_rewards)
        offset = self._offset_of(local.size(0))
        advantages = adv_all[offset:offset + local.size(0)].cpu()
        std_g = nanstd(rewards_all.view(-1, G), dim=1)
        m = self._metrics
        m["reward"].append(torch.nanmean(rewards_all).item())
        m["reward_std"].append(nanstd(rewards_all).item() if rewards_all.numel() > 1 else 0.0)
        m["frac_reward_zero_std"].append(torch.isclose(std_g, torch.zeros_like(std_g)).float().mean().item())
        for j, name in enumerate(self.reward_names):
            m[f"rewards/{name}/mean"].append(torch.nanmean(rpf_all[:, j]).item())
        lengths = self._gather_ragged(cmask.sum(1).to(device).float())
        m["completions/mean_length"].append(lengths.mean().item())
        # dapo's normaliser (TRL): active tokens of the whole generation window, over all processes.
        num_items = lengths.sum()
        # Micro-batches: ga chunks of whole prompts (fillers, with no active token, keep every process
        # and micro-step doing a forward pass when skipped samples left too few prompts).
        chunks = [list(range(n))[k * self.rft.batch_size:(k + 1) * self.rft.batch_size] for k in range(ga)]
        out = []
        for idx in chunks:
            filler = not idx
            idx = idx or [n - 1]
            rows = torch.tensor([i * G + g for i in idx for g in range(G)])
            keep = torch.tensor(idx)
            cm = cmask[rows].clone()
            if filler:
                cm.zero_()
            width = int(cm.sum(0).nonzero().max()) + 1 if cm.any() else 1
            pm = prompt_mask[keep]
            start = int(pm.any(0).nonzero().min())
            item = {
                "prompt_ids": prompt_ids[keep][:, start:], "prompt_mask": pm[:, start:],
                "completion_ids": completion_ids[rows][:, :width], "completion_mask": cm[:, :width],
                "modality_mask": batch["modality_mask"][keep],
                "modality_inputs": subset_modalities(batch["modality_mask"], batch["modality_inputs"], names, keep),
                "modality_features": subset_modalities(batch["modality_mask"], batch["modality_features"], names, keep),
                "advantages": advantages[rows], "num_items_in_batch": num_items,
            }
            item = {k: self._to(v, device) for k, v in item.items()}
            if rft.num_iterations > 1:  # TRL: only then do old and current policies differ
                item["old_per_token_logps"] = self._logps(self.model, item).detach()
            if self.ref_model is not None:
                item["ref_per_token_logps"] = self._logps(self.ref_model, item).detach()
            out.append(item)
        return out

    def _gather_ragged(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over processes of 1-D or 2-D local tensors whose first dims may differ."""
        if self.accelerator.num_processes == 1:
            return t
        from accelerate.utils import gather_object

        return torch.cat([x.to(t.device) for x in gather_object([t.cpu()])], 0)

    def _offset_of(self, n_local: int) -> int:
        acc = self.accelerator
        if acc.num_processes == 1:
            return 0
        from accelerate.utils import gather_object

        sizes = gather_object([n_local])
        return int(sum(sizes[: acc.process_index]))

    @staticmethod
    def _to(v: Any, device: torch.device) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, Mapping):
            return {k: x.to(device) for k, x in v.items()}
        return v

    def _logps(self, model: nn.Module, item: Mapping[str, Any]) -> torch.Tensor:
        """``[B*G, T]`` log-probs of the completion tokens through ``model``'s forward (0 where masked)."""
        G = self.num_generations
        t = item["completion_ids"].size(1)
        ids = torch.cat([item["prompt_ids"].repeat_interleave(G, 0), item["completion_ids"]], 1)
        am = torch.cat([item["prompt_mask"].repeat_interleave(G, 0), item["completion_mask"].to(item["prompt_mask"].dtype)], 1)
        logits = model(input_ids=ids, attention_mask=am, modality_mask=item["modality_mask"],
                       modality_inputs=item["modality_inputs"], modality_features=item["modality_features"],
                       rows_per_sample=G, logits_to_keep=t + 1).logits[:, :-1]
        logits = logits.float()
        if self.rft.scale_logits_by_temperature:
            logits = logits / self.rft.temperature  # TRL; the reference scores the raw logits
        return selective_log_softmax(logits, item["completion_ids"]).masked_fill(item["completion_mask"] == 0, 0.0)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        if return_outputs:
            raise ConfigError("GRPO computes no outputs to return")
        rft, acc = self.rft, self.accelerator
        logps = self._logps(model, inputs)
        loss, metrics = grpo_loss(
            logps, inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps"), inputs["advantages"],
            inputs["completion_mask"], beta=rft.beta, epsilon_low=rft.epsilon, epsilon_high=rft.epsilon_high,
            loss_type=rft.loss_type, max_completion_length=rft.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"], num_processes=acc.num_processes,
            gradient_accumulation_steps=self.current_gradient_accumulation_steps,
            steps_per_generation=self.args.gradient_accumulation_steps,
            use_bias_correction_kl=rft.use_bias_correction_kl,
            importance_sampling_level=rft.importance_sampling_level,
            sapo_temperature_pos=rft.sapo_temperature_pos, sapo_temperature_neg=rft.sapo_temperature_neg,
            reduce=(lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None,
            # rows per process differ when a prompt was skipped at read time: pad with NaN (ignored)
            gather=(lambda t: acc.gather(acc.pad_across_processes(t, pad_index=float("nan"))))
            if acc.num_processes > 1 else None)
        for k, v in metrics.items():
            self._metrics[k].append(float(v))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key, vals in self._metrics.items():
            valid = [v for v in vals if not math.isnan(v)]
            logs[key] = sum(valid) / len(valid) if valid else None
        self._metrics.clear()
        super().log(logs, start_time)


def run_grpo(model: Any, processor: Any, dataset: Any, cfg: Any, reward_funcs: Sequence[Callable[..., Any]], *,
             reward_names: Sequence[str], reward_weights: Sequence[float], output_dir: Path, seed: int,
             device: str = "auto", resume: bool = False, progress: bool = True,
             on_log: Callable[[dict[str, Any]], None] | None = None,
             callbacks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """RFT of ``model`` (trainable parameters already set); returns the Trainer's log history.

    ``callbacks``: extra ``TrainerCallback`` objects (e.g. the run's validation)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class _Echo(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401
            if on_log and logs and state.is_world_process_zero:
                on_log({"step": state.global_step, **logs})

    args = training_arguments(cfg, output_dir, seed=seed, device=device, progress=progress)
    trainer = MedTVTGRPOTrainer(model, args, rft=cfg, processor=processor, train_dataset=dataset,
                                reward_funcs=reward_funcs, reward_names=reward_names, reward_weights=reward_weights,
                                callbacks=[_Echo(), *callbacks])
    if not progress:
        trainer.remove_callback(PrinterCallback)
    last = last_complete_checkpoint(Path(output_dir)) if resume else None
    trainer.train(resume_from_checkpoint=last)
    return list(trainer.state.log_history)

