"""Training throughput of the three stages on the ``paper`` model shape: PT, SFT and RFT (GRPO).

The model is the ``paper`` preset built by ``new_model`` with random weights: LLaMA-3.2-1B config
(d = 2048, 128,256-token vocabulary), real-size frozen encoders (xresnet1d101, ViT-B/16, Symile
MLP) whose cached features feed the trainable heads (as training with the feature cache does),
projectors, MPL fusion, LoRA r = 8; the stages' own trainable sets (``configure_trainable``, LLM
extras as the preset says).

* **PT / SFT**: batches of ``--batch`` x ``--seq-len`` tokens (the paper: 8 x 600), the question
  third masked from the loss; PT samples carry one modality each (physiological QA), SFT samples
  all three.  One step = forward, backward, gradient clipping, AdamW (the Trainer's step, with its
  bf16 autocast on a GPU).  Reported: s/step, samples/s, tokens/s, peak memory and, on a GPU,
  the approximate model FLOPs utilisation ``MFU = 6 * N_llm * tokens/s / peak`` (N_llm: LLM
  parameters; the encoders do not run, the heads and projectors are ignored; attention FLOPs are
  not counted and the frozen base skips its weight gradients, so this is the usual convention,
  not a FLOP count).  ``--peak-tflops`` defaults to 989 on an H100/H200 (NVIDIA's dense bf16 figure).
* **RFT**: ``run_grpo`` (the project's GRPO trainer) for a few optimiser steps with the preset's
  ``rft`` block (G = 8, 1 prompt x G rows per micro-step, grad_accum 2, beta 0.04, 600 new
  tokens) on in-memory prompts with cached features.  Reported: s/step, rollout tokens/s (tokens
  generated / time inside ``generate``, timed by wrapping the model's ``generate``) and the share
  of the step spent generating.  The first step is a warm-up and not averaged when more follow.

    python benchmarks/train_throughput.py                       # GPU if present, paper shape
    python benchmarks/train_throughput.py --smoke               # tiny LLM and encoders, CPU, seconds
    python benchmarks/train_throughput.py --device cpu --stages pt,sft --steps 2 --seq-len 128 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

#: NVIDIA's dense (no sparsity) bf16 tensor-core peak of the H100/H200 SXM, TFLOP/s.
HOPPER_BF16_DENSE_TFLOPS = 989.0


def default_peak_tflops(device: str) -> float | None:
    if not benchlib.is_cuda(device):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return HOPPER_BF16_DENSE_TFLOPS if ("H100" in name or "H200" in name) else None


def paper_sets(*, dtype: str, gradient_checkpointing: bool, attn: str = "sdpa", tiny: bool = False) -> list[str]:
    """``--set`` overrides of the ``paper`` preset for a benchmark model (random weights)."""
    sets = [f"llm.options.dtype={dtype}", f"llm.options.gradient_checkpointing={str(gradient_checkpointing).lower()}",
            f"llm.options.attn_implementation={attn}"]
    return sets + (list(benchlib.TINY_SETS) if tiny else [])


# --------------------------------------------------------------------------- PT / SFT
def supervised_batch(model: Any, stage: str, batch: int, seq_len: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Random token ids of exactly ``seq_len`` with the placeholders (K copies each) of the modalities
    present, answer-only labels (the first third masked) and cached-feature tensors."""
    g = torch.Generator().manual_seed(seed)
    k = model.config.tokens_per_modality
    mods = model.modalities
    ph = model.placeholder_ids
    low, high = 4, min(ph.values())  # ordinary tokens: the placeholders are the last ids added
    ids = torch.randint(low, high, (batch, seq_len), generator=g)
    mask = torch.zeros(batch, len(mods), dtype=torch.bool)
    for b in range(batch):
        present = [mods[b % len(mods)]] if stage == "pt" else mods  # PT: physiological QA, one modality each
        pos = 1
        for m in present:
            mask[b, mods.index(m)] = True
            ids[b, pos:pos + k] = ph[m]
            pos += k + 2
    labels = ids.clone()
    labels[:, : seq_len // 3] = -100  # the question part is masked, as in training
    feats = {m: torch.randn(int(mask[:, j].sum()), *model.encoders[m].feature_shape, generator=g)
             for j, m in enumerate(mods) if mask[:, j].any()}
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "modality_mask": mask.to(device), "modality_features": {m: v.to(device) for m, v in feats.items()}}


