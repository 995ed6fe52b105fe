"""The paper shape on the CPU: PT, SFT and RFT steps in fp32 and bf16, with and without gradient checkpointing.

The model is the ``paper`` preset built as a run builds it (``new_model``, random weights): the real
LLaMA-3.2-1B config (restated below and checked against the ``llama-lora`` plugin's), ViT-B/16,
ECGFM-KED (full xresnet1d101) and Symile (full MLP) encoders whose cached features feed the
trainable heads, 2048-wide projectors, MPL fusion, LoRA r = 8 on q, k, v, o, gate, up, down, and
the stages' own trainable sets (LLM extras as the preset says: norms, biases, token embeddings).

For each LLM dtype (``--dtypes``) one model is built; for each gradient-checkpointing setting
(``--checkpointing``) each stage runs a few steps, with :mod:`train_throughput`'s measurements:

* PT / SFT: ``--batch`` x ``--seq-len`` tokens per step (the paper: 8 x 600), forward, backward,
  clipping, AdamW; s/step and tokens/s;
* RFT: GRPO through ``run_grpo`` with the preset's layout (1 prompt x G = 8 rows per micro-step,
  grad_accum 2, beta 0.04), ``--new-tokens`` per completion; s/step and rollout tokens/s.

Peak memory is the process's resident set (sampled every 2 ms; torch's CPU allocator has no peak
counter), absolute, while the stage runs: weights, gradients, optimiser state and activations.

The full shape needs about 20 GB of RAM.  ``--layers`` and ``--vocab`` shrink the LLM (the other
sizes stay the paper's) for a smaller machine or a test; every table line says what was reduced.
``--count`` prints the parameter counts of the full shape without allocating it (meta device).

    python benchmarks/paper_shape.py --threads 16                     # the full shape (~20 GB RAM)
    python benchmarks/paper_shape.py --layers 2 --vocab 32768 --batch 1 --steps 2 --new-tokens 32
    python benchmarks/paper_shape.py --count                          # parameter counts only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import train_throughput as tt  # noqa: E402

#: meta-llama/Llama-3.2-1B(-Instruct) config.json, restated: the benchmark refuses to run if the
#: plugin's ``llama-3.2-1b`` variant differs from it.
LLAMA_3_2_1B = {
    "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
}
STAGES = ("pt", "sft", "rft")


def llama_variants() -> dict[str, dict[str, Any]]:
    benchlib.plugin_catalog()  # makes medtvt_plugins importable from a bare source tree too
    return importlib.import_module("medtvt_plugins.llms.llama_lora").VARIANTS


def check_llm_config() -> None:
    real = llama_variants()["llama-3.2-1b"]
    wrong = {k: (real.get(k), v) for k, v in LLAMA_3_2_1B.items() if real.get(k) != v}
    if wrong:
        raise SystemExit(f"paper_shape: the llama-lora plugin's llama-3.2-1b differs from LLaMA-3.2-1B: {wrong}")


@contextlib.contextmanager
def llm_shape(layers: int, vocab: int) -> Iterator[None]:
    """Build ``llama-3.2-1b`` with ``layers`` decoder layers and ``vocab`` rows while inside.  The
    plugin has no option for a reduced 1B (a run never wants one), so its variant table is patched
    here and restored after; hidden sizes, heads and rope stay the real ones."""
    table = llama_variants()
    saved = table["llama-3.2-1b"]
    table["llama-3.2-1b"] = {**saved, "num_hidden_layers": layers, "vocab_size": vocab}
    try:
        yield
    finally:
        table["llama-3.2-1b"] = saved


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameters by part (a tied embedding counted once)."""
    lm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    emb = lm.get_input_embeddings().weight
    layers = lm.model.layers
    lora = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    heads = {id(p) for enc in model.encoders.values() for p in enc.head_parameters()}
    enc_all = sum(p.numel() for p in model.encoders.parameters())
    enc_heads = sum(p.numel() for p in model.encoders.parameters() if id(p) in heads)
    per_layer = sum(p.numel() for n, p in layers[0].named_parameters() if "lora_" not in n)
    llm_total = sum(p.numel() for p in model.llm.parameters())
    return {
        "llm_embedding (tied)": emb.numel(), "llm_layers": per_layer * len(layers), "llm_per_layer": per_layer,
        "llm_final_norm": llm_total - lora - emb.numel() - per_layer * len(layers), "lora": lora,
        "encoders_frozen": enc_all - enc_heads, "encoder_heads": enc_heads,
        "projectors": sum(p.numel() for p in model.projectors.parameters()),
        "fusion (MPL)": sum(p.numel() for p in model.fusion.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }


def build(dtype: str, layers: int, vocab: int, sets: list[str], device: str = "cpu", *,
          tiny: bool = False) -> tuple[Any, Any, Any]:
    cfg = benchlib.run_config("paper", [*tt.paper_sets(dtype=dtype, gradient_checkpointing=False, tiny=tiny), *sets])
    with llm_shape(layers, vocab):
        model, processor = benchlib.build_model(cfg, device)
    return cfg, model, processor


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Absolute peak resident set (bytes) of this process over the block, sampled."""
    out: dict[str, int] = {}
    with benchlib._RssSampler() as s:  # noqa: SLF001 - the shared sampler, read as absolute
        yield out
    out["peak"] = s.base + s.peak


def count_only() -> None:
    """Parameter counts of the full shape, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        _, model, _ = build("bfloat16", LLAMA_3_2_1B["num_hidden_layers"], LLAMA_3_2_1B["vocab_size"], [], "meta")
    counts = parameter_counts(model)
    print(benchlib.markdown_table(["part", "parameters"], [[k, f"{v:,}"] for k, v in counts.items()]))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=LLAMA_3_2_1B["num_hidden_layers"],
                    help="LLM decoder layers (16: the real 1B; fewer for a smaller machine)")
    ap.add_argument("--vocab", type=int, default=LLAMA_3_2_1B["vocab_size"],
                    help="LLM vocabulary rows (128256: the real 1B)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="LLM weight dtypes, comma-separated")
    ap.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings: off, on or both")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--batch", type=int, default=8, help="PT/SFT samples per step (the paper: 8)")
    ap.add_argument("--seq-len", type=int, default=600, help="PT/SFT tokens per sample (the paper's maximum: 600)")
    ap.add_argument("--steps", type=int, default=3, help="timed PT/SFT steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed PT/SFT steps first (allocates AdamW's state)")
    ap.add_argument("--rft-steps", type=int, default=2, help="GRPO optimiser steps (the first untimed when several)")
    ap.add_argument("--num-generations", type=int, default=None, help="G (default: the preset's 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="completion length (default: the preset's 600)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="further overrides of the paper preset, e.g. pt.train_extras=false")
    ap.add_argument("--count", action="store_true", help="only print the full shape's parameter counts")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny LLM and encoders (the same code), 1 x 32 tokens, 1 step, G=2, 4 new tokens: seconds")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    check_llm_config()
    if args.count:
        count_only()
        return []
    if args.smoke:
        args.batch, args.seq_len, args.steps, args.warmup, args.rft_steps = 1, 32, 1, 0, 1
        args.num_generations, args.new_tokens = args.num_generations or 2, args.new_tokens or 4
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpts = {"off": False, "on": True}
    settings = [s.strip() for s in args.checkpointing.split(",")]
    if any(s not in ckpts for s in settings):
        raise SystemExit(f"paper_shape: --checkpointing takes off, on or off,on, got {args.checkpointing!r}")
    stages = [s.strip() for s in args.stages.split(",")]
    if any(s not in STAGES for s in stages):
        raise SystemExit(f"paper_shape: --stages takes a subset of {','.join(STAGES)}, got {args.stages!r}")
    reduced = []
    if args.layers != LLAMA_3_2_1B["num_hidden_layers"]:
        reduced.append(f"{args.layers} of 16 layers")
    if args.vocab != LLAMA_3_2_1B["vocab_size"]:
        reduced.append(f"vocabulary {args.vocab} of 128256")
    label = "REDUCED: " + ", ".join(reduced) if reduced else "full LLaMA-3.2-1B shape"
    if args.smoke:
        label = "SMOKE: tiny LLM and encoders, not the paper shape"
    catalog = benchlib.plugin_catalog()
    rows: list[dict[str, Any]] = []
    for dtype in [d.strip() for d in args.dtypes.split(",")]:
        cfg, model, processor = build(dtype, args.layers, args.vocab, args.sets, tiny=args.smoke)
        counts = parameter_counts(model)
        print(f"{label}; LLM dtype {dtype}; device {benchlib.device_name('cpu')}; {benchlib.versions()}")
        print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in counts.items()))
        rft = cfg.rft.model_copy(update={k: v for k, v in (("num_generations", args.num_generations),
                                                           ("max_completion_length", args.new_tokens)) if v is not None})
        for setting, stage in itertools.product(settings, stages):
            if ckpts[setting]:
                model.gradient_checkpointing_enable()
            else:
                model.gradient_checkpointing_disable()
            with peak_rss() as mem:
                if stage == "rft":
                    r = tt.measure_rft(model, processor, rft, cfg.rewards, steps=args.rft_steps, device="cpu",
                                       catalog=catalog, seed=cfg.seed, train_extras=cfg.sft.train_extras)
                else:
                    r = tt.measure_supervised(model, stage, getattr(cfg, stage), batch=args.batch,
                                              seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, device="cpu")
            r.update(dtype=dtype, checkpointing=setting, peak_rss_bytes=mem["peak"], layers=args.layers,
                     vocab=args.vocab, shape=label)
            rows.append(r)
            print(f"  {stage.upper()} {dtype} checkpointing {setting}: {r['s_per_step']:.2f} s/step, peak RSS "
                  f"{benchlib.gib(mem['peak'])}", flush=True)  # progress: a full-size stage takes minutes
            gc.collect()
        del model, processor
        gc.collect()
    header = ["stage", "LLM dtype", "grad. ckpt", "s/step", "tokens/s", "peak RSS", "trainable", "notes"]
    table = []
    for r in rows:
        if r["stage"] == "rft":
            tok = f"{r['rollout_tokens_per_s']:.1f} (rollout)"
            notes = (f"G={r['num_generations']}, {r['prompts_per_step']} prompt(s)/step, {r['max_new_tokens']} new "
                     f"tokens, rollout {100 * r['rollout_share']:.0f}% of the step, {r['timed_steps']} timed step(s)")
        else:
            tok = f"{r['tokens_per_s']:.0f}"
            notes = f"batch {r['batch']} x {r['seq_len']}, {r['steps']} timed step(s)"
        table.append([r["stage"].upper(), r["dtype"], r["checkpointing"], f"{r['s_per_step']:.2f}", tok,
                      benchlib.gib(r["peak_rss_bytes"]), f"{r['trainable_params'] / 1e6:.1f} M", notes])
    print(f"\n{label} (CPU, {torch.get_num_threads()} thread(s))")
    print(benchlib.markdown_table(header, table))
    print(f"process max RSS: {benchlib.gib(benchlib.process_max_rss_bytes())}")
    if args.json:
        from medtvt_core.stats import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(rows, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
