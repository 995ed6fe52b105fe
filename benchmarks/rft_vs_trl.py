"""RFT step time and rollout tokens/s: medtvt's GRPOLoop vs TRL's GRPOTrainer, one run, same settings.

Both train the same tiny random Llama (saved with save_pretrained, loaded offline) on the same
prompts with the same G, prompts per step, temperature/top-p, beta (reference forward on both
sides), loss type and completion length; ``min_new_tokens = max_new_tokens`` forces every
completion to the full length on both sides, so both generate the same number of tokens.
The first ``--warmup`` steps of each run are not timed; runs alternate in ABBA order.

    python benchmarks/rft_vs_trl.py [--steps 6] [--repeats 2] [--generations 4] [--prompts 4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

WORDS = ("the patient has fever cough chest pain atrial fibrillation sepsis pneumonia renal failure "
         "diabetes hypertension coronary disease think answer yes no ecg cxr lab shows high low normal").split()
PROMPTS = ["the patient has fever and cough", "ecg shows atrial fibrillation", "lab shows high renal failure",
           "cxr shows pneumonia think answer", "chest pain with coronary disease", "sepsis with low normal lab",
           "diabetes and hypertension", "the ecg is normal"]


def build_tiny(path: str, hidden: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tk = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(tk), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tk.pad_token_id, eos_token_id=tk.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tk.save_pretrained(path)
    return tk


def reward_len(prompts, completions, **kw):
    return [len(c) / 100.0 for c in completions]


def run_ours(path, tk, a, device):
    from transformers import AutoModelForCausalLM

    from medtvt_core.config import RFTConfig
    from medtvt_core.training.grpo import CausalLMPolicy, GRPOLoop

    model = AutoModelForCausalLM.from_pretrained(path)
    policy = CausalLMPolicy(model, tk, generation_kwargs={"min_new_tokens": a.new_tokens})
    cfg = RFTConfig(max_steps=a.warmup + a.steps, batch_size=a.prompts, grad_accum=1, num_generations=a.generations,
                    lr=1e-5, beta=a.beta, loss_type=a.loss_type, num_iterations=1, temperature=0.6, top_p=0.9,
                    max_completion_length=a.new_tokens, logging_steps=1, save_steps=10_000)
    from accelerate import Accelerator

    loop = GRPOLoop(policy, [reward_len], [{"prompt": p} for p in PROMPTS], cfg, seed=0,
                    lr_scheduler_type="linear", accelerator=Accelerator(cpu=device == "cpu"))
    hist = loop.train()[a.warmup:]
    return {"step_s": [h["step_time"] for h in hist], "gen_s": [h["rollout/seconds"] for h in hist],
            "tokens": [h["rollout/tokens"] for h in hist]}


def run_trl(path, tk, a, device):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(path)
    args = GRPOConfig(output_dir=os.path.join(path, "trl_out"), per_device_train_batch_size=a.prompts * a.generations,
                      gradient_accumulation_steps=1, num_generations=a.generations, max_steps=a.warmup + a.steps,
                      learning_rate=1e-5, lr_scheduler_type="linear", beta=a.beta, loss_type=a.loss_type,
                      num_iterations=1, temperature=0.6, top_p=0.9, max_completion_length=a.new_tokens,
                      generation_kwargs={"min_new_tokens": a.new_tokens}, use_vllm=False, report_to="none",
                      bf16=False, activation_checkpointing=False, use_cpu=device == "cpu", save_strategy="no",
                      logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    rec = {"step_s": [], "gen_s": [], "tokens": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            rec["step_s"].append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model, reward_funcs=[reward_len], args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tk,
                          callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    inner = trainer._generate  # tokenize + generate + decode: the same scope as our policy.generate

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = inner(prompts)
        rec["gen_s"].append(time.perf_counter() - t0)
        rec["tokens"].append(sum(len(c) for c in out[1]))
        return out

    trainer._generate = timed_generate
    trainer.train()
    return {k: v[a.warmup:] for k, v in rec.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--loss-type", default="grpo")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "auto"])
    ap.add_argument("--repeats", type=int, default=2, help="runs per trainer, in ABBA order")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = "cpu" if a.device == "cpu" or not torch.cuda.is_available() else "cuda"
    tmp = tempfile.TemporaryDirectory(prefix="rft_bench_")
    path = tmp.name
    tk = build_tiny(path, a.hidden)

    t0 = time.perf_counter()
    # ABBA order (TRL, ours, ours, TRL, ...): process warm-up and drifting machine load hit both alike
    runs = {"trl": [], "ours": []}
    fns = {"trl": run_trl, "ours": run_ours}
    for i in range(a.repeats):
        for name in (("trl", "ours") if i % 2 == 0 else ("ours", "trl")):
            runs[name].append(fns[name](path, tk, a, device))
    trl, ours = ({k: sum((r[k] for r in runs[n]), []) for k in ("step_s", "gen_s", "tokens")} for n in ("trl", "ours"))
    wall = time.perf_counter() - t0

    def row(name, r):
        step = statistics.median(r["step_s"])
        tps = sum(r["tokens"]) / sum(r["gen_s"])
        return name, step, tps, statistics.mean(r["tokens"])

    rows = [row("TRL GRPOTrainer", trl), row("medtvt GRPOLoop", ours)]
    print(f"\nRFT, tiny Llama (hidden {a.hidden}, 2 layers), {a.prompts} prompts x G={a.generations}, "
          f"{a.new_tokens} new tokens, beta={a.beta}, loss={a.loss_type}, device={device}, "
          f"threads={a.threads}, {a.repeats} x {a.steps} timed steps per trainer (median step)")
    print(f"| trainer | step time (s) | rollout tokens/s | tokens/rollout |")
    print(f"|---|---|---|---|")
    for name, step, tps, tok in rows:
        print(f"| {name} | {step:.3f} | {tps:,.0f} | {tok:.0f} |")
    print(f"| ratio medtvt/TRL | {rows[1][1] / rows[0][1]:.2f}x time | {rows[1][2] / rows[0][2]:.2f}x | |")
    print(f"(wall {wall:.0f} s)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