def measure_supervised(model: Any, stage: str, stage_cfg: Any, *, batch: int, seq_len: int, steps: int, warmup: int,
                       device: str, peak_tflops: float | None = None, deadline: float | None = None) -> dict[str, Any]:
    """Timed PT or SFT steps (after ``warmup`` untimed ones); stops early at ``deadline`` (perf_counter)."""
    from medtvt_core.model.stages import configure_trainable

    names = configure_trainable(model, stage, train_extras=stage_cfg.train_extras)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    opt = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay,
                            betas=(stage_cfg.adam_beta1, stage_cfg.adam_beta2))
    b = supervised_batch(model, stage, batch, seq_len, device)
    cuda = benchlib.is_cuda(device)

    def step() -> None:
        # The Trainer's bf16 step: autocast forward, backward, clip to 1.0, AdamW.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    done = 0
    with benchlib.measure(device) as m:
        while done < steps:
            step()
            done += 1
            if deadline is not None and time.perf_counter() > deadline:
                break
    dt = m.seconds / max(done, 1)
    tokens_s = batch * seq_len / dt
    n_llm = benchlib.llm_parameters(model)
    out = {"stage": stage, "steps": done, "s_per_step": dt, "samples_per_s": batch / dt, "tokens_per_s": tokens_s,
           "trainable_params": sum(p.numel() for p in params), "trainable_tensors": len(names), "llm_params": n_llm,
           "peak_mem_bytes": m.peak_bytes, "batch": batch, "seq_len": seq_len}
    out["mfu"] = 6 * n_llm * tokens_s / (peak_tflops * 1e12) if peak_tflops else None
    return out


# --------------------------------------------------------------------------- RFT
def prompt_set(model: Any, n: int, question: str = benchlib.QUESTION, answer: str = benchlib.ANSWER,
               seed: int = 0) -> benchlib.ItemSet:
    """In-memory disease-level prompts with random cached features, in :class:`QADataset`'s item format."""
    from medtvt_core.data.labels import parse_answer

    g = torch.Generator().manual_seed(seed)
    names = list(model.modalities)
    items = [{"id": f"bench-{i}", "prompt": question, "answer": answer, "labels": parse_answer(answer),
              "present": {m: True for m in names}, "inputs": {},
              "features": {m: torch.randn(*model.encoders[m].feature_shape, generator=g) for m in names}}
             for i in range(n)]
    return benchlib.ItemSet(items, names)


class _GenerateTimer:
    """Wraps ``model.generate`` (an instance attribute shadows the method) to time each call and count
    the tokens it produced up to each row's stop token; the wrapped behaviour is unchanged."""

    def __init__(self, model: Any, stop_ids: Sequence[int], device: str):
        self.model, self.stop_ids, self.device = model, list(stop_ids), device
        self.calls: list[tuple[float, float, int]] = []  # (start, seconds, tokens)
        self._orig = model.generate

    def __enter__(self) -> "_GenerateTimer":
        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            from medtvt_core.model.generation import completion_mask

            benchlib.synchronize(self.device)
            t0 = time.perf_counter()
            out = self._orig(*args, **kwargs)
            benchlib.synchronize(self.device)
            self.calls.append((t0, time.perf_counter() - t0, int(completion_mask(out, self.stop_ids).sum())))
            return out

        self.model.generate = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.generate  # the class's method again


