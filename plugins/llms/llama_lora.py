"""LLM plugin ``llama-lora``: a LLaMA causal LM (transformers) wrapped in peft LoRA.

Weights come from a local Hugging Face directory (``model_path``; never fetched from a hub,
safetensors only) or are built at random from a named architecture (``variant``: ``tiny`` for
tests and the demo, ``llama-3.2-1b`` for throughput benchmarks).  The tokenizer is the model
directory's own; without one, ``llama-3.2-1b`` gets LLaMA-3's tokenizer built offline
(:mod:`.llama3_tokenizer`, needs ``quicktok-v1``; refused before any work without it) and ``tiny``
a byte-level BPE tokenizer trained offline on the run's text (``corpus``) with the ``tokenizers``
library (the model's processor saves either with the model).

The core adds each modality placeholder (``<ecg>``, ...) as one special token; the reasoning
tags ``<think> </think> <answer> </answer>`` of a trained tokenizer are single, non-special
tokens (so ``decode(skip_special_tokens=True)`` keeps them for the rewards).

LoRA targets the attention projections ``q_proj, k_proj, v_proj, o_proj`` by default; the
reference code also adapts the feed-forward projections (the ``paper`` preset sets them).
:func:`extra_parameter_names` lists the LLM's norms, biases and input token embeddings, which
the reference also trains.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from medtvt_core import hookimpl
from medtvt_core.contracts import LLMBackbone, PluginConfig
from medtvt_core.errors import CheckpointError, ConfigError

from .llama3_tokenizer import NEEDS, build_llama3_tokenizer, quicktok_available

__all__ = [
    "LlamaLoraConfig", "LlamaLoraBackbone", "VARIANTS", "REASONING_TAGS",
    "llama_config", "train_tokenizer", "extra_parameter_names", "pretrain_base",
]

#: Architectures buildable without a model directory (``LlamaConfig`` keyword arguments).
VARIANTS: dict[str, dict[str, Any]] = {
    # Tied embeddings like the 1B model, so tests exercise the tied save/load path.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # meta-llama/Llama-3.2-1B(-Instruct) config.json.
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
        mlp_bias=False, initializer_range=0.02, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
        },
    ),
}

#: Tags of the answer format; single tokens in a trained tokenizer, kept by ``decode``.
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_TRAINED_RESERVED_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# LLaMA-3 tokenizers ship no pad token but reserve this one for padding.
_LLAMA3_PAD = "<|finetune_right_pad_id|>"


class LlamaLoraConfig(PluginConfig):
    """Options of the ``llama-lora`` LLM plugin."""

    variant: Literal["tiny", "llama-3.2-1b"] = Field(
        "tiny", description="architecture built with random weights when model_path is None "
                            "(tiny: hidden 64, 2 layers; llama-3.2-1b: the real 1B config)")
    model_path: str | None = Field(
        None, description="local Hugging Face model directory (config.json, *.safetensors, tokenizer); "
                          "None: build `variant` with random weights")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names that get LoRA adapters (default: the attention projections)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the LLM weights")
    gradient_checkpointing: bool = Field(False, description="recompute LLM activations in backward to save memory")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel of transformers")
    tokenizer_vocab_size: int = Field(
        4000, ge=300, description="vocabulary of the BPE tokenizer trained on the corpus (variant tiny, no model_path)")
    tokenizer_min_frequency: int = Field(2, ge=1, description="min pair count of a BPE merge (trained tokenizer)")
    seed: int = Field(0, description="seed of the random initialisation (no model_path)")
    pretrain_steps: int = Field(
        0, ge=0, description="no model_path only: first train the random base as a causal LM on the corpus "
                             "for this many steps (a stand-in for a pretrained checkpoint in demos); 0: off")
    pretrain_lr: float = Field(3e-3, gt=0, description="learning rate of that base pretraining")
    pretrain_batch_size: int = Field(32, ge=1, description="texts per step of that base pretraining")
    pretrain_max_length: int = Field(256, ge=8, description="tokens per text in that base pretraining")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one target module is required, e.g. q_proj")
        return v

    @model_validator(mode="after")
    def _llama3_tokenizer_source(self) -> "LlamaLoraConfig":
        # Checked with the options (before any work): the random 1B base has LLaMA-3's vocabulary,
        # whose tokenizer is built from quicktok when no model directory provides it.
        if self.model_path is None and self.variant == "llama-3.2-1b":
            if not quicktok_available():
                raise ValueError(f"variant 'llama-3.2-1b' without model_path needs LLaMA-3's tokenizer: {NEEDS}")
        return self


# --------------------------------------------------------------------------- helpers
def llama_config(variant: str, vocab_size: int | None = None, **overrides: Any):
    """``LlamaConfig`` of ``variant``; ``vocab_size`` replaces the variant's when larger or unset."""
    from transformers import LlamaConfig

    if variant not in VARIANTS:
        raise ConfigError(f"llm.options.variant: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    kw = dict(VARIANTS[variant])
    base_vocab = kw.get("vocab_size")
    if vocab_size is not None:
        kw["vocab_size"] = max(vocab_size, base_vocab or 0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _clean_corpus(texts: Sequence[str], drop: Sequence[str]) -> list[str]:
    out = []
    for t in texts:
        for s in drop:  # placeholders and tags become single tokens later; keep them out of merges
            t = t.replace(s, " ")
        out.append(t)
    return out


def train_tokenizer(texts: Sequence[str], *, vocab_size: int = 4000, min_frequency: int = 2):
    """Byte-level BPE trained on ``texts``; specials ``<pad> <s> </s> <unk>``, BOS prepended,
    reasoning tags as single tokens.  Returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ConfigError("llama-lora: the corpus to train a tokenizer on is empty")
    tok = Tokenizer(models.BPE())
    # Byte-level: every string is encodable, so <unk> never appears.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(_TRAINED_RESERVED_TOKENS.values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_clean_corpus(texts, REASONING_TAGS), trainer=trainer)
    bos = _TRAINED_RESERVED_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in REASONING_TAGS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20, **_TRAINED_RESERVED_TOKENS)
    return fast


def _is_extra(name: str, module: Any, input_embeddings: Any) -> bool:
    from torch import nn

    if "lora_" in name:
        return False
    if module is input_embeddings:
        return True
    cls = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or cls.endswith("rmsnorm") or cls.endswith("layernorm")


def extra_parameter_names(model: Any) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the LLM's norms, biases and input embeddings."""
    emb = model.get_input_embeddings()
    names: list[str] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        is_extra = _is_extra(mname, module, emb)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen or "lora_" in full:
                continue
            if is_extra or pname == "bias":
                names.append(full)
                seen.add(id(p))
    return names


def pretrain_base(model: Any, tok: Any, texts: Sequence[str], *, steps: int, lr: float, batch_size: int,
                  max_length: int, seed: int) -> None:
    """Causal-LM training of a randomly initialised base on ``texts`` (AdamW, cosine schedule, 5% warmup).

    Demos have no pretrained LLaMA; a few hundred steps on the cohort's own text give the frozen
    base the language that LoRA then adapts, as a real checkpoint would.  ``model`` may be a peft
    model: its adapter is disabled and stays untouched.  Special tokens the core added (modality
    placeholders) are removed from the text: their embeddings are replaced by modality tokens anyway.

    A plain loop, not ``Trainer``: under ``torchrun`` a Trainer would spread this over the processes
    and make the base depend on their number; here every process computes the same base (seeded
    batches, same arithmetic), as a checkpoint read from disk would be the same on every process.
    """
    import torch
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    added = [t for t in tok.all_special_tokens if t not in _TRAINED_RESERVED_TOKENS.values()]
    clean = [t for t in _clean_corpus(texts, added) if t.strip()]
    if not clean:
        raise ConfigError("llm.options.pretrain_steps: the corpus holds no text")
    eos = tok.eos_token or ""
    enc = tok([t + eos for t in clean], truncation=True, max_length=max_length)["input_ids"]
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    is_peft = hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")
    base = model.get_base_model() if is_peft else model
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    for n, p in base.named_parameters():
        p.requires_grad_("lora_" not in n)
    params = [p for p in base.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=max(1, round(0.05 * steps)), num_training_steps=steps)
    device = next(base.parameters()).device
    g = torch.Generator().manual_seed(seed)
    off = model.disable_adapter() if is_peft else contextlib.nullcontext()
    order: list[int] = []
    try:
        with torch.random.fork_rng(devices=[]), off:
            torch.manual_seed(seed)
            base.train()
            for _ in range(steps):
                while len(order) < batch_size:  # epochs of seeded permutations
                    order += torch.randperm(len(enc), generator=g).tolist()
                idx, order = order[:batch_size], order[batch_size:]
                batch = {k: v.to(device) for k, v in collate([{"input_ids": enc[i]} for i in idx]).items()}
                loss = base(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
    finally:
        for n, p in base.named_parameters():
            p.requires_grad_(flags[n])
    model.eval()


# --------------------------------------------------------------------------- plugin
class LlamaLoraBackbone(LLMBackbone):
    """LLaMA causal LM with peft LoRA; local weights or a random ``variant`` (plugin ``llama-lora``)."""

    config_class: ClassVar[type[PluginConfig]] = LlamaLoraConfig
    contract_options: ClassVar[dict[str, Any]] = {"variant": "tiny"}

    def __init__(self, **options: Any):
        self.config = LlamaLoraConfig(**options)

    # ---------------------------------------------------------------- info
    @property
    def pretrained_path(self) -> Path | None:
        """The local model directory, or None when the weights are random (built from a config)."""
        return Path(self.config.model_path).expanduser() if self.config.model_path else None

    def _model_dir(self) -> Path:
        path = self.pretrained_path
        assert path is not None
        if not path.is_dir():
            raise CheckpointError(
                f"llm.options.model_path: {path} is not a directory; expected a local Hugging Face model "
                f"directory (config.json, model*.safetensors, tokenizer.json) — models are never downloaded")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"llm.options.model_path: {path} has no config.json (not a Hugging Face model directory)")
        return path

    @property
    def hidden_size(self) -> int:
        if self.pretrained_path is None:
            return int(VARIANTS[self.config.variant]["hidden_size"])
        cfg_file = self._model_dir() / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text())
            return int(cfg.get("hidden_size") or cfg["text_config"]["hidden_size"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{cfg_file}: cannot read hidden_size ({exc})") from None

    def weight_files(self) -> list[Path]:
        """``config.json`` and the ``*.safetensors`` of ``model_path`` ([] for a random base)."""
        if self.pretrained_path is None:
            return []
        d = self._model_dir()
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"llm.options.model_path: {d} holds no *.safetensors weights "
                                  f"(pickled weights are refused: they can run code when read)")
        return [d / "config.json", *files]

    # ---------------------------------------------------------------- build
    def load_tokenizer(self, corpus: Callable[[], Sequence[str]] | None = None):
        """The model directory's tokenizer, else LLaMA-3's (``llama-3.2-1b``) or one trained on
        ``corpus()`` (``tiny``); a pad token is set."""
        from transformers import AutoTokenizer

        if self.pretrained_path is not None:
            src = self._model_dir()
            try:
                tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"tokenizer in {src} cannot be loaded: {exc}".replace("\n", " ")) from None
        elif self.config.variant == "llama-3.2-1b":
            tok = build_llama3_tokenizer()
        else:
            if corpus is None:
                raise ConfigError(
                    f"llama-lora variant {self.config.variant!r} has no tokenizer of its own: a corpus to train one "
                    f"on is needed, or set llm.options.model_path")
            tok = train_tokenizer(corpus(), vocab_size=self.config.tokenizer_vocab_size,
                                  min_frequency=self.config.tokenizer_min_frequency)
        if tok.pad_token is None:
            tok.pad_token = _LLAMA3_PAD if _LLAMA3_PAD in tok.get_vocab() else tok.eos_token
        return tok

    def text_config(self, tokenizer: Any):
        """``LlamaConfig`` whose vocabulary holds every token of ``tokenizer``."""
        from transformers import AutoConfig

        n = len(tokenizer)
        if self.pretrained_path is not None:
            cfg = AutoConfig.from_pretrained(str(self._model_dir()), local_files_only=True)
            cfg.vocab_size = max(int(cfg.vocab_size), n)
        else:
            specials = {k: tokenizer.convert_tokens_to_ids(v) for k, v in
                        (("pad_token_id", tokenizer.pad_token), ("bos_token_id", tokenizer.bos_token),
                         ("eos_token_id", tokenizer.eos_token)) if v is not None}
            # tiny: exactly the tokenizer's vocabulary; 1B: keep the real 128256 rows (benchmarks
            # measure the real output-layer cost) unless the tokenizer is larger.
            cfg = llama_config(self.config.variant, vocab_size=n, **specials)
        cfg.pad_token_id = tokenizer.pad_token_id
        return cfg

    def build_model(self, text_config: Any, *, adapter: bool = True):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        cfg = self.config
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        if self.pretrained_path is not None:
            path = self._model_dir()
            try:
                # use_safetensors: a pickled pytorch_model.bin can run code when read, so refuse it.
                model = AutoModelForCausalLM.from_pretrained(
                    str(path), local_files_only=True, use_safetensors=True, dtype=dtype,
                    attn_implementation=cfg.attn_implementation)
            except (OSError, ValueError) as exc:
                msg = str(exc).replace("\n", " ")
                raise CheckpointError(
                    f"llm.options.model_path: cannot load a causal LM from {path} (safetensors weights required): {msg}"
                ) from None
            self._resize_for(model, int(text_config.vocab_size))
            for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if getattr(text_config, k, None) is not None:
                    setattr(model.config, k, getattr(text_config, k))
        else:
            with torch.random.fork_rng(devices=[]):  # reproducible without touching the caller's RNG
                torch.manual_seed(cfg.seed)
                model = AutoModelForCausalLM.from_config(text_config, dtype=dtype,
                                                         attn_implementation=cfg.attn_implementation)
        for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
            tid = getattr(text_config, k, None)
            if tid is not None and getattr(model.generation_config, k, None) is None:
                setattr(model.generation_config, k, tid)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (inputs_embeds may not).
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if not adapter:
            return model
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(model, lora)
        except ValueError as exc:
            msg = str(exc).replace("\n", " ")
            raise ConfigError(f"llm.options.target_modules {list(cfg.target_modules)}: {msg}") from None

    def prepare_base(self, model: Any, tokenizer: Any, corpus: Callable[[], Sequence[str]] | None) -> None:
        """With ``pretrain_steps`` and no ``model_path``: causal-LM pretraining of the random base
        (adapter disabled) on the corpus, a stand-in for a pretrained checkpoint in demos."""
        if self.pretrained_path is not None or not self.config.pretrain_steps:
            return
        if corpus is None:
            raise ConfigError("llm.options.pretrain_steps > 0 needs a corpus (the dataset's text) to train on")
        c = self.config
        pretrain_base(model, tokenizer, corpus(), steps=c.pretrain_steps, lr=c.pretrain_lr,
                      batch_size=c.pretrain_batch_size, max_length=c.pretrain_max_length, seed=c.seed)

    def extra_parameter_names(self, model: Any) -> list[str]:
        return extra_parameter_names(model)

    @staticmethod
    def _resize_for(model: Any, n_tokens: int) -> None:
        """Grow the embedding rows to ``n_tokens``; new rows = mean of the old ones (deterministic, so
        a reload from the same checkpoint gives identical rows without saving them)."""
        import torch

        emb = model.get_input_embeddings()
        old = emb.weight.shape[0]
        if n_tokens <= old:
            return
        model.resize_token_embeddings(n_tokens, mean_resizing=False)
        with torch.no_grad():
            layers = (model.get_input_embeddings(), model.get_output_embeddings())
            weights = {id(m.weight): m.weight for m in layers if m is not None}  # a tied head shares the tensor
            for w in weights.values():
                if w.shape[0] == n_tokens:
                    w[old:] = w[:old].float().mean(0, keepdim=True).to(w.dtype)


@hookimpl
def medtvt_register_llms(register):
    register("llama-lora", LlamaLoraBackbone, config=LlamaLoraConfig)
