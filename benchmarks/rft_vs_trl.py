"""RFT step time and rollout tokens/s: medtvt's GRPO trainer vs TRL's ``GRPOTrainer``, one run, same settings.

* **medtvt**: :class:`~medtvt_core.training.grpo.MedTVTGRPOTrainer` (arguments from
  :func:`~medtvt_core.training.arguments.training_arguments`, as ``run_grpo`` builds them) on a MedTVT model
  built by ``new_model`` from the ``demo`` preset (tiny LLaMA: hidden 64, 2 layers, LoRA r = 16,
  tokenizer trained on :data:`benchlib.CORPUS`; random weights, no base pretraining), prompts and
  modality inputs from a small synthetic cohort (``medtvt_core.data.synth.synthesize``, disease-level
  training split).  The frozen encoders' features are computed once and held in memory (the demo's
  feature cache does the same), so neither side reads files or runs a frozen backbone per step.
* **TRL**: ``trl.GRPOTrainer`` on a copy of the *same* LLM (the MedTVT model's PEFT-wrapped LLaMA
  with its LoRA adapter; TRL adds its frozen ``ref`` copy of the adapter, our trainer a frozen copy
  of LoRA + MPL) with text prompts of the same token length: each MedTVT prompt, formatted as our
  processor formats it, with every modality token replaced by an ordinary word.  TRL cannot take
  the modality tokens (docs/method.md, "Environment facts": its ``GRPOTrainer`` carries only image fields
  through generation and log-prob computation), so its forwards have no projector/fusion work.

Both sides use the same G, prompts per step (one micro-step, one generation per step), temperature
0.6 / top-p 0.9 / top-k off, beta > 0 (a reference forward on both sides), loss type, clipping,
learning rate, gradient clipping and completion length, with ``min_new_tokens = max_new_tokens``:
TRL's through ``generation_kwargs``, ours by adding ``min_new_tokens`` to the trainer's
``generate`` call (the benchmark wraps the model's ``generate``; the trainer has no option for it),
so every completion is exactly ``--new-tokens`` long on both sides and the token counts are checked.
The LLM extras (norms, embeddings) are frozen on both sides (TRL re-freezes everything but the
adapter when it adds its ``ref`` adapter); ours trains LoRA + projectors + MPL (the RFT stage).

One step is timed from the end of the previous optimiser step to the end of this one (callbacks on
both trainers), after ``--warmup`` untimed steps; each step is split into generation (``generate``),
scoring (the rest of the rollout: reference forward, rewards, advantages), the loss forward, the
backward and the rest (clipping, optimiser, logging, data).  Runs alternate in ABBA order
(medtvt, TRL, TRL, medtvt, ...), each run a fresh trainer on fresh copies of the models.

    python benchmarks/rft_vs_trl.py                          # 4 prompts x G=4, 64 new tokens, 2 x 2 runs
    python benchmarks/rft_vs_trl.py --smoke                  # seconds: 2 prompts x G=2, 4 tokens, A B
    python benchmarks/rft_vs_trl.py --new-tokens 192 --steps 3 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PARTS = ("generate", "scoring", "loss_forward", "backward", "other")
HEADER = ["trainer", "s/step", "rollout tok/s", "step ms / gen. token", "generate", "scoring", "loss fwd",
          "backward", "other", "tokens/step", "prompt tokens", "trainable"]


# --------------------------------------------------------------------------- data
def cohort_prompts(model: Any, processor: Any, root: str, n_patients: int, train_file: str,
                   device: str = "cpu") -> benchlib.ItemSet:
    from medtvt_core.data.dataset import open_splits
    from medtvt_core.data.synth import synthesize

    synthesize(root, n_patients=n_patients, seed=0)
    ds = open_splits(root, modalities=processor.readers, train_file=train_file, persist_stats=False)["train"]
    items = []
    with torch.no_grad():
        for i in range(len(ds)):
            it = ds[i]
            feats = {m: model.encoders[m].encode(x[None].to(device))[0].cpu() for m, x in it["inputs"].items()}
            items.append({**it, "inputs": {}, "features": feats})
    return benchlib.ItemSet(items, ds.modality_names)


def text_prompts(processor: Any, prompts: Sequence[str]) -> tuple[list[str], list[int], list[int]]:
    """TRL's prompts: ours as our processor formats them, modality tokens replaced by an ordinary word,
    decoded to text (TRL tokenizes plain-text prompts itself; this tokenizer adds the BOS again).
    Returns the texts and both sides' prompt lengths in tokens."""
    tok = processor.tokenizer
    placeholder_ids = {int(tok.convert_tokens_to_ids(p)) for p in processor.placeholders.values()}
    word = tok.convert_tokens_to_ids(tok.tokenize(" the")[-1])
    texts, ours, theirs = [], [], []
    for ids in processor.prompt_ids(list(prompts)):
        ids = [int(t) for t in ids]
        if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id:
            body = ids[1:]
        else:
            body = ids
        text = tok.decode([word if t in placeholder_ids else t for t in body], skip_special_tokens=False)
        texts.append(text)
        ours.append(len(ids))
        theirs.append(len(tok(text)["input_ids"]))
    return texts, ours, theirs


