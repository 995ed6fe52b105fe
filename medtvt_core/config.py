"""Run configuration: one pydantic :class:`RunConfig`, presets, file loading, overrides.

Plugins never read a ``RunConfig``: :mod:`medtvt_core.build` turns it into objects, checking
plugin options (``encoders.<modality>.options``, ``fusion.options``, ``llm.options``,
``data.modality_options``) against each plugin's own config model.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.synth.options import SynthConfig
from .errors import ConfigError
from .io import atomic_write_text

STAGES = ("pt", "sft", "rft")
# Validation metrics a stage can keep its best step by (higher is better for each).
BEST_METRICS = ("val_f1", "val_reward", "val_reward_sampled", "val_answer_rate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PluginRef(_Strict):
    """A plugin by registry name plus its options (validated by the plugin's config model).

    A config file, ``--set X.name=`` or an ablation grid that names another plugin drops the earlier
    layer's options (they belong to the old plugin); for the same plugin, options merge key by key."""

    name: str = Field(description="registry name of the plugin")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the plugin")


class DataConfig(_Strict):
    root: Path | None = Field(None, description="dataset root; None: synthesise the embedded cohort into <out>/data")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    pt_files: list[str] = Field(default_factory=lambda: ["qa/pt_ecg.json", "qa/pt_cxr.json", "qa/pt_lab.json"],
                                description="physiological QA files (relative to root) for PT")
    train_file: str = Field("qa/disease_train.json", description="disease-level QA for SFT/RFT")
    test_file: str = Field("qa/disease_test.json", description="disease-level QA for evaluation")
    val_file: str | None = Field(None, description="disease-level QA of a validation split no stage trains on, used "
                                                   "by validation.source=file (the synthetic cohort writes "
                                                   "qa/disease_val.json with data.synth.val_patients)")
    rft_holdout: float = Field(
        0.0, ge=0, lt=1, description="share of the disease-level training records kept out of SFT and used as "
                                     "RFT's prompts (0: SFT and RFT both use every record, as the reference)")
    on_bad_sample: Literal["skip", "fail"] = Field("fail", description="what a bad record does: skip (counted, logged) or fail")
    cache_dir: Path | None = Field(None, description="feature cache; None: <out>/cache")
    use_cache: bool = Field(True, description="cache frozen-encoder features across epochs and stages")
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    modality_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="reader options per modality name; like `encoders`, entries of registered modalities that "
                    "`modalities` leaves out are validated and kept, so an ablation keeps the preset's options")


class ProjectorConfig(_Strict):
    tokens_per_modality: int = Field(1, ge=1, le=64, description="K tokens per modality (1 as in the paper)")
    blocks: int = Field(3, ge=0, le=12, description="residual SwiGLU blocks after the input linear")
    standardize_features: bool = Field(
        False, description="standardise each frozen feature channel with training-split mean/std before the "
                           "pooling head (not in the reference; helps randomly initialised demo encoders)")
    normalize_input: bool | list[str] = Field(
        False, description="modalities whose pooled feature is L2-normalised (F.normalize) before its projector; "
                           "true: all, false: none. The reference: [cxr, lab] (its ECG features are normalised per "
                           "step inside ecgfm-ked's head, option normalize_steps; docs/method.md, 'Encoders')")


class PromptConfig(_Strict):
    format: Literal["chat", "reference"] = Field(
        "chat", description="reference: BOS + question, then ' ' + answer + answer_end_token (the reference code); "
                            "chat: the tokenizer's chat template (a plain 'User:/Assistant:' one without a template)")
    answer_end_token: str | None = Field(
        None, description="token that ends an answer and generation (None: the tokenizer's EOS; the reference "
                          "uses <|end_of_text|>)")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="fixed variables for the chat template; LLaMA-3's date_string is "
                                          "pinned by default, so a prompt never holds today's date")


_DROPOUT_DOC = ("modality dropout: per training sample, each modality m it has is left out with probability "
                "modality_dropout[m], exactly as an absent modality (masked, placeholder replaced by "
                "'(<m> not available)'), at least one kept (docs/partial_patients.md); {} = off, as the reference")


def _check_dropout(v: dict[str, float]) -> dict[str, float]:
    for m, p in v.items():
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"modality_dropout.{m}: {p} is not a probability in [0, 1)")
    return {m: float(p) for m, p in v.items()}


