"""Generation throughput: KV cache (``model.generate``) vs. recomputing the whole sequence per new token.

The baseline, :func:`generate_recompute`, is the reference code's decoding: no cache, one full
forward of the LLM over all input embeddings (prompt, modality tokens, every token generated so
far) per new token.  It lives here, not in the model, because only this benchmark needs it.  It
returns what ``model.generate`` returns (new token ids ``[B * G, T]``, the stop token kept, then
padding) and picks tokens with transformers' own logits processors in ``generate``'s order, so
greedy decoding gives the same tokens as the cached path; the benchmark asserts that in float32
before it times anything (in bfloat16 the two paths round differently, so near-tied logits may
flip: the timed runs report the share of identical rows instead).

Both methods run on the same MedTVT model (random weights), the same left-padded multimodal
prompts and G rows per prompt, with the length forced (``min_new_tokens = max_new_tokens``: EOS
suppressed), greedy.  The baseline is charitable: it asks the LLM for the last position's logits
only (``logits_to_keep=1``).  Speed-up = recompute seconds / cache seconds, from one run.  Memory:
on a GPU the growth of ``torch.cuda.max_memory_allocated`` during the call; on the CPU the
resident-set growth sampled every 2 ms (an approximation).

    python benchmarks/generation_kv_cache.py                          # tiny LLM, CPU, ~1 min
    python benchmarks/generation_kv_cache.py --smoke                  # seconds
    python benchmarks/generation_kv_cache.py --llm llama-3.2-1b --device cuda --dtype bfloat16

Encoders are the tiny variants here; their features are computed once per batch, as the feature
cache provides them in training (both methods then run the same heads, projectors and fusion).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Iterator, Mapping, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

QUESTIONS = [benchlib.QUESTION, "ECG <ecg>; image <cxr>; labs <lab>. Diagnose."]


# --------------------------------------------------------------------------- the reference's decoding
@torch.no_grad()
def generate_recompute(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       modality_mask: torch.Tensor | None = None,
                       modality_inputs: Mapping[str, torch.Tensor] | None = None,
                       modality_features: Mapping[str, torch.Tensor] | None = None, *, num_return_sequences: int = 1,
                       do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                       max_new_tokens: int = 64, min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                       pad_token_id: int | None = None) -> torch.Tensor:
    """New token ids ``[B * G, T]`` decoded without a KV cache, with ``model.generate``'s arguments.

    Each step runs the LLM over the whole embedding sequence and keeps the last position's logits.
    Token choice follows transformers' ``generate``: float32 logits, ``MinNewTokensLength`` and
    ``SuppressTokens`` (the placeholders, as ``model.generate``), then (sampling only) temperature,
    top-k, top-p warpers, ``argmax`` or ``multinomial`` on the global
    RNG; finished rows get ``pad_token_id``; the loop ends when every row has produced a stop token.
    """
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, SuppressTokensLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from medtvt_core.model.modeling import position_ids_from_mask

    am = attention_mask.to(model.device)
    if (am[:, -1] == 0).any():
        raise ValueError("generation needs LEFT-padded prompts (MedTVTProcessor.generation_features)")
    # Modality tokens are computed once per prompt (as the reference did), then copied to its G rows.
    embeds, _ = model.embed(input_ids, modality_mask, modality_inputs, modality_features)
    g = int(num_return_sequences)
    embeds, am = embeds.repeat_interleave(g, 0), am.repeat_interleave(g, 0)
    tc = model.llm.config
    eos = tc.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    pad = (tc.pad_token_id if tc.pad_token_id is not None else eos_ids[0]) if pad_token_id is None else pad_token_id
    dev = embeds.device
    procs = LogitsProcessorList()
    if min_new_tokens > 0:  # with inputs_embeds, generate's input_ids hold the new tokens only: skip 0
        procs.append(MinNewTokensLengthLogitsProcessor(0, min_new_tokens, eos_ids, device=dev))
    # As model.generate: a placeholder is an input slot, never a token the model may write.
    procs.append(SuppressTokensLogitsProcessor(sorted(model.config.placeholder_token_ids.values()), device=dev))
    if do_sample:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p))
    embed_tokens = model.llm.get_input_embeddings()
    stop = torch.tensor(eos_ids, device=dev)
    rows = embeds.shape[0]
    new = torch.empty(rows, 0, dtype=torch.long, device=dev)
    unfinished = torch.ones(rows, dtype=torch.long, device=dev)
    for _ in range(max_new_tokens):
        out = model.llm(inputs_embeds=embeds, attention_mask=am, position_ids=position_ids_from_mask(am),
                        use_cache=False, logits_to_keep=1)
        scores = procs(new, out.logits[:, -1].float())
        if do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = nxt * unfinished + pad * (1 - unfinished)
        new = torch.cat([new, nxt[:, None]], 1)
        unfinished = unfinished & ~torch.isin(nxt, stop)
        if not bool(unfinished.any()):
            break
        # The reference appends the new token's embedding and runs everything again.
        embeds = torch.cat([embeds, embed_tokens(nxt)[:, None].to(embeds.dtype)], 1)
        am = torch.cat([am, am.new_ones(rows, 1)], 1)
    return new


# --------------------------------------------------------------------------- model and inputs
def build(llm: str, device: str, dtype: str, tokens_per_modality: int = 1, catalog: Any = None) -> tuple[Any, Any]:
    """The ``paper`` preset with tiny encoders and the ``llm`` variant, in eval mode, nothing trainable."""
    from medtvt_core.model.stages import freeze

    sets = [*benchlib.TINY_SETS[:3], f"llm.options.variant={llm}", "llm.options.tokenizer_vocab_size=1000",
            f"llm.options.dtype={dtype}", f"projector.tokens_per_modality={tokens_per_modality}"]
    model, processor = benchlib.build_model(benchlib.run_config("paper", sets), device, catalog=catalog)
    if llm == "tiny":
        spread_weights(model)
    freeze(model)
    return model.eval(), processor


def spread_weights(model: Any, std: float = 0.15) -> None:
    """Re-draw the tiny LLM's matrices with a wider std: at the 0.02 init greedy decoding repeats one
    token, which would make the token-identity check trivially true."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "norm" not in n and "lora_" not in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


