"""Paper-shape GPU check: PT/SFT/RFT throughput and the KV-cache ratio of one model, in one table.

One model, built as a run builds it (``new_model`` on the ``paper`` preset, random weights):
LLaMA-3.2-1B config in bfloat16 with SDPA attention and LoRA r = 8, real-size frozen encoders
(xresnet1d101, ViT-B/16, Symile MLP), projectors and MPL fusion; gradient checkpointing on or off
(``--gradient-checkpointing``).  Four parts, each under its own time budget:

* ``pt``, ``sft``: tokens/s, approximate MFU and peak memory of a training step on the paper's
  batch of 8 x 600 tokens (:func:`train_throughput.measure_supervised`);
* ``rft``: s/step and rollout tokens/s of GRPO through ``run_grpo`` with G = 8 and 600 new tokens,
  1 prompt x G rows per micro-step and grad_accum 2 (the reference's per-GPU layout), beta 0.04
  (:func:`train_throughput.measure_rft`);
* ``kv``: ``model.generate`` (KV cache) vs the reference's full recomputation per token on the 1B
  model (:mod:`generation_kv_cache`), after asserting in float32 that greedy decoding gives the
  same tokens both ways.

MFU = 6 * N_llm * tokens/s / peak, N_llm the LLM's parameters, peak = 989 TFLOP/s (NVIDIA's dense
bf16 figure for the H100/H200 SXM): approximate (attention FLOPs not counted, the frozen base
skips weight gradients).  A part that runs out of its budget, out of memory or into an error is
reported as such and the others still run.  The table goes to stdout and, with ``--out``, to a
markdown file (plus ``.json`` beside it), rewritten after every part so a killed run keeps what it
measured.

    bash benchmarks/gpu_check.sh                     # on the GPU machine (installs carried wheels)
    python benchmarks/gpu_check.py --smoke           # CPU, tiny shapes, seconds: the same table
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import generation_kv_cache as kvc  # noqa: E402
import train_throughput as tt  # noqa: E402

PARTS = ("pt", "sft", "rft", "kv")
#: Seconds per part on an H200 (model build ~1 min and the pip installs come on top): 8 minutes in all.
DEFAULT_BUDGETS = {"pt": 45, "sft": 45, "rft": 150, "kv": 120}
HEADER = ["part", "metric", "value", "notes"]


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """SIGALRM after ``seconds``: the last resort for one call that runs past its part's budget (the
    parts also check their deadline between steps).  Main thread only; a no-op where unavailable."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def parse_budgets(text: str) -> dict[str, float]:
    out = dict(DEFAULT_BUDGETS)
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, _, v = item.partition("=")
        if k not in PARTS or not v:
            raise SystemExit(f"--budget {item!r}: expected PART=SECONDS with PART in {', '.join(PARTS)}")
        out[k] = float(v)
    return out


# --------------------------------------------------------------------------- parts -> rows
def rows_supervised(r: dict[str, Any], peak: float | None) -> list[list[str]]:
    s = r["stage"].upper()
    note = (f"batch {r['batch']} x {r['seq_len']}, {r['steps']} timed step(s), "
            f"{r['trainable_params'] / 1e6:.1f} M trainable")
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return [[s, "tokens/s", f"{r['tokens_per_s']:,.0f}", note],
            [s, "s/step", f"{r['s_per_step']:.3f}", ""],
            [s, "MFU (approx.)", mfu, f"6 * {r['llm_params'] / 1e9:.3f}e9 * tokens/s / {peak:g} TFLOP/s" if peak else
             "no peak known for this device"],
            [s, "peak memory", benchlib.gib(r["peak_mem_bytes"]), "torch.cuda.max_memory_allocated"]]


def rows_rft(r: dict[str, Any]) -> list[list[str]]:
    note = (f"G={r['num_generations']}, {r['prompts_per_step']} prompt(s)/step, {r['max_new_tokens']} new tokens, "
            f"beta {r['beta']}, mean of {r['timed_steps']} step(s) after the first")
    return [["RFT", "s/step", f"{r['s_per_step']:.2f}", note],
            ["RFT", "rollout tokens/s", f"{r['rollout_tokens_per_s']:,.0f}",
             f"{r['rollout_tokens_per_step']:.0f} tokens/step, rollout {100 * r['rollout_share']:.0f}% of the step"],
            ["RFT", "peak memory", benchlib.gib(r["peak_mem_bytes"]), "policy + frozen reference + rollouts"]]