class _TrainingStage(_Strict):
    """What every training stage has besides its optimisation settings: modality dropout and validation."""

    modality_dropout: dict[str, float] = Field(
        default_factory=dict, description=_DROPOUT_DOC + " (RFT: one draw per prompt, shared by its G completions)")
    eval_steps: int = Field(0, ge=0, description="validate every N optimiser steps on the `validation` split "
                                                 "(and at step 0 and the last step; 0: off)")
    metric_for_best_model: str | None = Field(
        None, description="keep the validation step with the highest value of this metric (val_f1, val_reward, "
                          "val_reward_sampled, val_answer_rate) as <stage>/final, the last as <stage>/last; None: "
                          "final is the last step")

    @field_validator("modality_dropout")
    @classmethod
    def _dropout(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_dropout(v)


class StageConfig(_TrainingStage):
    epochs: float = Field(20, gt=0, description="training epochs")
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: epochs decide)")
    batch_size: int = Field(8, ge=1, description="per-device batch size")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-6, ge=0, description="final learning rate of the cosine schedule")
    weight_decay: float = Field(0.05, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2 (the reference: 0.95)")
    max_length: int = Field(600, ge=16, description="max tokens of prompt + answer")
    train_extras: bool = Field(True, description="also train LLM norms, biases and token embeddings (reference)")
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0: each epoch)")


class RFTConfig(_TrainingStage):
    max_steps: int = Field(500, ge=1, description="optimiser steps (TRL's max_steps; one generation round feeds num_iterations of them)")
    batch_size: int = Field(8, ge=1, description="prompts per process per micro-step (rows: x num_generations)")
    grad_accum: int = Field(2, ge=1)
    num_generations: int = Field(8, ge=2, description="G completions per prompt")
    lr: float = Field(1e-5, gt=0)
    min_lr: float = Field(0.0, ge=0, description="final learning rate of the cosine schedule")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (None: off)")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    sampling_mode: Literal["eval", "train"] = Field(
        "eval", description="model mode while sampling rollouts: eval (no dropout, as the reference) or train "
                            "(dropout on, as TRL's GRPOTrainer)")
    scale_logits_by_temperature: bool = Field(
        True, description="score completions with logits / temperature, as TRL does (the reference: raw logits)")
    beta: float = Field(0.04, ge=0, description="KL coefficient to the frozen SFT reference (TRL 1.16: 0.0)")
    epsilon: float = Field(0.2, gt=0, description="PPO clip range (lower)")
    epsilon_high: float | None = Field(None, description="upper clip range (DAPO); None: epsilon. With cispo: the "
                                                          "maximum importance ratio (TRL recommends 5.0; required)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = Field(
        "dapo", description="TRL 1.16's loss (default: dapo): grpo/bnpo/dr_grpo/dapo clip the ratio (PPO) and differ in "
                            "aggregation; cispo (MiniMax-M1) weights REINFORCE by the ratio capped at epsilon_high, "
                            "detached; sapo replaces clipping by a sigmoid gate (sapo_temperature_*)")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="importance ratio per token (TRL's default) or one per completion, the mean log-ratio "
                             "(sequence: GSPO, whose paper uses loss_type grpo and epsilon 3e-4 / epsilon_high 4e-4)")
    sapo_temperature_pos: float = Field(1.0, gt=0, description="sapo: gate temperature for tokens with advantage > 0 (TRL: 1.0)")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="sapo: gate temperature for tokens with advantage <= 0 (TRL: 1.05)")
    use_bias_correction_kl: bool = Field(
        True, description="multiply the k3 KL term by the importance ratio, as TRL 1.16 does by default")
    scale_rewards: bool | Literal["group", "batch", "none"] = Field(
        "group", description="advantage scaling as in TRL: group std, batch std or none (True = group)")
    num_iterations: int = Field(1, ge=1, description="optimisation passes per generation batch (mu)")
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_prompt_length: int = Field(256, ge=8)
    max_completion_length: int = Field(600, ge=1)
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _cispo_needs_cap(self) -> "RFTConfig":
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ValueError("loss_type cispo needs rft.epsilon_high (its maximum importance ratio; TRL recommends "
                             "5.0): unset, TRL would cap every ratio at epsilon=0.2")
        return self


