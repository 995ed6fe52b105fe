"""The orchestrator: one :class:`RunConfig` -> data -> model -> PT -> SFT -> RFT -> eval -> report.

Run directory::

    config.yaml            the resolved configuration
    tokenizer/             the tokenizer (trained on the dataset's text when the LLM has none)
    <stage>/               Trainer / GRPO checkpoints of a stage, ``final/`` once it completed
    <stage>/final/         MedTVTModel.save_pretrained of the stage's result
    eval/<stage>.jsonl     generated reports of the test split
    history.json           loss / reward curves of every stage
    metrics.json           per stage: ce (precision, recall, f1, auc, per category), nlg; baseline
    report.md, *.png       tables and plots

``--resume`` skips completed stages and continues an interrupted one from its last checkpoint.
With a ``stage_store`` (used by ``medtvt ablate``), a completed stage is stored under a key of
everything it depends on, so variants whose earlier stages are identical reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RunConfig, dump_config, validate_plugins, write_config
from .errors import ConfigError

log = logging.getLogger("medtvt.run")

FINAL = "final"


def stage_key(cfg: RunConfig, stage: str, data_root: Path) -> str:
    """Hash of everything the result of ``stage`` depends on (the stages before it included)."""
    upto = cfg.stages[: cfg.stages.index(stage) + 1]
    dump = json.loads(cfg.model_dump_json())
    part: dict[str, Any] = {
        "seed": cfg.seed,
        "data": {**{k: v for k, v in dump["data"].items() if k not in ("cache_dir", "num_workers", "use_cache")},
                 "modality_options": cfg.modality_options_in_use},
        # A synthetic cohort is defined by data.synth (already in "data"), not by where it was written.
        "data_root": str(data_root.resolve()) if cfg.data.root is not None else None,
        "modalities": cfg.modalities,
        "encoders": {m: dump["encoders"][m] for m in cfg.modalities},
        "projector": dump["projector"],
        "llm": dump["llm"],
        "stages": upto,
        **{s: dump[s] for s in upto},
    }
    if uses_fusion(upto):
        part["fusion"] = dump["fusion"]  # PT runs without fusion: its result does not depend on it
    if "rft" in upto:
        part["rewards"] = dump["rewards"]
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def uses_fusion(stages: list[str] | tuple[str, ...]) -> bool:
    """Whether the result of these stages depends on the fusion layer (PT runs without it)."""
    return any(s != "pt" for s in stages)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


class SupervisedCollator:
    """Dataset items -> model inputs: the data collator, then the processor (answer-only labels)."""

    def __init__(self, data_collator: Callable[[list[Any]], dict[str, Any]], processor: Any, max_length: int):
        self.data_collator = data_collator
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        batch = self.data_collator(items)
        feats = self.processor.train_features(batch["prompts"], batch["answers"], self.max_length, ids=batch["ids"])
        keep = feats.pop("index", None)
        mask = batch["modality_mask"]
        inputs, features = batch["modality_inputs"], batch["modality_features"]
        if keep is not None and keep.numel() != len(batch["prompts"]):
            from .processing import subset_modalities

            names = batch["modality_names"]
            inputs = subset_modalities(mask, inputs, names, keep)
            features = subset_modalities(mask, features, names, keep)
            mask = mask[keep]
        return {**feats, "modality_mask": mask, "modality_inputs": inputs, "modality_features": features}


class Run:
    """One training + evaluation run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, stage_store: Path | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self.stage_store = stage_store
        self.progress = progress
        self.echo = echo
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.metrics: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def _check_run_dir(self) -> None:
        saved = self.out / "config.yaml"
        if saved.is_file():
            if not self.resume:
                raise ConfigError(f"run directory {self.out} already holds a run; pass --resume to continue it "
                                  f"or --out to start a new one")
            if saved.read_text() != dump_config(self.cfg):
                raise ConfigError(f"--resume: the configuration differs from {saved}; resume with the same "
                                  f"options (or start a new run with --out)")

    def setup(self, *, check_config: bool = True, encode: bool = True) -> None:
        from .data.cache import FeatureCache
        from .data.dataset import build_modalities, open_splits
        from .data.synth import ensure_synthetic
        from .modeling import MedTVTModel
        from .plugins import get_catalog

        cfg = self.cfg
        catalog = get_catalog()
        validate_plugins(cfg, catalog)
        if check_config:
            self._check_run_dir()
            self.out.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.out / "config.yaml")
        seed_everything(cfg.seed)

        t0 = time.perf_counter()
        if cfg.data.root is None:
            s = cfg.data.synth
            self.data_root = ensure_synthetic(self.out / "data", n_patients=s.n_patients, seed=s.seed,
                                              test_fraction=s.test_fraction)
        else:
            self.data_root = Path(cfg.data.root)
        self.timings["data"] = time.perf_counter() - t0

        self.modalities = build_modalities(cfg.modalities, cfg.modality_options_in_use, catalog)
        tok_dir = self.out / "tokenizer"
        corpus = self._corpus
        seed_everything(cfg.seed)
        self.model = MedTVTModel.from_config(cfg, catalog, corpus=corpus, tokenizer_dir=tok_dir)
        if not tok_dir.is_dir():
            self.model.tokenizer.save_pretrained(str(tok_dir))
        self.model.to(self._device())

        cache = None
        if cfg.data.use_cache:
            cache = FeatureCache(cfg.data.cache_dir or (self.out / "cache"))
        t0 = time.perf_counter()
        self.splits = open_splits(
            self.data_root, modalities=self.modalities, pt_files=cfg.data.pt_files if "pt" in cfg.stages else (),
            train_file=cfg.data.train_file, test_file=cfg.data.test_file, on_bad_sample=cfg.data.on_bad_sample,
            catalog=catalog, encoders=dict(self.model.encoders), cache=cache, seed=cfg.seed)
        if cache is not None and encode:
            from .data.cache import encode_dataset

            for name, ds in self.splits.items():
                encode_dataset(ds, batch_size=32, num_workers=cfg.data.num_workers)
        if cfg.projector.standardize_features:
            self._fit_feature_norms()
        self.timings["encode"] = time.perf_counter() - t0
        for name, ds in self.splits.items():
            if ds.skipped:
                self.echo(f"{name}: skipped {len(ds.skipped)} bad sample(s): {ds.skipped[0]}"
                          + (" ..." if len(ds.skipped) > 1 else ""))

    @torch.no_grad()
    def _fit_feature_norms(self) -> None:
        """Per-channel mean/std of every modality's frozen features over the training splits."""
        for m in self.cfg.modalities:
            self.model.feature_norms[m].fit(self._training_features(m))

    def _training_features(self, m: str):
        for split in ("pt", "train"):
            ds = self.splits.get(split)
            for i in range(len(ds) if ds is not None else 0):
                it = ds[i]
                if it is None or not it["present"].get(m):
                    continue
                f = it["features"].get(m)
                if f is None:  # not cached (random training crops): encode the sample
                    f = self.model.encoders[m].encode(it["inputs"][m].unsqueeze(0).to(self.model.device))[0].cpu()
                yield f

    def _corpus(self) -> list[str]:
        from .data.schema import read_qa_file

        texts: list[str] = []
        classes = list(type(m) for m in self.modalities.values())
        for f in [*self.cfg.data.pt_files, self.cfg.data.train_file]:
            path = self.data_root / f
            if path.is_file():
                recs = read_qa_file(path, classes, label=f)[0]
                texts += [t for r in recs for t in (r.question, r.answer)]
        return texts

    def _device(self) -> torch.device:
        dev = self.cfg.device
        if dev == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={dev!r} but no CUDA device is available; use device=cpu or auto")
        return torch.device(dev)

    # ------------------------------------------------------------------ stages
    def _stage_dir(self, stage: str) -> Path:
        if self.stage_store is not None:
            return self.stage_store / f"{stage}-{stage_key(self.cfg, stage, self.data_root)}"
        return self.out / stage

    def run_stage(self, stage: str) -> None:
        cfg = self.cfg
        sdir = self._stage_dir(stage)
        final = sdir / FINAL
        self.model.configure_trainable(stage, train_extras=getattr(cfg, stage).train_extras if stage != "rft"
                                       else cfg.sft.train_extras)
        if (final / "config.json").is_file():
            self.echo(f"[{stage}] completed earlier: loading {final}")
            self.load_stage_result(stage)
            hist = sdir / "history.json"
            if hist.is_file():
                self.history[stage] = json.loads(hist.read_text())
            return
        resume = self.resume or self.stage_store is not None
        self.echo(f"[{stage}] training: {len(self.model.trainable_parameter_names())} trainable tensors, "
                  f"{sum(p.numel() for p in self.model.trainable_parameters()):,} parameters")
        t0 = time.perf_counter()
        if stage in ("pt", "sft"):
            from .training.supervised import run_supervised

            scfg = getattr(cfg, stage)
            ds = self.splits["pt" if stage == "pt" else "train"]
            collator = SupervisedCollator(ds.collator(), self.model.processor, scfg.max_length)
            hist = run_supervised(self.model, ds, collator, scfg, sdir, seed=cfg.seed, device=cfg.device,
                                  num_workers=cfg.data.num_workers, resume=resume)
        else:
            hist = self._run_rft(sdir, resume)
        self.timings[stage] = time.perf_counter() - t0
        self.history[stage] = hist
        # Write the stage result atomically: a kill leaves no half-written final/.
        tmp = sdir / f".{FINAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        (sdir / "history.json").write_text(json.dumps(hist, default=float))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def load_stage_result(self, stage: str) -> None:
        """Load the completed result of ``stage`` into the model.  Before SFT the fusion takes no part:
        a PT result shared by ``medtvt ablate`` holds another variant's (untrained) fusion tensors, so
        this variant keeps its own."""
        upto = self.cfg.stages[: self.cfg.stages.index(stage) + 1]
        self.model.load_weights(self._stage_dir(stage) / FINAL, exclude=() if uses_fusion(upto) else ("fusion.",))

    def _run_rft(self, sdir: Path, resume: bool) -> list[dict[str, Any]]:
        from accelerate import Accelerator

        from .plugins import get_catalog
        from .training.grpo import GRPOLoop, MedTVTPolicy

        cfg = self.cfg
        rc = cfg.rft
        catalog = get_catalog()
        funcs = [catalog.rewards.get(r.name) for r in cfg.rewards]
        ds = self.splits["train"]
        policy = MedTVTPolicy(self.model, max_prompt_length=rc.max_prompt_length)
        accel = Accelerator(cpu=self._device().type == "cpu")
        loop = GRPOLoop(policy, funcs, ds, rc, reward_weights=[r.weight for r in cfg.rewards],
                        reward_names=[r.name for r in cfg.rewards], collate_fn=ds.collator(), seed=cfg.seed,
                        max_grad_norm=rc.max_grad_norm, min_lr=rc.min_lr, warmup_ratio=rc.warmup_ratio,
                        output_dir=sdir, accelerator=accel, callbacks=[self._rft_echo])
        # A stage that never reached its first checkpoint starts from the beginning.
        last = GRPOLoop.latest_checkpoint(sdir) if resume else None
        return loop.train(resume_from=last)

    def _rft_echo(self, event: str, loop: Any, logs: dict[str, Any] | None) -> None:
        if event == "log" and logs and self.progress:
            r = logs.get("reward", float("nan"))
            self.echo(f"[rft] step {logs.get('step')}/{loop.state.max_steps} reward {r:.3f} "
                      f"loss {logs.get('loss', float('nan')):.4f} kl {logs.get('kl', float('nan')):.4f}")

    # ------------------------------------------------------------------ eval
    def evaluate_stage(self, stage: str) -> dict[str, Any]:
        from .evaluation import evaluate_records, generate_reports, write_predictions

        ecfg = self.cfg.eval
        path = self.out / "eval" / f"{stage}.jsonl"
        t0 = time.perf_counter()
        records = generate_reports(self.model, self.splits["test"], batch_size=ecfg.batch_size,
                                   max_new_tokens=ecfg.max_new_tokens, do_sample=ecfg.do_sample, limit=ecfg.limit,
                                   progress=self.progress)
        write_predictions(records, path)
        train_answers = [r.answer for r in self.splits["train"].records]
        res = evaluate_records(records, ecfg, train_answers=train_answers)
        res["reward"] = self._mean_rewards(records)
        self.timings[f"eval_{stage}"] = time.perf_counter() - t0
        return res

    def _mean_rewards(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Mean of each configured reward on the test split's greedy reports."""
        from .plugins import get_catalog

        cat = get_catalog()
        prompts = [r["prompt"] for r in records]
        comps = [r["prediction"] for r in records]
        refs = [r["reference"] for r in records]
        out: dict[str, float] = {}
        total = 0.0
        for rr in self.cfg.rewards:
            vals = [v for v in cat.rewards.get(rr.name)(prompts=prompts, completions=comps, answer=refs) if v is not None]
            out[rr.name] = sum(vals) / max(len(vals), 1)
            total += rr.weight * out[rr.name]
        out["total"] = total
        return out

    # ------------------------------------------------------------------ main
    def execute(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        self.setup()
        for stage in self.cfg.stages:
            self.run_stage(stage)
            if self.cfg.evaluate:
                self.echo(f"[{stage}] evaluating on {len(self.splits['test'])} test records")
                self.metrics[stage] = self.evaluate_stage(stage)
                ce = self.metrics[stage]["ce"]
                self.echo(f"[{stage}] F1 {ce['f1']:.4f} precision {ce['precision']:.4f} recall {ce['recall']:.4f} "
                          f"AUC {ce['auc'] if ce['auc'] is None else round(ce['auc'], 4)}")
        self.timings["total"] = time.perf_counter() - t_start
        self.finish()
        return self.metrics

    def finish(self) -> None:
        from .report import write_report

        summary = {"seed": self.cfg.seed, "stages": self.metrics, "timings_s": self.timings}
        base = next((m["baseline"] for m in self.metrics.values() if "baseline" in m), None)
        if base is not None:
            summary["baseline"] = base
        (self.out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
        (self.out / "history.json").write_text(json.dumps(self.history, default=float))
        write_report(self.out, self.cfg, summary, self.history)
        self.echo(f"done: {self.out / 'metrics.json'}, {self.out / 'report.md'}")


def run(cfg: RunConfig, **kwargs: Any) -> dict[str, Any]:
    return Run(cfg, **kwargs).execute()
