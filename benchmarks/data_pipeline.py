"""Data pipeline throughput, and epoch time with real-size frozen encoders: warm feature cache vs none.

Measured in one run on one synthetic cohort (``medtvt data synth`` formats):

1. reader cost per modality (ms per sample) and DataLoader throughput (samples/s) of the
   disease training set: raw inputs (every file read and preprocessed) vs cached features;
2. time per training epoch of a MedTVT model (``new_model`` on the ``demo`` preset, no base
   pretraining) whose encoders are real size (``ecgfm-ked`` variant ``full`` = xresnet1d101,
   ``vit`` variant ``base`` = ViT-B/16, ``symile`` ``full``; ``--encoders tiny`` for a quick run)
   with the demo's tiny LLM, in three arms:

   * no cache: every batch runs the frozen encoders;
   * warm cache, paper crops: ECG and labs from the cache, CXR random crops encoded on the fly
     (random training views are never cached);
   * warm cache, centre crops (``cxr`` option ``train_crop: center``): every modality cached.

   The one-off time to fill the cache is reported separately.  Ratios = no-cache epoch time /
   cached epoch time, from the same run.  One step = forward, backward, AdamW on the stage's
   trainable parameters (``configure_trainable``), batches made by the run's own
   ``SupervisedCollator`` (the processor's answer-only labels).

    python benchmarks/data_pipeline.py                       # CPU, ~3-5 min with the defaults
    python benchmarks/data_pipeline.py --smoke               # tiny encoders, 4 patients, seconds
    python benchmarks/data_pipeline.py --n-patients 64 --epochs 3 --device cuda

Encoders are randomly initialised (no weights needed): their cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

ENCODERS = {"full": {"ecg": "full", "cxr": "base", "lab": "full"},
            "tiny": {"ecg": "tiny", "cxr": "tiny", "lab": "tiny"}}


def _loader(ds: Any, batch_size: int, workers: int, collate: Any) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       collate_fn=collate, generator=torch.Generator().manual_seed(0))


def reader_costs(root: Path, ds: Any, repeats: int = 1) -> dict[str, float]:
    """Milliseconds per sample of each modality's ``load`` (train views)."""
    out = {}
    for name, mod in ds.modalities.items():
        refs = ds.references(name)
        mod.load(refs[0], root=root, train=True, generator=torch.Generator().manual_seed(0))  # imports, tables
        t0 = time.perf_counter()
        for _ in range(repeats):
            for r in refs:
                mod.load(r, root=root, train=True, generator=torch.Generator().manual_seed(0))
        out[name] = 1000 * (time.perf_counter() - t0) / (repeats * len(refs))
    return out


def pipeline_rate(ds: Any, batch_size: int, workers: int) -> float:
    """Samples per second through DataLoader + collator (no model)."""
    n = 0
    t0 = time.perf_counter()
    for batch in _loader(ds, batch_size, workers, ds.collator()):
        n += len(batch["ids"])
    return n / (time.perf_counter() - t0)


