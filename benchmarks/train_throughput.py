"""PT/SFT training throughput and peak memory of the ``paper`` model shape.

LLaMA-3.2-1B config (random weights, d = 2048), full-size frozen encoders (xresnet1d101,
ViT-B/16, Symile MLP) fed from cached-feature-shaped tensors, LoRA r = 8, the paper's batch 8 and
600-token sequences.  Runs on CUDA when available (bf16); ``--device cpu`` works with fewer steps.

    python benchmarks/train_throughput.py                      # GPU if present
    python benchmarks/train_throughput.py --device cpu --steps 2 --seq-len 128 --batch 2

Prints samples/s and tokens/s per stage and the peak GPU memory (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(device: str, dtype: str, k: int):
    from medtvt_core.modeling import MedTVTConfig, MedTVTModel

    enc = {"ecg": ("ecgfm-ked", {"variant": "full"}), "cxr": ("vit", {"variant": "base"}),
           "lab": ("symile", {"variant": "full"})}
    cfg = MedTVTConfig.model_validate(dict(
        modalities=list(enc), encoders={m: {"name": n, "options": o} for m, (n, o) in enc.items()},
        projector={"tokens_per_modality": k, "blocks": 3}, fusion={"name": "mpl", "options": {"style": "official"}},
        llm={"name": "llama-lora", "options": {"variant": "llama-3.2-1b", "lora_rank": 8, "dtype": dtype,
                                               "gradient_checkpointing": True}}))
    corpus = lambda: ["the ecg shows sinus rhythm", "white cells are raised", "<answer> Sepsis </answer>"] * 50  # noqa: E731
    model = MedTVTModel.from_config(cfg, corpus=corpus)
    return model.to(device)


def batch(model, bsz: int, seq: int, device: str):
    """Random token ids with the three placeholders (K copies each) and cached-feature tensors."""
    k = model.config.tokens_per_modality
    vocab = model.llm.get_input_embeddings().num_embeddings
    ids = torch.randint(10, min(vocab, 30000), (bsz, seq))
    pos = 1
    for m in model.modalities:
        ids[:, pos:pos + k] = model.placeholder_ids[m]
        pos += k + 2
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # the question part is masked, as in training
    feats = {m: torch.randn(bsz, *model.encoders[m].feature_shape) for m in model.modalities}
    mask = torch.ones(bsz, len(model.modalities), dtype=torch.bool)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "modality_mask": mask.to(device), "modality_features": {m: v.to(device) for m, v in feats.items()}}


def measure(model, stage: str, args, device: str) -> dict:
    model.configure_trainable(stage, train_extras=True)
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0.05)
    b = batch(model, args.batch, args.seq_len, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for _ in range(args.warmup):
        with autocast:
            model(**b).loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        with autocast:
            model(**b).loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out = {"stage": stage, "s_per_step": round(dt, 4), "samples_per_s": round(args.batch / dt, 2),
           "tokens_per_s": round(args.batch * args.seq_len / dt, 1),
           "trainable_params": sum(p.numel() for p in model.trainable_parameters())}
    if device == "cuda":
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=600)
    ap.add_argument("--tokens-per-modality", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.manual_seed(0)
    model = build(args.device, dtype, args.tokens_per_modality)
    n = sum(p.numel() for p in model.parameters())
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), dtype {dtype}, "
          f"{n / 1e6:.1f} M parameters, batch {args.batch} x {args.seq_len} tokens")
    rows = [measure(model, s, args, args.device) for s in ("pt", "sft")]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