class ValidationConfig(_Strict):
    """The validation split and what a validation computes (used when a stage sets ``eval_steps``)."""

    fraction: float = Field(0.0, ge=0, lt=1, description="share of the disease-level training records carved out as "
                                                          "the validation split (by a hash of seed and record id; "
                                                          "no stage trains on them); needed by eval_steps with the sources "
                                                          "train and rft_prompts")
    source: Literal["train", "rft_prompts", "file"] = Field(
        "train", description="where the split comes from: train (validation.fraction of every disease-level training "
                             "record, before data.rft_holdout divides the rest), rft_prompts (validation.fraction of "
                             "the records data.rft_holdout keeps for RFT, so SFT trains on exactly the records it "
                             "would without validation) or file (data.val_file, whole: no stage loses a record; "
                             "fraction must be 0)")
    samples: int = Field(2, ge=0, description="sampled completions per validation record (at rft.temperature / "
                                              "top_p) for val_reward_sampled; 0: off")
    max_new_tokens: int | None = Field(None, ge=1, description="generation length (None: eval.max_new_tokens)")
    batch_size: int | None = Field(None, ge=1, description="generation batch (None: eval.batch_size)")
    alarm_metric: str = Field("f1", description="held-out per-record metric the reward-hacking alarm watches: f1, "
                                                "answer_rate, reward or reward/<name> (greedy reports), "
                                                "reward_sampled (mean weighted reward of the sampled ones)")
    alarm_window: int = Field(3, ge=3, description="the alarm compares the first and the last of the last K validations")
    confidence_level: float = Field(0.95, gt=0, lt=1, description="of the paired bootstrap CI of the metric's change")
    n_resamples: int = Field(2000, ge=100, description="bootstrap resamples")


class RewardRef(_Strict):
    name: str
    weight: float = 1.0


class EvalConfig(_Strict):
    max_new_tokens: int = Field(600, ge=1)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1, description="evaluate only the first N test records")
    do_sample: bool = Field(False, description="greedy decoding by default")
    constrained_decoding: bool = Field(
        False, description="decode every evaluated report under the report grammar, as `medtvt diagnose` does "
                           "(model.generation.REPORT_GRAMMAR): reports are then well-formed unless they run out of "
                           "max_new_tokens, and the format reward no longer measures the model's own format; off: "
                           "the model as it writes (docs/partial_patients.md)")
    # Literal: an unknown metric is refused with the config, not after training (as metrics.NLG_METRICS)
    metrics: list[Literal["bleu", "rouge", "meteor", "bertscore"]] = Field(
        default_factory=lambda: ["bleu", "rouge", "meteor", "bertscore"])
    protocols: list[Literal["strict", "reference"]] = Field(
        default_factory=lambda: ["strict", "reference"], min_length=1,
        description="evaluation protocols, the first is the primary one: strict (a missing answer is an empty set, "
                    "AUC averaged over categories, corpus BLEU, ROUGE-L F) or reference (the reference code's "
                    "evaluate.py: samples with both answers only, pooled AUC, sentence BLEU, ROUGE-L recall; "
                    "comparable with the paper's tables)")
    sampled_reward_samples: int = Field(
        8, ge=0, description="also score this many sampled reports per test record at rft.temperature / top_p "
                             "(the expected reward GRPO maximises; 0: off)")
    attribution: bool = Field(True, description="for the last stage: per disease, how often its report names it with "
                                                "every modality and with each one masked (re-generation)")
    wordnet_dir: Path | None = Field(None, description="NLTK data dir with corpora/wordnet (METEOR)")
    bertscore_model: Path | None = Field(None, description="local checkpoint for BERTScore (e.g. roberta-large)")
    bertscore_layers: int | None = Field(None, ge=1)
    modalities: list[str] | None = Field(
        None, description="evaluate with only these modalities given (the others masked as absent, as `medtvt "
                          "diagnose` does); None: every modality of the run; 'ecg+lab' or 'ecg,lab' also accepted")
    modality_subsets: list[str] | None = Field(
        None, description="also evaluate the last stage on each subset of modalities and tabulate it against all "
                          "of them (report.md, metrics.json `subsets`): 'all-singles', 'all-pairs', or a list such "
                          "as [ecg+lab, cxr]; None: off")
    evidence: dict[str, list[str]] | None = Field(
        None, description="disease -> modalities carrying its evidence, for the per-disease rows of the subset "
                          "table; None: the dataset manifest's `evidence` table (the synthetic cohort has one)")

    @field_validator("modalities", mode="before")
    @classmethod
    def _eval_modalities(cls, v: Any) -> Any:
        if isinstance(v, str):  # "ecg+lab", "ecg,lab" (a grid value or --set); "all": every modality
            return None if v.strip() in ("all", "") else [s.strip() for s in v.replace("+", ",").split(",") if s.strip()]
        return v

    @field_validator("modality_subsets", mode="before")
    @classmethod
    def _subsets(cls, v: Any) -> Any:
        if isinstance(v, str):  # "all-singles", or "ecg+lab,cxr"
            return [s.strip() for s in v.split(",") if s.strip()] or None
        return v