def epoch_times(model: Any, processor: Any, ds: Any, args: argparse.Namespace) -> list[float]:
    from medtvt_core.model.stages import configure_trainable
    from medtvt_core.training.supervised import SupervisedCollator

    configure_trainable(model, args.stage)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collate = SupervisedCollator(ds.collator(), processor, args.max_length)
    times = []
    for epoch in range(args.epochs):
        ds.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in _loader(ds, args.batch_size, args.workers, collate):
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        benchlib.synchronize(model.device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, help="existing dataset (default: synthesise one in a temp dir)")
    ap.add_argument("--n-patients", type=int, default=24, help="patients of the synthetic cohort")
    ap.add_argument("--encoders", choices=list(ENCODERS), default="full", help="encoder sizes (full: the paper's)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per arm (the mean is reported)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--stage", default="pt", choices=["pt", "sft"], help="trainable parameters of this stage")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny encoders, 4 patients, 1 epoch")
    args = ap.parse_args(argv)
    if args.smoke:
        args.encoders, args.n_patients, args.epochs = "tiny", 4, 1
        args.threads = args.threads or 1  # several threads on a busy small machine spin far more than they work
    if args.threads:
        torch.set_num_threads(args.threads)

    from medtvt_core.build import build_readers
    from medtvt_core.data import FeatureCache, encode_dataset, open_splits
    from medtvt_core.data.synth import TRAIN_FILE, synthesize

    tmp = tempfile.TemporaryDirectory(prefix="medtvt-bench-")
    root = args.root
    if root is None:
        root = Path(tmp.name) / "data"
        s = synthesize(root, n_patients=args.n_patients, seed=0, workers=1)
        print(f"cohort: {s.n_patients} patients ({s.n_train} train) synthesised in {s.seconds:.1f} s")
    catalog = benchlib.plugin_catalog()

    # ---------------------------------------------------------------- data pipeline alone
    mods = build_readers(["ecg", "cxr", "lab"], catalog=catalog)
    raw = open_splits(root, modalities=mods, train_file=TRAIN_FILE, catalog=catalog, persist_stats=False)["train"]
    costs = reader_costs(root, raw)
    print("reader cost (ms/sample, train views): " + ", ".join(f"{m} {v:.1f}" for m, v in costs.items()))
    rate_raw = pipeline_rate(raw, args.batch_size, args.workers)
    print(f"pipeline, raw inputs: {rate_raw:.1f} samples/s ({len(raw)} samples, batch {args.batch_size}, "
          f"workers {args.workers})")

    # ---------------------------------------------------------------- model with real-size encoders
    variants = ENCODERS[args.encoders]
    sets = [f"encoders.{m}.options.variant={v}" for m, v in variants.items()]
    sets += ["llm.options.pretrain_steps=0", f"output_dir={Path(tmp.name) / 'run'}"]  # no demo base pretraining
    cfg = benchlib.run_config("demo", sets)
    corpus = [t for r in raw.records for t in (r.question, r.answer)]
    t0 = time.perf_counter()
    model, processor = benchlib.build_model(cfg, args.device, catalog=catalog, corpus=corpus, readers=mods)
    n_enc = sum(p.numel() for e in model.encoders.values() for p in e.backbone_parameters())
    print(f"model built in {time.perf_counter() - t0:.1f} s: frozen encoder backbones {n_enc / 1e6:.1f} M parameters "
          f"({args.encoders}), device {args.device}, stage {args.stage} trainables")
    encoders = dict(model.encoders)

    arms: dict[str, list[float]] = {}
    arms["no cache"] = epoch_times(model, processor, raw, args)

    fills: dict[str, float] = {}
    arms_c = (("warm cache, CXR random crops", {}), ("warm cache, CXR centre crops", {"train_crop": "center"}))
    for label, cxr_opts in arms_c:
        mods_c = build_readers(["ecg", "cxr", "lab"], {"cxr": cxr_opts}, catalog)
        cache = FeatureCache(Path(tmp.name) / "cache")
        ds = open_splits(root, modalities=mods_c, train_file=TRAIN_FILE, catalog=catalog, encoders=encoders,
                         cache=cache, persist_stats=False)["train"]
        t0 = time.perf_counter()
        report = encode_dataset(ds, batch_size=16, num_workers=args.workers)
        fills[label] = time.perf_counter() - t0
        enc = ", ".join(f"{m} {r['encoded']} new/{r['cached']} cached" for m, r in report.items())
        print(f"{label}: cache fill {fills[label]:.1f} s ({enc}); cached modalities {', '.join(ds.cached_modalities)}")
        print(f"  pipeline, cached features: {pipeline_rate(ds, args.batch_size, args.workers):.1f} samples/s")
        arms[label] = epoch_times(model, processor, ds, args)

    base = statistics.mean(arms["no cache"])
    rows = []
    for label, times in arms.items():
        m = statistics.mean(times)
        rows.append([label, f"{m:.2f}", f"{base / m:.2f}x", ", ".join(f"{t:.2f}" for t in times)])
    print(f"\nepoch time ({len(raw)} samples, batch {args.batch_size}, mean of {args.epochs} epoch(s)):")
    print(benchlib.markdown_table(["arm", "epoch s", "speed-up vs no cache", "epochs"], rows))
    tmp.cleanup()
    return {"reader_ms": costs, "raw_samples_per_s": rate_raw, "cache_fill_s": fills,
            "epoch_s": {k: statistics.mean(v) for k, v in arms.items()}}


if __name__ == "__main__":
    main()
