"""Generation throughput: KV cache (transformers ``generate``) vs. recomputing the whole sequence.

The baseline is the reference's decoding (``MedTVTModel.generate_recompute``): one full forward
over all input embeddings per new token, no cache.  Both methods run on the same MedTVT model
(random weights), the same left-padded multimodal prompts and G samples per prompt, with the
length forced (``min_new_tokens = max_new_tokens``: EOS suppressed), greedy decoding.  Ratios come
from one run.  Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak
resident-set growth during the call, sampled every 2 ms from /proc (an approximation; torch's
CPU allocator has no peak counter).

    python benchmarks/generation_kv_cache.py                          # tiny LLM, CPU, ~1-2 min
    python benchmarks/generation_kv_cache.py --variant llama-3.2-1b --device cuda --dtype bfloat16

Encoders are the tiny variants (they run once per prompt in both methods; not what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time

import torch

CORPUS = [
    "<think> The ECG shows an irregularly irregular rhythm without P waves; the chest radiograph shows "
    "right lower lobe consolidation; lactate and white cells are raised. </think>"
    "<answer> Atrial Fibrillation; Pneumonia; Sepsis </answer>",
    "Given the ECG <ecg>, the chest x-ray <cxr> and the laboratory panel <lab>, reason step by step "
    "and list the diseases of this hospital stay.",
    "Creatinine rose over 24 hours consistent with acute renal failure; blood pressure is elevated.",
    "Sinus rhythm, normal axis, no acute ST changes. Heart size normal, lungs clear.",
] * 30
QUESTIONS = [
    "Given the ECG <ecg>, the chest x-ray <cxr> and the laboratory panel <lab>, reason step by step and list "
    "the diseases of this hospital stay.",
    "ECG <ecg>; image <cxr>; labs <lab>. Diagnose.",
]


class _RssPeak:
    """Peak RSS growth (bytes) over a block, sampled from /proc/self/statm in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> "_RssPeak":
        self.base = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss() - self.base)


def build_model(variant: str, device: str, dtype: str, tokens_per_modality: int):
    from medtvt_core.modeling import MedTVTConfig, MedTVTModel

    cfg = MedTVTConfig(
        modalities=["ecg", "cxr", "lab"],
        encoders={"ecg": {"name": "ecgfm-ked", "options": {"variant": "tiny"}},
                  "cxr": {"name": "vit", "options": {"variant": "tiny"}},
                  "lab": {"name": "symile", "options": {"variant": "tiny"}}},
        projector={"tokens_per_modality": tokens_per_modality, "blocks": 3},
        fusion={"name": "mpl", "options": {"style": "official"}},
        llm={"name": "llama-lora", "options": {"variant": variant, "dtype": dtype, "tokenizer_vocab_size": 1000}},
    )
    torch.manual_seed(0)
    model = MedTVTModel.from_config(cfg, corpus=lambda: CORPUS)
    if variant == "tiny":
        # A 0.02-std init makes greedy decoding repeat one token; spread weights so outputs vary.
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.llm.named_parameters():
                if "norm" not in n and "lora_" not in n:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.15)
    model.configure_trainable("eval")
    return model.to(device).eval()


def make_batch(model, n_prompts: int, device: str):
    proc = model.processor
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(n_prompts)]
    feats = proc.generation_features(prompts)
    g = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn((n_prompts, *model.encoders[m].input_shape), generator=g).to(device)
              for m in model.modalities}
    return dict(input_ids=feats["input_ids"].to(device), attention_mask=feats["attention_mask"].to(device),
                modality_mask=torch.ones(n_prompts, 3, dtype=torch.bool, device=device), modality_inputs=inputs)


def measure(fn, device: str) -> tuple[torch.Tensor, float, int]:
    """(output, seconds, peak bytes) of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return out, dt, torch.cuda.max_memory_allocated() - base
    with _RssPeak() as rss:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, dt, rss.peak


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=["tiny", "llama-3.2-1b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="LLM dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--lengths", default="64,256,600", help="new tokens per run, comma-separated")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per batch")
    ap.add_argument("--num-generations", type=int, default=2, help="G samples per prompt")
    ap.add_argument("--tokens-per-modality", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared machine)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per method and length (best is kept)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    lengths = [int(x) for x in args.lengths.split(",")]

    model = build_model(args.variant, args.device, dtype, args.tokens_per_modality)
    batch = make_batch(model, args.prompts, args.device)
    g = args.num_generations
    rows = g * args.prompts
    prompt_len = batch["input_ids"].shape[1]
    n_params = sum(p.numel() for p in model.llm.parameters())
    print(f"variant={args.variant} device={args.device} dtype={dtype} LLM params={n_params / 1e6:.1f}M "
          f"prompts={args.prompts} G={g} rows={rows} prompt_len={prompt_len} (padded) greedy, forced length")
    mem_note = "cuda max_memory_allocated" if args.device.startswith("cuda") else "CPU RSS growth (sampled, approx.)"

    def cached(n):
        return model.generate(**batch, num_return_sequences=g, max_new_tokens=n, min_new_tokens=n)

    def recompute(n):
        return model.generate_recompute(**batch, num_return_sequences=g, max_new_tokens=n, min_new_tokens=n)

    for _ in range(2):  # warm-up: the first calls pay for kernel selection and allocator growth
        cached(32), recompute(32)
    results = []
    print(f"{'new':>5} {'cache tok/s':>12} {'recompute tok/s':>16} {'speed-up':>9} {'cache peak':>11} "
          f"{'recomp. peak':>13} {'same tokens':>12}")
    for n in lengths:
        # Best of --repeats per method (a shared machine adds noise, never speed).
        out_c, t_c, m_c = min((measure(lambda: cached(n), args.device) for _ in range(args.repeats)), key=lambda x: x[1])
        out_r, t_r, m_r = min((measure(lambda: recompute(n), args.device) for _ in range(args.repeats)), key=lambda x: x[1])
        assert out_c.shape == out_r.shape == (rows, n), (out_c.shape, out_r.shape)
        same = float((out_c == out_r).all(1).float().mean())
        r = dict(new_tokens=n, cache_tok_s=rows * n / t_c, recompute_tok_s=rows * n / t_r, speedup=t_r / t_c,
                 cache_seconds=t_c, recompute_seconds=t_r, cache_peak_mib=m_c / 2**20, recompute_peak_mib=m_r / 2**20,
                 identical_rows=same)
        results.append(r)
        print(f"{n:>5} {r['cache_tok_s']:>12.1f} {r['recompute_tok_s']:>16.1f} {r['speedup']:>8.2f}x "
              f"{r['cache_peak_mib']:>9.1f}Mi {r['recompute_peak_mib']:>11.1f}Mi {same:>12.2f}")
    print(f"peak memory = {mem_note}; 'same tokens' = fraction of rows token-identical between the two methods")
    res = dict(variant=args.variant, device=args.device, dtype=dtype, prompts=args.prompts, num_generations=g,
               prompt_len=prompt_len, memory=mem_note,
               process_max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               results=results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