def low_token_reward(vocab: int) -> Callable[..., list[float]]:
    """Share of a completion's tokens in the lower half of the vocabulary (varies within a group, so
    advantages are not all zero); the same function on both sides."""
    half = vocab // 2

    def low_tokens(prompts, completions, completion_ids, **kw):
        return [sum(t < half for t in c) / max(len(c), 1) for c in completion_ids]

    return low_tokens


# --------------------------------------------------------------------------- timing
class StepClock:
    """Per-optimiser-step wall time and its parts, from wrapped methods and a Trainer callback."""

    def __init__(self, device: str):
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.last: float | None = None

    def add(self, key: str, v: float) -> None:
        self.cur[key] = self.cur.get(key, 0.0) + v

    def timed(self, key: str, fn: Callable[..., Any], count: Callable[[Any, tuple, dict], int] | None = None):
        def wrapper(*a: Any, **kw: Any) -> Any:
            benchlib.synchronize(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            benchlib.synchronize(self.device)
            self.add(key, time.perf_counter() - t0)
            if count is not None:
                self.add("tokens", count(out, a, kw))
            return out

        return wrapper

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                benchlib.synchronize(clock.device)
                now = time.perf_counter()
                clock.steps.append({**clock.cur, "step": now - clock.last})
                clock.cur, clock.last = {}, now

        return _Clock()


def breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step of each part; ``scoring`` = rollout minus generate, ``other`` = the rest."""
    n = len(steps)
    mean = lambda k: sum(s.get(k, 0.0) for s in steps) / n  # noqa: E731
    out = {"step": mean("step"), "generate": mean("generate"), "scoring": mean("rollout") - mean("generate"),
           "loss_forward": mean("loss_forward"), "backward": mean("backward"), "tokens": mean("tokens"),
           "step_median": statistics.median(s["step"] for s in steps)}
    out["other"] = out["step"] - out["scoring"] - out["generate"] - out["loss_forward"] - out["backward"]
    return out


def instrument(trainer: Any, gen_model: Any, clock: StepClock, rollout: str, count: Callable[..., int],
               gen_extra: dict[str, Any] | None = None) -> None:
    """Instance attributes shadowing the methods (behaviour unchanged, ``gen_extra`` added to generate)."""
    orig_generate = gen_model.generate

    def generate(*a: Any, **kw: Any) -> Any:
        return orig_generate(*a, **{**kw, **(gen_extra or {})})

    gen_model.generate = clock.timed("generate", generate, count)
    setattr(trainer, rollout, clock.timed("rollout", getattr(trainer, rollout)))
    trainer.compute_loss = clock.timed("loss_forward", trainer.compute_loss)
    trainer.accelerator.backward = clock.timed("backward", trainer.accelerator.backward)


def generated_tokens(stop_ids: Sequence[int]) -> Callable[[torch.Tensor, int], int]:
    """Tokens of ``out[:, start:]`` up to and including each row's first stop token (padding after a
    stop is not counted, so an early stop shows up as a shortfall)."""
    from medtvt_core.model.generation import completion_mask

    return lambda out, start: int(completion_mask(out[:, start:], list(stop_ids)).sum())


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the two runs
def run_medtvt(base: Any, processor: Any, data: benchlib.ItemSet, rft: Any, a: Any, out_dir: str) -> dict[str, Any]:
    from transformers.trainer_callback import PrinterCallback

    from medtvt_core.training.arguments import training_arguments
    from medtvt_core.training.grpo import MedTVTGRPOTrainer

    model = copy.deepcopy(base)
    clock = StepClock(a.device)
    args = training_arguments(rft, out_dir, seed=0, device=a.device, progress=False)
    tr = MedTVTGRPOTrainer(model, args, rft=rft, processor=processor, train_dataset=data,
                           reward_funcs=[low_token_reward(len(processor.tokenizer))], reward_names=["low_tokens"],
                           callbacks=[clock.callback()])
    tr.remove_callback(PrinterCallback)
    count = generated_tokens(processor.stop_token_ids)
    # Our generate returns the new tokens only: [rows, T].
    instrument(tr, model, clock, "_generate_and_score", lambda out, *_: count(out, 0),
               gen_extra={"min_new_tokens": rft.max_completion_length})
    tr.train()
    return {"steps": clock.steps, "trainable": trainable(model)}


def run_trl(base_llm: Any, processor: Any, prompts: list[str], rft: Any, a: Any, out_dir: str) -> dict[str, Any]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from medtvt_core.training.arguments import training_arguments

    model = copy.deepcopy(base_llm)
    clock = StepClock(a.device)
    use_cpu = a.device == "cpu"
    ours = training_arguments(rft, out_dir, seed=0, device=a.device, progress=False)  # what ours runs with
    args = GRPOConfig(
        output_dir=out_dir, max_steps=rft.max_steps, per_device_train_batch_size=rft.batch_size * rft.num_generations,
        gradient_accumulation_steps=1, num_generations=rft.num_generations, learning_rate=rft.lr,
        weight_decay=rft.weight_decay, adam_beta1=rft.adam_beta1, adam_beta2=rft.adam_beta2,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": rft.min_lr},
        max_grad_norm=ours.max_grad_norm, beta=rft.beta, loss_type=rft.loss_type, epsilon=rft.epsilon,
        scale_rewards=rft.scale_rewards, use_bias_correction_kl=rft.use_bias_correction_kl, num_iterations=1,
        temperature=rft.temperature, top_p=rft.top_p, top_k=0, max_completion_length=rft.max_completion_length,
        generation_kwargs={"min_new_tokens": rft.max_completion_length}, use_vllm=False, report_to="none",
        bf16=ours.bf16, use_cpu=use_cpu, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    tr = GRPOTrainer(model=model, reward_funcs=[low_token_reward(len(processor.tokenizer))], args=args,
                     train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=processor.tokenizer,
                     callbacks=[clock.callback()])
    tr.remove_callback(PrinterCallback)
    count = generated_tokens(tr.eos_token_ids)
    # TRL's generate returns prompt + completion.
    instrument(tr, model, clock, "_generate_and_score_completions",
               lambda out, a_, kw: count(out, kw["input_ids"].size(1)))
    tr.train()
    return {"steps": clock.steps, "trainable": trainable(model)}


@contextlib.contextmanager
def quiet() -> Any:
    """Library warnings and info logs off (TRL and transformers print several per trainer)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    loggers = [logging.getLogger(n) for n in ("trl", "accelerate", "medtvt_core")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--steps", type=int, default=2, help="timed optimiser steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first, per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per trainer, ABBA order")
    ap.add_argument("--generations", type=int, default=4, help="G")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per optimiser step")
    ap.add_argument("--new-tokens", type=int, default=64, help="completion length (min = max on both sides)")
    ap.add_argument("--beta", type=float, default=None, help="KL coefficient (default: the preset's 0.04)")
    ap.add_argument("--loss-type", default=None, help="default: the preset's (dapo)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra key=value preset overrides")
    ap.add_argument("--patients", type=int, default=16, help="synthetic cohort size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="2 prompts x G=2, 4 tokens, 1 + 1 steps, one run each")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.steps, a.warmup, a.repeats, a.generations, a.prompts, a.new_tokens = 1, 1, 1, 2, 2, 4
        a.patients = min(a.patients, 8)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.warmup < 1:
        ap.error("--warmup must be >= 1 (a timed step starts where the previous one ended)")
    if benchlib.is_cuda(a.device) and not torch.cuda.is_available():
        ap.error("--device cuda, but no GPU is visible")
    t_start = time.perf_counter()
    cfg = benchlib.run_config(a.preset, ["llm.options.pretrain_steps=0", *a.sets])
    update = {"max_steps": a.warmup + a.steps, "batch_size": a.prompts, "grad_accum": 1,
              "num_generations": a.generations, "max_completion_length": a.new_tokens, "num_iterations": 1,
              "logging_steps": 1, "save_steps": 10**9, "beta": a.beta, "loss_type": a.loss_type}
    rft = cfg.rft.model_copy(update={k: v for k, v in update.items() if v is not None})
    if rft.beta == 0:
        ap.error("beta must be > 0: the comparison includes the reference forward on both sides")
    from medtvt_core.model.stages import configure_trainable

    with quiet(), tempfile.TemporaryDirectory(prefix="rft_vs_trl_") as tmp:
        base, processor = benchlib.build_model(cfg, a.device)
        configure_trainable(base, "rft", train_extras=False)
        data = cohort_prompts(base, processor, os.path.join(tmp, "data"), a.patients, cfg.data.train_file, a.device)
        if len(data) < a.prompts:
            ap.error(f"the cohort's training split has {len(data)} records < --prompts {a.prompts}; raise --patients")
        texts, len_ours, len_trl = text_prompts(processor, [it["prompt"] for it in data.items])
        rft = rft.model_copy(update={"max_prompt_length": max(rft.max_prompt_length, max(len_ours))})
        runs: dict[str, list[dict[str, Any]]] = {"medtvt": [], "trl": []}
        order = []
        for i in range(a.repeats):
            for name in (("medtvt", "trl") if i % 2 == 0 else ("trl", "medtvt")):
                order.append(name)
                out = os.path.join(tmp, f"{name}{i}")
                if name == "medtvt":
                    runs[name].append(run_medtvt(base, processor, data, rft, a, out))
                else:
                    runs[name].append(run_trl(base.llm, processor, texts, rft, a, out))
    want = a.prompts * a.generations * a.new_tokens
    res: dict[str, Any] = {}
    for name, rs in runs.items():
        steps = [s for r in rs for s in r["steps"][a.warmup:]]
        if not steps:
            raise RuntimeError(f"{name}: no timed step")
        b = breakdown(steps)
        bad = [s.get("tokens") for s in steps if s.get("tokens") != want]
        if bad:
            raise RuntimeError(f"{name}: generated {bad} tokens in a step, expected {want} (forced length)")
        b["tokens_per_s"] = b["tokens"] / b["generate"]
        b["ms_per_token"] = 1000 * b["step"] / b["tokens"]
        b["trainable"] = rs[0]["trainable"]
        b["timed_steps"] = len(steps)
        b["prompt_tokens"] = statistics.mean(len_ours if name == "medtvt" else len_trl)
        res[name] = b

    def row(label: str, b: dict[str, float]) -> list[str]:
        pct = lambda k: f"{b[k]:.3f} s ({100 * b[k] / b['step']:.0f}%)"  # noqa: E731
        return [label, f"{b['step']:.3f}", f"{b['tokens_per_s']:.0f}", f"{b['ms_per_token']:.2f}",
                *(pct(k) for k in PARTS), f"{b['tokens']:.0f}", f"{b['prompt_tokens']:.1f}",
                f"{b['trainable'] / 1e3:.0f} k"]

    m, t = res["medtvt"], res["trl"]
    ratio = lambda k: f"{m[k] / t[k]:.2f}x" if t[k] > 0 else "-"  # noqa: E731
    rows = [row("medtvt MedTVTGRPOTrainer", m), row("TRL GRPOTrainer", t),
            ["ratio medtvt / TRL", ratio("step"), ratio("tokens_per_s"), ratio("ms_per_token"),
             *(ratio(k) for k in PARTS), "", "", ""]]
    print(f"\nRFT (GRPO), {a.preset} preset LLM ({benchlib.llm_parameters(base) / 1e6:.2f} M parameters), "
          f"{a.prompts} prompts x G={a.generations}, {a.new_tokens} new tokens forced (min = max), "
          f"beta={rft.beta}, loss={rft.loss_type}, T={rft.temperature}, top-p={rft.top_p}; "
          f"device {benchlib.device_name(a.device)}; {benchlib.versions()}, trl {__import__('trl').__version__}")
    print(f"{a.repeats} run(s) per trainer in ABBA order ({' '.join(order)}), {a.warmup} warm-up + {a.steps} timed "
          f"step(s) each; means over the {m['timed_steps']} timed steps per trainer (parts: mean s/step, share)")
    print(benchlib.markdown_table(HEADER, rows))
    print("TRL's prompts: ours with every modality token replaced by a word (TRL cannot take modality tokens); "
          "ours include projector + MPL fusion in every forward.")
    print(f"(wall {time.perf_counter() - t_start:.1f} s)")
    out = {"settings": {k: getattr(a, k) for k in ("device", "steps", "warmup", "repeats", "generations", "prompts",
                                                   "new_tokens", "threads")} | {"beta": rft.beta, "loss": rft.loss_type},
           "order": order, "medtvt": m, "trl": t}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