@torch.no_grad()
def make_batch(model: Any, processor: Any, n_prompts: int, device: str) -> dict[str, Any]:
    """Left-padded prompts with all three modalities as frozen features, encoded once here as the
    feature cache would (both methods then run the same heads, projectors and fusion on them)."""
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(n_prompts)]
    feats = processor.generation_features(prompts)
    g = torch.Generator().manual_seed(1)
    features = {m: model.encoders[m].encode(torch.randn((n_prompts, *model.encoders[m].input_shape), generator=g)
                                            .to(device)) for m in model.modalities}
    return dict(input_ids=feats["input_ids"].to(device), attention_mask=feats["attention_mask"].to(device),
                modality_mask=torch.ones(n_prompts, len(model.modalities), dtype=torch.bool, device=device),
                modality_features=features)


@contextlib.contextmanager
def llm_dtype(model: Any, dtype: torch.dtype) -> Iterator[None]:
    """Run a block with every floating LLM parameter in ``dtype``, then restore each one's own dtype
    (LoRA weights stay float32 in a bfloat16 base, so one blanket cast back would be wrong)."""
    saved = {}
    for p in model.llm.parameters():  # a tied embedding/head is one Parameter, converted once
        if p.is_floating_point() and p.dtype != dtype:
            saved[p] = p.dtype
            p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, dt in saved.items():
            p.data = p.data.to(dt)


# --------------------------------------------------------------------------- measurements
def stop_ids(processor: Any) -> dict[str, Any]:
    return {"eos_token_id": processor.stop_token_ids, "pad_token_id": processor.pad_token_id}