def rows_kv(res: dict[str, Any]) -> list[list[str]]:
    ident = res["identity"]
    if "error" in ident:
        out = [["KV", "greedy identity (float32)", "DIFFERS", ident["error"][:160]]]
    else:
        out = [["KV", "greedy identity (float32)", "identical",
                f"{ident['greedy_tokens']} tokens compared, recompute == model.generate; sampling, same seed: "
                f"{'identical' if ident['sampling_identical'] else 'differs'}"]]
    for r in res["results"]:
        n = r["new_tokens"]
        out += [["KV", f"cache tok/s @{n}", f"{r['cache_tok_s']:,.1f}", f"{r['rows']} rows, forced length"],
                ["KV", f"recompute tok/s @{n}", f"{r['recompute_tok_s']:,.1f}", "no cache, last-position logits only"],
                ["KV", f"speed-up @{n}", f"{r['speedup']:.2f}x",
                 f"recompute s / cache s; {r['dtype']} rows identical: {r['identical_rows']:.2f}"],
                ["KV", f"memory growth @{n}", f"{benchlib.gib(r['cache_mem_growth'])} / "
                 f"{benchlib.gib(r['recompute_mem_growth'])}", "cache / recompute, over the weights"]]
    return out


def run_kv(model: Any, processor: Any, args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """Identity check first, timings second; a failed check still gets its timings, then fails the part."""
    from medtvt_core.model.stages import freeze

    freeze(model)
    model.eval()
    batch = kvc.make_batch(model, processor, args.kv_prompts, args.device)
    try:
        # Two prompts of different lengths (one left-padded), two rows each: padding is covered too.
        ident = kvc.check_identity(model, processor, kvc.make_batch(model, processor, 2, args.device),
                                   num_generations=2, new_tokens=args.identity_tokens)
    except AssertionError as exc:
        ident = {"error": str(exc)}
    lengths = [int(x) for x in args.kv_lengths.split(",")]
    results = kvc.compare(model, processor, batch, lengths, num_generations=args.num_generations, repeats=1,
                          device=args.device)
    for r in results:
        r["dtype"] = dtype
    return {"identity": ident, "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="LLM weights (default: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="recompute LLM activations in backward (PT/SFT/RFT)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=600)
    ap.add_argument("--steps", type=int, default=10, help="timed PT/SFT steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rft-steps", type=int, default=2, help="GRPO optimiser steps (the first is not averaged)")
    ap.add_argument("--rft-prompts", type=int, default=None,
                    help="prompts per GRPO micro-step (default: the preset's; paper: 1 prompt x G = 8 rows per GPU)")
    ap.add_argument("--num-generations", type=int, default=8, help="G (RFT and the KV rows per prompt)")
    ap.add_argument("--new-tokens", type=int, default=600, help="RFT completion length")
    ap.add_argument("--kv-lengths", default="128,600", help="forced generation lengths of the KV comparison")
    ap.add_argument("--kv-prompts", type=int, default=1)
    ap.add_argument("--identity-tokens", type=int, default=32)
    ap.add_argument("--budget", default="", help="seconds per part, e.g. pt=45,rft=150 (defaults: %s)" %
                    ",".join(f"{k}={v}" for k, v in DEFAULT_BUDGETS.items()))
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: 989 on H100/H200)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here (and .json beside it)")
    ap.add_argument("--smoke", action="store_true", help="tiny LLM and encoders, tiny shapes: seconds on a CPU")
    args = ap.parse_args(argv)
    budgets = parse_budgets(args.budget)
    if args.smoke:
        args.batch, args.seq_len, args.steps, args.warmup, args.rft_steps = 2, 48, 1, 1, 2
        args.num_generations, args.new_tokens, args.kv_lengths, args.identity_tokens = 2, 8, "8", 8
        if not benchlib.is_cuda(args.device):
            torch.set_num_threads(1)  # several threads on a busy small machine spin far more than they work
    cuda = benchlib.is_cuda(args.device)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in the identity check
    peak = args.peak_tflops or tt.default_peak_tflops(args.device)

    t_build = time.perf_counter()
    catalog = benchlib.plugin_catalog()
    cfg = benchlib.run_config("paper", tt.paper_sets(dtype=dtype, gradient_checkpointing=args.gradient_checkpointing,
                                                     tiny=args.smoke))
    rft_cfg = cfg.rft.model_copy(update={"num_generations": args.num_generations,
                                         "batch_size": args.rft_prompts or cfg.rft.batch_size,
                                         "max_completion_length": args.new_tokens})
    model, processor = benchlib.build_model(cfg, args.device, catalog=catalog)
    t_build = time.perf_counter() - t_build
    head = [f"device: {benchlib.device_name(args.device)}; {benchlib.versions()}",
            f"model: paper preset{' (tiny smoke variant)' if args.smoke else ''}, random weights, LLM {dtype}, "
            f"attention {model.llm.config._attn_implementation}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}; "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
            f"({benchlib.llm_parameters(model) / 1e6:.1f} M LLM); built in {t_build:.0f} s"]
    if peak:
        head.append(f"MFU = 6 * N_llm * tokens/s / {peak:g} TFLOP/s (NVIDIA dense bf16 peak; approximate)")
    print("\n".join(head), flush=True)

    rows: list[list[str]] = []
    raw: dict[str, Any] = {"header": head, "parts": {}}
    failed = []

    def publish() -> str:
        table = benchlib.markdown_table(HEADER, rows)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(head) + "\n\n" + table + "\n")
            args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str))
        return table

    parts: dict[str, Callable[[float], list[list[str]]]] = {}

    def sup(stage: str) -> Callable[[float], list[list[str]]]:
        def run(deadline: float) -> list[list[str]]:
            r = tt.measure_supervised(model, stage, getattr(cfg, stage), batch=args.batch, seq_len=args.seq_len,
                                      steps=args.steps, warmup=args.warmup, device=args.device, peak_tflops=peak,
                                      deadline=deadline)
            raw["parts"][stage] = r
            return rows_supervised(r, peak)
        return run

    def rft(deadline: float) -> list[list[str]]:
        r = tt.measure_rft(model, processor, rft_cfg, cfg.rewards, steps=args.rft_steps, device=args.device,
                           catalog=catalog, seed=cfg.seed, train_extras=cfg.sft.train_extras, deadline=deadline)
        raw["parts"]["rft"] = r
        return rows_rft(r)

    def kv(deadline: float) -> list[list[str]]:
        r = run_kv(model, processor, args, dtype)
        raw["parts"]["kv"] = r
        out = rows_kv(r)
        if "error" in r["identity"]:
            rows.extend(out)  # the timings stay in the table; the part still counts as failed
            raise AssertionError(r["identity"]["error"])
        return out

    parts.update(pt=sup("pt"), sft=sup("sft"), rft=rft, kv=kv)
    for name in args.parts.split(","):
        budget = budgets[name]
        t0 = time.perf_counter()
        try:
            # Loops stop at the soft deadline; the alarm catches a single call that overruns by far.
            with hard_limit(budget * 1.5 + 30 if not args.smoke else 0):
                new = parts[name](t0 + budget)
        except PartTimeout as exc:
            new, failed = [[name.upper(), "status", "timed out", str(exc)]], failed + [name]
        except torch.OutOfMemoryError as exc:
            new, failed = [[name.upper(), "status", "out of memory", str(exc).splitlines()[0][:120]]], failed + [name]
        except Exception as exc:  # one broken part must not cost the others their measurement
            traceback.print_exc()
            new, failed = [[name.upper(), "status", "error", f"{type(exc).__name__}: {exc}"[:200]]], failed + [name]
        rows.extend(new + [[name.upper(), "wall time", f"{time.perf_counter() - t0:.0f} s", f"budget {budget:g} s"]])
        if cuda:  # hand the part's cached blocks back before the next part measures its peak
            gc.collect()
            torch.cuda.empty_cache()
        print(benchlib.markdown_table(HEADER, new), flush=True)
        publish()
    print("\n" + "\n".join(head) + "\n\n" + publish(), flush=True)
    if failed:
        print(f"parts that did not complete: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