def measure_rft(model: Any, processor: Any, rft_cfg: Any, reward_refs: Sequence[Any], *, steps: int, device: str,
                catalog: Any, seed: int = 0, train_extras: bool = True, deadline: float | None = None,
                on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``steps`` GRPO optimiser steps through ``run_grpo``; step times from the per-step log callbacks.
    ``train_extras``: RFT trains what SFT trained (the orchestrator passes ``sft.train_extras``)."""
    from medtvt_core.model.stages import configure_trainable
    from medtvt_core.training.grpo import run_grpo

    cfg = rft_cfg.model_copy(update={"max_steps": steps, "logging_steps": 1, "save_steps": 10**9})
    configure_trainable(model, "rft", train_extras=train_extras)
    n_prompts = 2 * cfg.batch_size * cfg.grad_accum
    data = prompt_set(model, n_prompts, seed=seed)
    funcs = [catalog.rewards.get(r.name) for r in reward_refs]
    stamps: list[float] = []
    logs: list[dict[str, Any]] = []

    class _Deadline(Exception):
        pass

    def on_log(rec: Mapping[str, Any]) -> None:
        if "loss" not in rec:  # the final train summary
            return
        benchlib.synchronize(device)
        stamps.append(time.perf_counter())
        logs.append(dict(rec))
        if on_step is not None:
            on_step(dict(rec))
        if deadline is not None and time.perf_counter() > deadline and len(stamps) < steps:
            raise _Deadline  # leaves the Trainer between steps; the steps done so far are kept

    cuda = benchlib.is_cuda(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="medtvt-bench-rft-") as out_dir, \
            _GenerateTimer(model, processor.stop_token_ids, device) as gen:
        try:
            run_grpo(model, processor, data, cfg, funcs, reward_names=[r.name for r in reward_refs],
                     reward_weights=[r.weight for r in reward_refs], output_dir=out_dir, seed=seed,
                     device="cuda" if cuda else "cpu", progress=False, on_log=on_log)
        except _Deadline:
            pass
    if not stamps:
        raise RuntimeError("run_grpo logged no optimiser step")
    # Step i spans from the end of step i-1 (the first: from its first generate call) to its log.
    starts = [gen.calls[0][0]] + stamps[:-1]
    step_s = [b - a for a, b in zip(starts, stamps)]
    gen_s, gen_tok = [0.0] * len(stamps), [0] * len(stamps)
    for t0, dt, n in gen.calls:
        i = next((j for j, s in enumerate(stamps) if t0 < s), len(stamps) - 1)
        gen_s[i] += dt
        gen_tok[i] += n
    timed = slice(1, None) if len(stamps) > 1 else slice(None)  # step 1 warms up kernels and allocator
    mean = lambda xs: sum(xs[timed]) / len(xs[timed])  # noqa: E731
    return {"stage": "rft", "steps": len(stamps), "timed_steps": len(step_s[timed]), "s_per_step": mean(step_s),
            "step_seconds": step_s, "rollout_tokens_per_s": sum(gen_tok[timed]) / max(sum(gen_s[timed]), 1e-9),
            "rollout_share": sum(gen_s[timed]) / sum(step_s[timed]), "rollout_tokens_per_step": mean(gen_tok),
            "num_generations": cfg.num_generations, "prompts_per_step": cfg.batch_size * cfg.grad_accum,
            "max_new_tokens": cfg.max_completion_length, "beta": cfg.beta,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "reward": logs[-1].get("reward"), "trainable_params": sum(p.numel() for p in model.parameters()
                                                                       if p.requires_grad)}


# --------------------------------------------------------------------------- report
HEADER = ["stage", "s/step", "samples/s", "tokens/s", "MFU (approx.)", "peak mem", "notes"]


def format_row(r: Mapping[str, Any]) -> list[str]:
    if r["stage"] == "rft":
        return ["rft", f"{r['s_per_step']:.2f}", "-", f"{r['rollout_tokens_per_s']:.1f} (rollout)", "-",
                benchlib.gib(r["peak_mem_bytes"]),
                f"G={r['num_generations']}, {r['prompts_per_step']} prompt(s)/step, {r['max_new_tokens']} new tokens, "
                f"rollout {100 * r['rollout_share']:.0f}% of the step, {r['rollout_tokens_per_step']:.0f} tokens/step, "
                f"{r['timed_steps']} timed step(s)"]
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return [r["stage"], f"{r['s_per_step']:.3f}", f"{r['samples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", mfu,
            benchlib.gib(r["peak_mem_bytes"]),
            f"batch {r['batch']} x {r['seq_len']}, {r['trainable_params'] / 1e6:.1f} M trainable, "
            f"{r['steps']} timed step(s)"]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None,
                    help="LLM weights: float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--stages", default="pt,sft,rft")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=600)
    ap.add_argument("--steps", type=int, default=10, help="timed PT/SFT steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed PT/SFT steps first")
    ap.add_argument("--rft-steps", type=int, default=2, help="GRPO optimiser steps (the first is a warm-up)")
    ap.add_argument("--rft-prompts", type=int, default=None,
                    help="prompts per GRPO micro-step (default: the preset's; paper: 1 prompt x G = 8 rows per GPU)")
    ap.add_argument("--num-generations", type=int, default=None, help="G (default: the preset's 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="max completion length (default: the preset's 600)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="accelerator peak for MFU (default: 989 on H100/H200)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny LLM and encoders, 2 x 48 tokens, 1+1 steps, G=2, 8 tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seq_len, args.steps, args.warmup, args.rft_steps = 2, 48, 1, 1, 1
        args.threads = args.threads or 1  # several threads on a busy small machine spin far more than they work
        args.num_generations, args.new_tokens = args.num_generations or 2, args.new_tokens or 8
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if benchlib.is_cuda(args.device) else "float32")
    catalog = benchlib.plugin_catalog()
    cfg = benchlib.run_config("paper", paper_sets(dtype=dtype, gradient_checkpointing=args.gradient_checkpointing,
                                                  tiny=args.smoke))
    rft = cfg.rft.model_copy(update={k: v for k, v in (("num_generations", args.num_generations),
                                                       ("max_completion_length", args.new_tokens),
                                                       ("batch_size", args.rft_prompts)) if v is not None})
    model, processor = benchlib.build_model(cfg, args.device, catalog=catalog)
    peak = args.peak_tflops or default_peak_tflops(args.device)
    print(f"device {benchlib.device_name(args.device)}, LLM dtype {dtype}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters ({benchlib.llm_parameters(model) / 1e6:.1f} M LLM); {benchlib.versions()}")
    rows = []
    for stage in args.stages.split(","):
        if stage == "rft":
            rows.append(measure_rft(model, processor, rft, cfg.rewards, steps=args.rft_steps, device=args.device,
                                    catalog=catalog, seed=cfg.seed, train_extras=cfg.sft.train_extras))
        else:
            rows.append(measure_supervised(model, stage, getattr(cfg, stage), batch=args.batch, seq_len=args.seq_len,
                                           steps=args.steps, warmup=args.warmup, device=args.device, peak_tflops=peak))
    print(benchlib.markdown_table(HEADER, [format_row(r) for r in rows]))
    sup = {r["stage"]: r for r in rows if r["stage"] in ("pt", "sft")}
    if len(sup) == 2:
        print(f"SFT / PT tokens/s: {sup['sft']['tokens_per_s'] / sup['pt']['tokens_per_s']:.2f}")
    if peak:
        print(f"MFU = 6 * N_llm * tokens/s / {peak:g} TFLOP/s (approximate: attention FLOPs not counted)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return rows


if __name__ == "__main__":
    main()
