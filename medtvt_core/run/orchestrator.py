"""The orchestrator: one :class:`RunConfig` -> data -> model -> PT -> SFT -> RFT -> eval -> report.

Run directory::

    config.yaml            the resolved configuration
    environment.json       package versions, plugin distributions, threads, device, determinism
    <stage>/checkpoint-N/  Trainer checkpoints of a stage (each a complete saved model)
    <stage>/final/         the stage's model: MedTVTForConditionalGeneration + MedTVTProcessor,
                           loadable with AutoModel.from_pretrained, nothing else needed
    eval/<stage>.jsonl     generated reports of the test split
    history.json           loss / reward curves of every stage
    metrics.json           per stage: clinical efficacy, NLG metrics, rewards; the baseline; world_size;
                           every plugin used, with its distribution and version
    report.md, *.png       tables and plots

``--resume`` skips completed stages (the model continues from the last completed ``final/``) and
continues an interrupted one from its last checkpoint.  With a ``stage_store`` (``medtvt
ablate``), a completed stage is stored under a key of everything it depends on, so variants
whose earlier stages are identical reuse it.  With several processes (``torchrun``,
``accelerate launch``) only the main process writes; the others wait at a barrier and read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from ..build import build_readers, required_weights, validate_run
from ..config import RunConfig, dump_config, write_config
from ..data.cache import FeatureCache, encode_dataset
from ..data.dataset import holdout, open_splits
from ..data.schema import read_qa_file
from ..data.synth import ensure_synthetic
from ..errors import ConfigError
from ..io import atomic_dir, write_json
from ..metrics.display import ce_line
from ..model.factory import new_model
from ..model.modeling import MedTVTForConditionalGeneration
from ..model.processing import MedTVTProcessor
from ..model.serialization import is_saved_model
from ..model.stages import configure_trainable
from ..plugin_calls import plugins_in_use
from ..plugins import get_catalog
from ..training.arguments import resolve_device
from ..training.grpo import check_rft_layout, run_grpo
from ..training.supervised import SupervisedCollator, run_supervised
from .attribution import dataset_attribution, gate_check
from .environment import set_deterministic, write_environment
from .evaluation import evaluate_model
from .layout import FINAL
from .report import write_report
from .subsets import subsets_of_config
from .validation import best_dirs, carve_validation, keep_best, make_callback, run_summary

log = logging.getLogger("medtvt.run")


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
        "prompt": dump["prompt"],
        "stages": upto,
        # modality dropout off leaves the key as it was before the field existed (stored stages stay valid)
        **{s: {k: v for k, v in dump[s].items() if k != "modality_dropout" or v} for s in upto},
    }
    if uses_fusion(upto):
        part["fusion"] = dump["fusion"]  # PT runs without fusion: its result does not depend on it
    if "rft" in upto:
        part["rewards"] = dump["rewards"]
    if any(getattr(cfg, s).eval_steps for s in cfg.stages):
        # the records a split carves leave every stage's data (source, fraction; data.val_file is in "data");
        # what a validation computes matters to the stages that validate (the kept step is chosen from it)
        v = dump["validation"]
        validating = any(getattr(cfg, s).eval_steps for s in upto)
        part["validation"] = {**(v if validating else {"source": v["source"], "fraction": v["fraction"]}),
                              **{s: dump[s]["metric_for_best_model"] for s in upto}}
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def uses_fusion(stages: list[str] | tuple[str, ...]) -> bool:
    """Whether the result of these stages depends on the fusion layer (PT runs without it)."""
    return any(s != "pt" for s in stages)


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


class Run:
    """One training + evaluation run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, stage_store: Path | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print, validated: bool = False):
        from accelerate import PartialState

        self.cfg = cfg
        self.validated = validated
        self.out = Path(cfg.output_dir)
        self.resume = resume
        self.stage_store = stage_store
        self.progress = progress
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.metrics: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        # Under torchrun / accelerate launch this joins the process group (gloo on CPU).
        self.dist = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
        self.is_main = self.dist.is_main_process
        self.echo = echo if self.is_main else (lambda s: None)
        self.model: Any = None
        self.processor: Any = None
        self.holdout_ids: set[str] = set()

    def barrier(self) -> None:
        self.dist.wait_for_everyone()

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

    def setup(self) -> None:
        """Data, readers and splits; the model is made (or loaded) by :meth:`execute`."""
        cfg = self.cfg
        catalog = get_catalog()
        if not self.validated:  # the caller may have checked it already (an ablation checks every variant first)
            validate_run(cfg, catalog)
        if cfg.weights_required:
            required_weights(cfg, catalog)
        self._check_run_dir()
        self.barrier()  # every process checks the directory before the main one writes config.yaml into it
        set_deterministic(cfg.deterministic)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.out / "config.yaml")
            write_environment(self.out / "environment.json", cfg, catalog, world_size=self.dist.num_processes)
        t0 = time.perf_counter()
        if cfg.data.root is None:
            s = cfg.data.synth
            if self.is_main:
                ensure_synthetic(self.out / "data", **s.generator_options())
            self.barrier()
            self.data_root = self.out / "data"
        else:
            self.data_root = Path(cfg.data.root)
        self.timings["data"] = time.perf_counter() - t0
        seed_everything(cfg.seed)
        self.readers = build_readers(cfg.modalities, cfg.modality_options_in_use, catalog)
        v = cfg.validation
        validating = any(getattr(cfg, s).eval_steps for s in cfg.stages)
        if validating and v.source == "file" and not (self.data_root / cfg.data.val_file).is_file():
            stage = next(s for s in cfg.stages if getattr(cfg, s).eval_steps)
            hint = (" (the synthetic cohort writes it with data.synth.val_patients > 0)"
                    if cfg.data.root is None and not cfg.data.synth.val_patients else "")
            raise ConfigError(f"data.val_file {cfg.data.val_file!r} (validation.source=file) does not exist under "
                              f"{self.data_root}{hint}; give the data set's validation QA file, carve a split from the "
                              f"training records (validation.source=train, validation.fraction=0.1) or set "
                              f"{stage}.eval_steps=0")
        self.splits = open_splits(
            self.data_root, modalities=self.readers, pt_files=cfg.data.pt_files if "pt" in cfg.stages else (),
            train_file=cfg.data.train_file, test_file=cfg.data.test_file,
            val_file=cfg.data.val_file if validating and v.source == "file" else None,
            on_bad_sample=cfg.data.on_bad_sample, catalog=catalog, seed=cfg.seed, persist_stats=self.is_main)
        if "val" in self.splits:  # a validation record that a stage trains or is tested on measures nothing
            val_ids = {r.id for r in self.splits["val"].records if r.id is not None}
            for name, field in (("train", "data.train_file"), ("test", "data.test_file")):
                shared = sorted(val_ids & {r.id for r in self.splits[name].records}) if name in self.splits else []
                if shared:
                    raise ConfigError(f"data.val_file {cfg.data.val_file!r} shares {len(shared)} record id(s) with "
                                      f"{field} ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}); "
                                      f"the validation split must hold records of its own")
        carve = bool(validating and v.source != "file" and v.fraction and "train" in self.splits)
        if carve and v.source == "train":
            self._carve_validation(self.splits["train"].records)
        if cfg.data.rft_holdout and "train" in self.splits:
            sft_recs, rft_recs = holdout(self.splits["train"].records, cfg.data.rft_holdout)
            if not sft_recs or not rft_recs:
                raise ConfigError(f"data.rft_holdout={cfg.data.rft_holdout} leaves {len(sft_recs)} SFT and "
                                  f"{len(rft_recs)} RFT record(s); both need some")
            if carve and v.source == "rft_prompts":
                rft_recs = self._carve_validation(rft_recs)
            self.holdout_ids = {r.id for r in rft_recs}
        if "rft" in cfg.stages:  # a layout the processes cannot share fails now, not after PT and SFT
            check_rft_layout(cfg.rft, world_size=self.dist.num_processes,
                             n_prompts=len(self.stage_split("rft")))
        self.barrier()

    def _carve_validation(self, pool: list[Any]) -> list[Any]:
        """Moves ``validation.fraction`` of ``pool`` (training records) to ``splits["val"]``; returns the
        rest of ``pool``."""
        fraction = self.cfg.validation.fraction
        rest, val = carve_validation(pool, fraction, self.cfg.seed)
        if not val or not rest:
            raise ConfigError(f"validation.fraction={fraction} (validation.source={self.cfg.validation.source}) "
                              f"splits the {len(pool)} records it is carved from into {len(rest)} for training and "
                              f"{len(val)} for validation; both need some")
        ids = {r.id for r in val}
        self.splits["val"] = self.splits["train"].subset(val)
        self.splits["train"] = self.splits["train"].subset([r for r in self.splits["train"].records if r.id not in ids])
        return rest

    def stage_split(self, stage: str) -> Any:
        """The training records of ``stage``: PT's files; the disease-level split for SFT and RFT, less
        (SFT) or only (RFT) the records ``data.rft_holdout`` keeps for RFT."""
        ds = self.splits["pt"] if stage == "pt" else self.splits["train"]
        if stage != "pt" and self.holdout_ids:
            ds = ds.subset([r for r in ds.records if (r.id in self.holdout_ids) == (stage == "rft")])
        drop = getattr(self.cfg, stage).modality_dropout
        # Modality dropout presents a dropped modality exactly as an absent one (docs/partial_patients.md).
        return ds.masked(dropout=drop, salt=stage) if any(drop.values()) else ds

    def _attach_cache(self) -> None:
        """Frozen features: encoded once by the main process (the others wait, then read)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.data.use_cache:
            cache = FeatureCache(cfg.data.cache_dir or (self.out / "cache"))
            ids = {m: e.identity() for m, e in self.model.encoders.items()}
            failed: dict[str, list[tuple[str, str]]] = {}
            for name, ds in self.splits.items():
                ds.attach_cache(dict(self.model.encoders), cache, encoder_ids=ids)
                if self.is_main:
                    rep = encode_dataset(ds, batch_size=32, num_workers=cfg.data.num_workers)
                    failed[name] = [(m, ref, msg) for m, r in rep.items() for ref, msg in r["failed"]]
            failed = self._broadcast(failed)
            if not self.is_main:  # drop what the main process could not read, so every rank holds the same records
                for name, ds in self.splits.items():
                    for m, ref, msg in failed.get(name, []):
                        ds.drop_reference(m, ref, msg)
        self.timings["encode"] = time.perf_counter() - t0
        for name, ds in self.splits.items():
            if ds.skipped:
                self.echo(f"{name}: skipped {len(ds.skipped)} bad sample(s): {ds.skipped[0]}"
                          + (" ..." if len(ds.skipped) > 1 else ""))

    def _broadcast(self, obj: Any) -> Any:
        if self.dist.num_processes == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    # ------------------------------------------------------------------ model
    def _stage_dir(self, stage: str) -> Path:
        if self.stage_store is not None:
            return self.stage_store / f"{stage}-{stage_key(self.cfg, stage, self.data_root)}"
        return self.out / stage

    def completed(self, stage: str) -> bool:
        return is_saved_model(self._stage_dir(stage) / FINAL)

    def _corpus(self) -> list[str]:
        texts: list[str] = []
        classes = [type(m) for m in self.readers.values()]
        for f in [*self.cfg.data.pt_files, self.cfg.data.train_file]:
            path = self.data_root / f
            if path.is_file():
                recs = read_qa_file(path, classes, label=f)[0]
                texts += [t for r in recs for t in (r.question, r.answer)]
        return texts

    def _default_question(self) -> str | None:
        qs = Counter(r.question for r in self.splits["train"].records) if "train" in self.splits else Counter()
        return qs.most_common(1)[0][0] if qs else None

    def new_model(self) -> None:
        """A fresh model (tokenizer trained or read, base prepared), the cache, feature statistics."""
        seed_everything(self.cfg.seed)
        self.model, self.processor = new_model(self.cfg, get_catalog(), corpus=self._corpus,
                                               default_question=self._default_question(), readers=self.readers)
        self.model.to(resolve_device(self.cfg.device))
        self._attach_cache()
        if self.cfg.projector.standardize_features:
            self._fit_feature_norms()

    def load_stage(self, stage: str) -> None:
        """The model of a completed stage (its ``final/``), with this run's readers."""
        final = self._stage_dir(stage) / FINAL
        self.model = MedTVTForConditionalGeneration.from_pretrained(final, catalog=get_catalog())
        self.processor = MedTVTProcessor.from_pretrained(final, catalog=get_catalog())
        self.processor.readers = dict(self.readers)
        self.model.to(resolve_device(self.cfg.device))
        self._attach_cache()

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

    # ------------------------------------------------------------------ stages
    def run_stage(self, stage: str) -> None:
        cfg = self.cfg
        sdir = self._stage_dir(stage)
        if stage != "pt" and self.model.config.stage in (None, "pt") and self.model.config.fusion != cfg.fusion.model_dump():
            # A PT stage shared with another variant (`medtvt ablate`) carries that variant's unused
            # fusion layer: this variant's own starts here, from the same seed as a fresh model's.
            self.model.replace_fusion(cfg.fusion.model_dump(), cfg.seed)
        extras = getattr(cfg, stage).train_extras if stage != "rft" else cfg.sft.train_extras
        drop = {m: p for m, p in getattr(cfg, stage).modality_dropout.items() if p > 0}
        if drop:  # saved with the model: `medtvt diagnose` says when a model never saw a missing modality
            self.model.config.modality_dropout = {**self.model.config.modality_dropout, stage: drop}
        callbacks = self._validation_callbacks(stage, sdir)
        names = configure_trainable(self.model, stage, train_extras=extras)
        resume = self.resume or self.stage_store is not None
        n_params = sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad)
        self.echo(f"[{stage}] training: {len(names)} trainable tensors, {n_params:,} parameters")
        t0 = time.perf_counter()
        if stage in ("pt", "sft"):
            scfg = getattr(cfg, stage)
            ds = self.stage_split(stage)
            collator = SupervisedCollator(ds.collator(), self.processor, scfg.max_length)
            hist = run_supervised(self.model, ds, collator, scfg, sdir, seed=cfg.seed, device=cfg.device,
                                  num_workers=cfg.data.num_workers, resume=resume, processor=self.processor,
                                  progress=self.progress, callbacks=callbacks)
        else:
            hist = self._run_rft(sdir, resume, callbacks)
        self.timings[stage] = time.perf_counter() - t0
        self.history[stage] = hist
        self._keep_best(stage, sdir, hist)
        if self.is_main:  # the stage result, written atomically: a kill leaves no half-written final/
            with atomic_dir(sdir / FINAL) as tmp:
                self.model.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
                write_json(sdir / "history.json", hist)
            for p in best_dirs(sdir).values():  # final/ holds the chosen one now
                shutil.rmtree(p, ignore_errors=True)
        self.barrier()

    def _validation_callbacks(self, stage: str, sdir: Path) -> list[Any]:
        return make_callback(self, stage, sdir)

    def _keep_best(self, stage: str, sdir: Path, hist: list[dict[str, Any]]) -> None:
        keep_best(self, stage, sdir, hist)

    def _run_rft(self, sdir: Path, resume: bool, callbacks: list[Any] = ()) -> list[dict[str, Any]]:
        cfg = self.cfg
        catalog = get_catalog()
        funcs = [catalog.rewards.get(r.name) for r in cfg.rewards]
        return run_grpo(self.model, self.processor, self.stage_split("rft"), cfg.rft, funcs,
                        reward_names=[r.name for r in cfg.rewards], reward_weights=[r.weight for r in cfg.rewards],
                        output_dir=sdir, seed=cfg.seed, device=cfg.device, resume=resume, progress=self.progress,
                        on_log=self._rft_echo, callbacks=callbacks)

    def _rft_echo(self, logs: dict[str, Any]) -> None:
        if "reward" in logs:
            def num(k: str) -> str:  # a value this log entry does not hold reads n/a, not nan
                return f"{logs[k]:.4f}" if isinstance(logs.get(k), (int, float)) else "n/a"

            self.echo(f"[rft] step {logs.get('step')} reward {logs['reward']:.3f} loss {num('loss')} kl {num('kl')}")

    # ------------------------------------------------------------------ eval
    def evaluate_stage(self, stage: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        train = self.splits.get("train")
        records: list[dict[str, Any]] = []
        res = evaluate_model(self.model, self.processor, self.splits["test"], self.cfg.eval,
                             rewards=self.cfg.rewards, train_answers=[r.answer for r in train.records] if train else (),
                             predictions_path=self.out / "eval" / f"{stage}.jsonl" if self.is_main else None,
                             progress=self.progress, sampling=self.cfg.rft, seed=self.cfg.seed, records_out=records)
        last = stage == self.cfg.stages[-1]
        if self.cfg.eval.attribution and last and len(self.model.modalities) > 1:
            e = self.cfg.eval
            test = self.splits["test"]
            if e.modalities is not None:
                test = test.masked(withheld=[m for m in test.modality_names if m not in e.modalities])
            res["attribution"] = dataset_attribution(self.model, self.processor, test,
                                                     batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                                     limit=e.limit, constrain=e.constrained_decoding)
            res["gate_check"] = gate_check(res.get("modality_weights") or {}, res["attribution"])
        if last and self.cfg.eval.modality_subsets:
            res["subsets"] = subsets_of_config(self.model, self.processor, self.splits["test"], self.cfg,
                                               full_records=records, data_root=self.data_root, progress=self.progress)
        self.timings[f"eval_{stage}"] = time.perf_counter() - t0
        return res

    # ------------------------------------------------------------------ main
    def execute(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        self.setup()
        stages = list(self.cfg.stages)
        # The first stage without a result; every stage before it must be complete.
        first = next((i for i, s in enumerate(stages) if not self.completed(s)), len(stages))
        for i, stage in enumerate(stages):
            if i < first:
                self.echo(f"[{stage}] completed earlier: {self._stage_dir(stage) / FINAL}")
                hist = self._stage_dir(stage) / "history.json"
                if hist.is_file():
                    self.history[stage] = json.loads(hist.read_text())
                if self.cfg.evaluate or i == first - 1:
                    self.load_stage(stage)
            else:
                if self.model is None:
                    self.new_model()
                self.run_stage(stage)
            if self.cfg.evaluate:
                self.echo(f"[{stage}] evaluating on {len(self.splits['test'])} test records")
                self.metrics[stage] = self.evaluate_stage(stage)
                self.echo(f"[{stage}] {ce_line(self.metrics[stage]['ce'], self.metrics[stage].get('protocol'))}")
        self.timings["total"] = time.perf_counter() - t_start
        self.finish()
        return self.metrics

    def finish(self) -> None:
        summary = {"seed": self.cfg.seed, "world_size": self.dist.num_processes, "stages": self.metrics,
                   "timings_s": self.timings, "plugins": plugins_in_use(self.cfg)}
        if self.stage_store is not None:  # ablate / --seeds: the models live in the shared store
            summary["models"] = {s: str((self._stage_dir(s) / FINAL).resolve()) for s in self.cfg.stages}
        base = next((m["baseline"] for m in self.metrics.values() if "baseline" in m), None)
        if base is not None:
            summary["baseline"] = base
        val = run_summary(self)
        if val:
            summary["validation"] = val
        if self.is_main:
            write_json(self.out / "metrics.json", summary)
            write_json(self.out / "history.json", self.history)
            write_report(self.out, self.cfg, summary, self.history)
            self.echo(f"done: {self.out / 'metrics.json'}, {self.out / 'report.md'}")
        self.barrier()


def run(cfg: RunConfig, **kwargs: Any) -> dict[str, Any]:
    return Run(cfg, **kwargs).execute()