def check_identity(model: Any, processor: Any, batch: Mapping[str, Any], *, num_generations: int,
                   new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """In float32, ``generate_recompute`` against ``model.generate``: greedy must give exactly the same
    tokens (asserted); sampling from the same seed is compared too (reported: it also needs the same
    random draws, which holds when both consume the RNG alike).  Half the length is forced (EOS
    suppressed), the rest may stop, so both the forced and the stopping paths are compared."""
    kw = dict(num_return_sequences=num_generations, max_new_tokens=new_tokens, min_new_tokens=new_tokens // 2,
              **stop_ids(processor))
    with llm_dtype(model, torch.float32):
        cached = model.generate(**batch, **kw)
        recomputed = generate_recompute(model, **batch, **kw)
        assert cached.shape == recomputed.shape, (cached.shape, recomputed.shape)
        bad = (cached != recomputed).any(1).nonzero().flatten().tolist()
        assert not bad, f"greedy decoding without cache differs from model.generate in rows {bad}"
        samp = dict(kw, do_sample=True, temperature=0.6, top_p=0.9)
        torch.manual_seed(seed)
        s_cached = model.generate(**batch, **samp)
        torch.manual_seed(seed)
        s_recomputed = generate_recompute(model, **batch, **samp)
    same = s_cached.shape == s_recomputed.shape and bool((s_cached == s_recomputed).all())
    return {"greedy_tokens": cached.numel(), "sampling_identical": same}


def compare(model: Any, processor: Any, batch: Mapping[str, Any], lengths: Sequence[int], *, num_generations: int,
            repeats: int, device: str, warmup_tokens: int = 16,
            on_row: Any = None) -> list[dict[str, Any]]:
    """Cache vs recompute at each forced length (best of ``repeats`` per method); one dict per length."""
    rows = num_generations * batch["input_ids"].shape[0]
    common = dict(num_return_sequences=num_generations, **stop_ids(processor))

    def cached(n: int) -> torch.Tensor:
        return model.generate(**batch, **common, max_new_tokens=n, min_new_tokens=n)

    def recompute(n: int) -> torch.Tensor:
        return generate_recompute(model, **batch, **common, max_new_tokens=n, min_new_tokens=n)

    for fn in (cached, recompute):  # warm-up: kernel selection, allocator growth, lazy imports
        fn(warmup_tokens)

    def best(fn: Any, n: int) -> tuple[torch.Tensor, benchlib.Measured]:
        runs = []
        for _ in range(repeats):
            with benchlib.measure(device) as m:
                out = fn(n)
            runs.append((out, m))
        return min(runs, key=lambda r: r[1].seconds)  # a shared machine adds noise, never speed

    results = []
    for n in lengths:
        out_c, m_c = best(cached, n)
        out_r, m_r = best(recompute, n)
        assert out_c.shape == out_r.shape == (rows, n), (out_c.shape, out_r.shape)
        r = dict(new_tokens=n, rows=rows, cache_tok_s=rows * n / m_c.seconds, recompute_tok_s=rows * n / m_r.seconds,
                 speedup=m_r.seconds / m_c.seconds, cache_seconds=m_c.seconds, recompute_seconds=m_r.seconds,
                 cache_mem_growth=m_c.growth_bytes, recompute_mem_growth=m_r.growth_bytes,
                 identical_rows=float((out_c == out_r).all(1).float().mean()))
        results.append(r)
        if on_row is not None:
            on_row(r)
    return results


def format_row(r: Mapping[str, Any]) -> list[str]:
    return [str(r["new_tokens"]), f"{r['cache_tok_s']:.1f}", f"{r['recompute_tok_s']:.1f}", f"{r['speedup']:.2f}x",
            benchlib.mib(r["cache_mem_growth"]), benchlib.mib(r["recompute_mem_growth"]), f"{r['identical_rows']:.2f}"]


HEADER = ["new tokens", "cache tok/s", "recompute tok/s", "speed-up", "cache mem", "recompute mem", "same tokens"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", choices=["tiny", "llama-3.2-1b"], default="tiny", help="LLM architecture (random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="LLM dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--lengths", default="64,256,600", help="new tokens per run, comma-separated")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per batch")
    ap.add_argument("--num-generations", type=int, default=2, help="G rows per prompt")
    ap.add_argument("--tokens-per-modality", type=int, default=1)
    ap.add_argument("--identity-tokens", type=int, default=32, help="tokens of the float32 greedy identity check")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared machine)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per method and length (best is kept)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: 2 prompts (one left-padded), G=2, 8 tokens, 1 repeat")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.prompts, args.repeats, args.identity_tokens = "8", 2, 1, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if benchlib.is_cuda(args.device) else "float32")
    lengths = [int(x) for x in args.lengths.split(",")]

    model, processor = build(args.llm, args.device, dtype, args.tokens_per_modality)
    batch = make_batch(model, processor, args.prompts, args.device)
    g = args.num_generations
    ident = check_identity(model, processor, batch, num_generations=g, new_tokens=args.identity_tokens)
    print(f"llm={args.llm} device={benchlib.device_name(args.device)} dtype={dtype} "
          f"LLM params={benchlib.llm_parameters(model) / 1e6:.1f}M prompts={args.prompts} G={g} "
          f"prompt_len={batch['input_ids'].shape[1]} (padded); greedy, forced length; {benchlib.versions()}")
    print(f"identity check (float32, up to {args.identity_tokens} tokens x {args.prompts * g} rows): greedy "
          f"recompute == model.generate on all {ident['greedy_tokens']} tokens; sampling (temperature 0.6, "
          f"top-p 0.9, same seed) {'identical' if ident['sampling_identical'] else 'DIFFERS'}")
    results = compare(model, processor, batch, lengths, num_generations=g, repeats=args.repeats, device=args.device)
    print(benchlib.markdown_table(HEADER, [format_row(r) for r in results]))
    mem = ("growth of cuda max_memory_allocated" if benchlib.is_cuda(args.device)
           else "CPU RSS growth (sampled, approx.)")
    print(f"speed-up = recompute seconds / cache seconds; mem = {mem}; same tokens = share of rows identical "
          f"between the two methods in the timed dtype")
    res = dict(llm=args.llm, device=args.device, dtype=dtype, prompts=args.prompts, num_generations=g,
               prompt_len=int(batch["input_ids"].shape[1]), memory=mem, identity=ident,
               process_max_rss_mib=benchlib.process_max_rss_bytes() / 2**20, results=results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