def _default_encoders() -> dict[str, PluginRef]:
    return {
        "ecg": PluginRef(name="ecgfm-ked"),
        "cxr": PluginRef(name="vit"),
        "lab": PluginRef(name="symile"),
    }


class RunConfig(_Strict):
    """Everything a run needs; written to ``<output_dir>/config.yaml``."""

    preset: str | None = Field(None, description="preset this config started from")
    seed: int = Field(0)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    output_dir: Path = Field(Path("runs/demo"))
    stages: list[Literal["pt", "sft", "rft"]] = Field(default_factory=lambda: list(STAGES))
    evaluate: bool = Field(True, description="evaluate after the last stage")
    data: DataConfig = Field(default_factory=DataConfig)
    modalities: list[str] = Field(default_factory=lambda: ["ecg", "cxr", "lab"])
    encoders: dict[str, PluginRef] = Field(default_factory=_default_encoders)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    fusion: PluginRef = Field(default_factory=lambda: PluginRef(name="mpl"))
    llm: PluginRef = Field(default_factory=lambda: PluginRef(name="llama-lora"))
    pt: StageConfig = Field(default_factory=StageConfig)
    sft: StageConfig = Field(default_factory=StageConfig)
    rft: RFTConfig = Field(default_factory=RFTConfig)
    rewards: list[RewardRef] = Field(default_factory=lambda: [RewardRef(name="format"), RewardRef(name="jaccard")])
    eval: EvalConfig = Field(default_factory=EvalConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    deterministic: bool = Field(False, description="torch deterministic algorithms (slower; recorded in environment.json)")
    weights_required: bool = Field(
        False, description="refuse to start when an encoder or the LLM would get random instead of pretrained "
                           "weights (the paper preset; --random-weights turns it off)")

    @property
    def modality_options_in_use(self) -> dict[str, dict[str, Any]]:
        """``data.modality_options`` of the modalities this run uses (others are kept for ablations)."""
        return {m: o for m, o in self.data.modality_options.items() if m in self.modalities}

    @field_validator("modalities")
    @classmethod
    def _mods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one modality is required")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate modality in {v}")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one stage is required")
        order = [s for s in STAGES if s in v]
        if order != list(v) or len(set(v)) != len(v):
            raise ValueError(f"stages must be a subset of pt, sft, rft in that order, got {','.join(v)}")
        return v

    @model_validator(mode="after")
    def _validation_split(self) -> "RunConfig":
        v, d = self.validation, self.data
        from_file = v.source == "file"
        if from_file and d.val_file is not None and any(getattr(self, s).eval_steps for s in self.stages):
            others = {"data.train_file": d.train_file, "data.test_file": d.test_file,
                      **{f"data.pt_files[{i}]": f for i, f in enumerate(d.pt_files)}}
            clash = [k for k, f in others.items() if Path(f) == Path(d.val_file)]
            if clash:
                raise ValueError(f"data.val_file={d.val_file} is also {', '.join(clash)}: the validation split "
                                 f"must be a file no stage trains or is tested on (or validate nothing: "
                                 f"<stage>.eval_steps=0)")
        if from_file and not d.val_file:
            raise ValueError("validation.source=file needs data.val_file (a disease-level QA file of the dataset)")
        if from_file and v.fraction:
            raise ValueError(f"validation.fraction={v.fraction} with validation.source=file: the file is the whole "
                             f"split; set validation.fraction=0, or validation.source=train or rft_prompts")
        if v.source == "rft_prompts" and v.fraction and not d.rft_holdout:
            raise ValueError("validation.source=rft_prompts carves the split from RFT's own records: it needs "
                             "data.rft_holdout > 0 (or validation.source=train)")
        for s in self.stages:
            sc = getattr(self, s)
            if sc.eval_steps and not (from_file or v.fraction):
                raise ValueError(f"{s}.eval_steps={sc.eval_steps} needs a validation split: set validation.fraction "
                                 f"(e.g. 0.1), or validation.source=file with data.val_file")
            if sc.metric_for_best_model is not None:
                if not sc.eval_steps:
                    raise ValueError(f"{s}.metric_for_best_model needs {s}.eval_steps > 0")
                if sc.metric_for_best_model not in BEST_METRICS:
                    raise ValueError(f"{s}.metric_for_best_model={sc.metric_for_best_model!r}; allowed: "
                                     f"{', '.join(BEST_METRICS)}")
        m = self.validation.alarm_metric
        names = [r.name for r in self.rewards]
        if m not in ("f1", "answer_rate", "reward", "reward_sampled") and not (m.startswith("reward/") and m[7:] in names):
            raise ValueError(f"validation.alarm_metric={m!r}; allowed: f1, answer_rate, reward, reward_sampled, "
                             + ", ".join(f"reward/{n}" for n in names))
        return self

    @model_validator(mode="after")
    def _encoders_cover_modalities(self) -> "RunConfig":
        missing = [m for m in self.modalities if m not in self.encoders]
        if missing:
            raise ValueError(f"no encoder configured for modality {', '.join(missing)} (set encoders.<modality>.name)")
        norm = self.projector.normalize_input
        unknown = [m for m in norm if m not in self.encoders] if isinstance(norm, list) else []
        if unknown:
            raise ValueError(f"projector.normalize_input names {', '.join(unknown)}, which has no encoder; "
                             f"allowed: true, false or a list of {', '.join(self.encoders)}")
        return self

    @model_validator(mode="after")
    def _partial_modalities(self) -> "RunConfig":
        for s in STAGES:
            sc = getattr(self, s)
            known = set(self.modalities) | set(self.encoders)
            bad = [m for m in sc.modality_dropout if m not in known]
            if bad:
                raise ValueError(f"{s}.modality_dropout: {bad[0]!r} is not a modality of the run "
                                 f"(allowed: {', '.join(self.modalities)})")
            # A preset's dropout of a modality the run leaves out (--modalities cxr,lab) has nothing to drop.
            if any(m not in self.modalities for m in sc.modality_dropout):
                sc.modality_dropout = {m: p for m, p in sc.modality_dropout.items() if m in self.modalities}
        if self.eval.modalities is not None:
            expand_subsets([",".join(self.eval.modalities)], self.modalities, where="eval.modalities")
        if self.eval.modality_subsets:
            expand_subsets(self.eval.modality_subsets, self.modalities)
        return self


