"""How much the CAO gates change a trained model's reports (docs/partial_patients.md, "The CAO gates").

Regenerates the greedy test reports of a run's last stage with every present modality's gate
forced to 1 (the gate removed), and counts the reports whose disease set changes and the
F1 with each. The tokens enter the LLaMA through an RMSNorm, which undoes a per-token scale, so a
gate that the reports barely depend on cannot tell which modality a diagnosis used.

    python benchmarks/gate_probe.py runs/demo [--limit 60]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()

    from medtvt_core.answers import answer_set
    from medtvt_core.config import resolve_config
    from medtvt_core.data.cache import FeatureCache, encode_dataset
    from medtvt_core.data.dataset import open_splits
    from medtvt_core.metrics.clinical import clinical_efficacy
    from medtvt_core.run.diagnose import load_model_dir, model_dir_of_run
    from medtvt_core.run.evaluation import dataset_reports

    cfg = resolve_config(config_file=a.run / "config.yaml")
    model, processor = load_model_dir(model_dir_of_run(a.run))
    root = Path(cfg.data.root) if cfg.data.root is not None else a.run / "data"
    test = open_splits(root, modalities=processor.readers, test_file=cfg.data.test_file, fit_stats=False,
                       persist_stats=False)["test"]
    test.attach_cache(dict(model.encoders), FeatureCache(cfg.data.cache_dir or a.run / "cache"))
    encode_dataset(test, batch_size=32)
    fusion = model.fusion
    if getattr(fusion, "gate", None) is None:
        raise SystemExit(f"{a.run}: the fusion has no CAO gates")
    e = cfg.eval
    gen = lambda: dataset_reports(model, processor, test, batch_size=e.batch_size,  # noqa: E731
                                  max_new_tokens=e.max_new_tokens, limit=a.limit or e.limit, progress=False)
    base = gen()
    out = {"n": len(base), "f1": clinical_efficacy([r["prediction"] for r in base],
                                                   [r["reference"] for r in base])["f1"]}
    gates = torch.tensor([list(r["weights"].values()) for r in base if r["weights"]])
    out["gate_mean"] = gates.mean(0).tolist()
    out["gate_std_over_patients"] = gates.std(0).tolist()
    for value in (1.0,):
        fusion.gates = lambda x, mask, v=value: mask.to(x.dtype) * v  # instance attribute: this probe only
        recs = gen()
        del fusion.gates
        changed = sum(answer_set(r["prediction"]) != answer_set(b["prediction"]) for r, b in zip(recs, base))
        out[f"gates={value:g}"] = {
            "changed_disease_sets": changed,
            "f1": clinical_efficacy([r["prediction"] for r in recs], [r["reference"] for r in recs])["f1"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