def expand_subsets(spec: list[str], modalities: list[str], where: str = "eval.modality_subsets") -> list[tuple[str, ...]]:
    """Modality subsets of ``spec`` (``all-singles``, ``all-pairs``, ``ecg+lab``, ...) in run order, each
    non-empty and proper or whole, without repeats; ValueError (one line) otherwise."""
    out: list[tuple[str, ...]] = []
    for item in spec:
        if item in ("all-singles", "all-pairs"):
            k = 1 if item == "all-singles" else 2
            out += [c for c in itertools.combinations(modalities, k) if len(c) < len(modalities)]
            continue
        names = [n.strip() for n in item.replace(",", "+").split("+") if n.strip()]
        bad = [n for n in names if n not in modalities]
        if not names or bad or len(set(names)) != len(names):
            raise ValueError(f"{where}: {item!r} is not a subset of the run's modalities "
                             f"({', '.join(modalities)}); allowed: all-singles, all-pairs, or names joined by '+'")
        out.append(tuple(m for m in modalities if m in names))
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- loading
def _fmt_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line: the first problem, its location, what is allowed."""
    e = err.errors()[0]
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    inp = e.get("input")
    shown = "" if isinstance(inp, (dict, list)) else f" (got {inp!r})"
    # A model-level check (empty location) raises a ValueError whose text already says what and where:
    # pydantic's "<root>" and "Value error, " would only add noise to the one line.
    msg = e["msg"].removeprefix("Value error, ") if e.get("type") == "value_error" else e["msg"]
    loc = f"{_fmt_loc(e['loc'])}: " if e["loc"] else ""
    return f"{where}: {loc}{msg}{shown}{more}"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("medtvt_core.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(names)}")
    data = yaml.safe_load(resources.files("medtvt_core.presets").joinpath(f"{name}.yaml").read_text()) or {}
    data["preset"] = name
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {p}: unknown extension {p.suffix!r}; allowed: .yaml, .yml, .toml, .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        msg = str(exc).replace("\n", " ")
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping, got {type(data).__name__}")
    return data


def _swaps_plugin(old: Any, new: dict[str, Any]) -> bool:
    """``new`` names another plugin than ``old`` (a ``{name, options}`` reference): then the old plugin's
    options are dropped, not merged (they belong to the old plugin's config model)."""
    return isinstance(old, dict) and "name" in new and old.get("name") not in (None, new["name"])


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and _swaps_plugin(out.get(k), v):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options",):
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _known_path(model: type[BaseModel], keys: list[str]) -> None:
    """Raise ConfigError unless ``keys`` names a field path of ``model`` (free-form dicts are open)."""
    cur: type[BaseModel] | None = model
    i = 0
    while i < len(keys) and cur is not None:
        fields = cur.model_fields
        key = keys[i]
        if key not in fields:
            where = ".".join(keys[: i + 1])
            raise ConfigError(f"--set {where}: unknown key {key!r}; allowed here: {', '.join(sorted(fields))}")
        ann = fields[key].annotation
        if getattr(ann, "__origin__", None) is list:
            return  # a list is set whole
        inner = _dict_value_model(ann)
        if inner is not None:  # dict[str, Model]: the next key is a free name (a modality)
            cur, i = inner, i + 2
            continue
        cur, i = _model_in(ann), i + 1


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _dict_value_model(ann: Any) -> type[BaseModel] | None:
    args = getattr(ann, "__args__", ()) or ()
    if getattr(ann, "__origin__", None) is dict and len(args) == 2:
        return _model_in(args[1])
    return None


def parse_set(expr: str) -> tuple[list[str], Any]:
    """``"rft.num_generations=4"`` -> (["rft", "num_generations"], 4); the value is YAML."""
    if "=" not in expr:
        raise ConfigError(f"--set {expr!r}: expected KEY=VALUE, e.g. rft.num_generations=4")
    key, raw = expr.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {expr!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    _known_path(RunConfig, keys)
    return keys, value


def apply_set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    if keys[-1] == "name" and len(keys) > 1 and cur.get("name") not in (None, value):
        cur.pop("options", None)  # another plugin: the old one's options do not apply (as with --fusion)
    cur[keys[-1]] = value


def _split_list(v: str | list[str]) -> list[str]:
    if isinstance(v, list):
        return v
    return [s.strip() for s in v.replace("+", ",").split(",") if s.strip()]


def resolve_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    fusion: str | None = None,
    modalities: str | list[str] | None = None,
    rewards: str | list[str] | None = None,
    stages: str | list[str] | None = None,
    output_dir: str | Path | None = None,
    sets: list[str] = (),  # type: ignore[assignment]
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig`: preset < config file < named flags < ``--set`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if preset:
        data = deep_merge(data, load_preset(preset))
    if config_file:
        file_data = read_config_file(config_file)
        if "preset" in file_data and file_data["preset"] and not preset:
            data = deep_merge(load_preset(str(file_data["preset"])), data)
        data = deep_merge(data, file_data)
    if fusion:
        data.setdefault("fusion", {})
        data["fusion"] = {"name": fusion, "options": data["fusion"].get("options", {}) if data["fusion"].get("name") in (None, fusion) else {}}
    if modalities:
        data["modalities"] = _split_list(modalities)
    if rewards:
        data["rewards"] = [{"name": r} for r in _split_list(rewards)]
    if stages:
        data["stages"] = _split_list(stages)
    if output_dir:
        data["output_dir"] = str(output_dir)
    parsed = [parse_set(expr) for expr in sets]
    # Plugin swaps (``*.name=``) first, so the new plugin's ``--set *.options.X`` survive the reset.
    for keys, value in sorted(parsed, key=lambda kv: kv[0][-1] != "name"):
        apply_set(data, keys, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "config")) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def write_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, dump_config(cfg))
