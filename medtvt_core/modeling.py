"""The multimodal model: encoders -> projectors -> fusion -> placeholder tokens of a LoRA LLM.

Per modality ``m`` present in a sample: the frozen encoder gives features ``[N, C]`` (or cached
features are passed in), its trainable head pools them to ``[K, pooled_dim]``, the projector
maps them to ``[K, D]``.  The modalities of a batch are stacked as ``[B, M, K, D]`` (rows of
absent modalities are zeros and masked), fused (skipped in the PT stage, which has no MPL), and
written into the ``K`` placeholder positions of ``m`` in the prompt with one ``masked_scatter``.

:class:`MedTVTModel` API: ``forward`` (loss on answer tokens), ``generate`` (transformers
``generate`` on ``inputs_embeds`` with the KV cache), ``generate_recompute`` (the reference's
cache-free loop, for checks and benchmarks), ``per_token_logps`` (GRPO), ``configure_trainable``
(stages), ``save_pretrained`` / ``from_pretrained`` (safetensors + peft adapter + tokenizer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from transformers.utils import ModelOutput

from .config import PluginRef, ProjectorConfig, format_validation_error
from .contracts import Encoder, Fusion, LLMBackbone, LoadedLLM
from .errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "MedTVTConfig", "MedTVTModel", "MedTVTOutput", "STAGES_TRAINABLE",
    "CONFIG_NAME", "WEIGHTS_NAME", "ADAPTER_DIR", "TOKENIZER_DIR", "selective_log_softmax",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1

#: Parameter groups trained per stage (SPEC "Training"); LLM extras are opt-in on top.
STAGES_TRAINABLE: dict[str, tuple[str, ...]] = {
    "pt": ("encoder_heads", "projectors", "lora"),
    "sft": ("fusion", "lora"),
    "rft": ("fusion", "lora"),
    "eval": (),
}


# --------------------------------------------------------------------------- config
class MedTVTConfig(BaseModel):
    """What builds a :class:`MedTVTModel` (JSON-serialisable; written to ``config.json``)."""

    model_config = ConfigDict(extra="forbid")

    modalities: list[str] = Field(description="modality names, in the order of the mask columns")
    encoders: dict[str, PluginRef] = Field(description="encoder plugin and options per modality")
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig, description="tokens per modality and blocks")
    fusion: PluginRef = Field(default_factory=lambda: PluginRef(name="mpl"), description="fusion plugin")
    llm: PluginRef = Field(default_factory=lambda: PluginRef(name="llama-lora"), description="LLM plugin")
    use_cache: bool = Field(True, description="use the KV cache in generation (transformers' Trainer sets this attribute)")
    placeholders: dict[str, str] = Field(
        default_factory=dict,
        description="modality -> placeholder token added to the tokenizer (filled at build time; "
                    "kept so a reload reproduces the same vocabulary)")

    @property
    def tokens_per_modality(self) -> int:
        return self.projector.tokens_per_modality

    @classmethod
    def from_run_config(cls, run: Any) -> "MedTVTConfig":
        """The model part of a :class:`~medtvt_core.config.RunConfig`."""
        return cls(modalities=list(run.modalities), encoders={m: run.encoders[m] for m in run.modalities},
                   projector=run.projector, fusion=run.fusion, llm=run.llm)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def to_json_string(self) -> str:
        """As transformers configs do (the Trainer's loggers record the model config)."""
        return self.model_dump_json(indent=2)


@dataclass
class MedTVTOutput(ModelOutput):
    """``loss`` (None without labels), ``logits [B, L, V]``, ``modality_weights [B, M]`` (None when
    the fusion does not weigh modalities, e.g. ``none`` or the PT stage).  A transformers
    ``ModelOutput``, so ``Trainer`` reads ``outputs["loss"]``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    modality_weights: torch.Tensor | None = None


# --------------------------------------------------------------------------- helpers
def _validated_options(registry: Any, name: str, options: Mapping[str, Any], where: str,
                       defaults: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Plugin class and its validated keyword arguments; ``defaults`` fill fields the user left
    unset when the plugin accepts them (else they are dropped)."""
    spec = registry.spec(name)
    model = spec.config or getattr(spec.obj, "config_class", None)
    if model is None:
        return spec.obj, dict(options)
    try:
        opts = model.model_validate(dict(options)).model_dump()
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{where}.options ({name})")) from None
    extra = {k: v for k, v in (defaults or {}).items() if k in model.model_fields and k not in options}
    if extra:
        try:
            opts = model.model_validate({**options, **extra}).model_dump()
        except ValidationError:
            pass  # the plugin does not accept the default (e.g. a lab encoder fixed to 1 token)
    return spec.obj, opts


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` without materialising the full log-probabilities twice."""
    logits = logits.float()
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, so a left-padded prompt gets the same positions as
    # transformers' generate gives it (and right padding keeps 0..n-1).
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- model
class MedTVTModel(nn.Module):
    """Encoders + projectors + fusion + peft LLM; see the module docstring."""

    def __init__(self, config: MedTVTConfig, encoders: Mapping[str, Encoder], projectors: Mapping[str, nn.Module],
                 fusion: Fusion, llm: LoadedLLM, backbone: LLMBackbone | None = None):
        super().__init__()
        missing = [m for m in config.modalities if m not in encoders or m not in projectors or m not in config.placeholders]
        if missing:
            raise ConfigError(f"model: no encoder/projector/placeholder for modality {', '.join(missing)}")
        self.config = config
        self.modalities = list(config.modalities)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        for enc in self.encoders.values():
            enc.backbone_eval()  # modules start in train mode; a frozen backbone's BatchNorm must not
        self.projectors = nn.ModuleDict({m: projectors[m] for m in self.modalities})
        from .projector import FeatureStandardizer

        # Identity until fitted (projector.standardize_features); saved with the projectors.
        self.feature_norms = nn.ModuleDict({m: FeatureStandardizer(int(encoders[m].feature_shape[-1]))
                                            for m in self.modalities})
        self.fusion = fusion
        self.llm = llm.model
        self.tokenizer = llm.tokenizer
        self.backbone = backbone
        self.placeholder_ids = {m: int(llm.placeholder_ids[config.placeholders[m]]) for m in self.modalities}
        # Placeholders of modalities not in use must not reach the LLM as plain embeddings.
        self._foreign_ph = sorted(i for p, i in llm.placeholder_ids.items() if i not in self.placeholder_ids.values())
        self.use_fusion = True  # False in PT (SPEC: no MPL before SFT)
        self.extras_trained = False  # LLM norms/biases/embeddings were trainable once: save them
        self.stage: str | None = None  # last configure_trainable stage
        self.train_extras = False
        self._processor = None

    # ---------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: MedTVTConfig | Any, catalog: Any = None, *,
                    corpus: Callable[[], Sequence[str]] | None = None,
                    tokenizer_dir: str | Path | None = None) -> "MedTVTModel":
        """Build every component from the plugin catalog (default: the installed plugins).

        ``config`` may also be a :class:`~medtvt_core.config.RunConfig`.  ``corpus`` and
        ``tokenizer_dir`` go to :meth:`LLMBackbone.build`.
        """
        from .plugins import get_catalog
        from .projector import DenseProjector

        if not isinstance(config, MedTVTConfig):
            config = MedTVTConfig.from_run_config(config)
        catalog = catalog or get_catalog()
        k = config.tokens_per_modality
        missing = [m for m in config.modalities if m not in config.encoders]
        if missing:
            raise ConfigError(f"no encoder configured for modality {', '.join(missing)} (set encoders.<modality>.name)")

        placeholders = dict(config.placeholders)
        if not placeholders:
            names = list(config.modalities) + [m for m in catalog.modalities.list() if m not in config.modalities]
            for m in names:
                obj = catalog.modalities.get(m) if m in catalog.modalities else None
                placeholders[m] = getattr(obj, "placeholder", None) or f"<{m}>"
        absent = [m for m in config.modalities if m not in placeholders]
        if absent:
            raise ConfigError(f"placeholders: no placeholder for modality {', '.join(absent)}")
        config = config.model_copy(update={"placeholders": placeholders})

        encoders: dict[str, Encoder] = {}
        for m in config.modalities:
            ref = config.encoders[m]
            # An encoder's K follows projector.tokens_per_modality unless its options set it.
            enc_cls, opts = _validated_options(catalog.encoders, ref.name, ref.options, f"encoders.{m}",
                                               defaults={"num_tokens": k})
            enc = enc_cls(**opts)
            enc_mod = getattr(enc, "modality", m)
            if enc_mod != m:
                raise ConfigError(f"encoders.{m}: encoder {ref.name!r} reads modality {enc_mod!r}, not {m!r}")
            if enc.num_tokens not in (1, k):
                raise ConfigError(
                    f"encoders.{m}: encoder {ref.name!r} gives K={enc.num_tokens} tokens but "
                    f"projector.tokens_per_modality={k}; use {k} (or 1, which is repeated {k} times)")
            enc.freeze_backbone()
            encoders[m] = enc

        llm_cls, llm_opts = _validated_options(catalog.llms, config.llm.name, config.llm.options, "llm")
        backbone = llm_cls(**llm_opts)
        loaded = backbone.build(list(placeholders.values()), corpus=corpus,
                                tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir is not None else None)
        d = loaded.hidden_size
        projectors = {m: DenseProjector(encoders[m].pooled_dim, d, blocks=config.projector.blocks)
                      for m in config.modalities}
        fus_cls, fus_opts = _validated_options(catalog.fusion, config.fusion.name, config.fusion.options, "fusion")
        fusion = fus_cls(d, len(config.modalities), **fus_opts)
        return cls(config, encoders, projectors, fusion, loaded, backbone)

    @property
    def processor(self):
        """A :class:`~medtvt_core.processing.MedTVTProcessor` for this model's tokenizer and K."""
        if self._processor is None:
            from .processing import MedTVTProcessor

            self._processor = MedTVTProcessor(
                self.tokenizer, {m: self.config.placeholders[m] for m in self.modalities},
                self.config.tokens_per_modality)
        return self._processor

    @property
    def hidden_size(self) -> int:
        return int(self.llm.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ---------------------------------------------------------------- modality tokens
    def get_modality_features(self, name: str, inputs: torch.Tensor | None = None,
                              features: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, K, D]`` projected tokens of modality ``name`` from raw ``inputs`` (encoded frozen)
        or cached frozen ``features [n, N, C]``; a one-token encoder's token is repeated ``K`` times."""
        enc = self.encoders[name]
        if features is None:
            if inputs is None:
                raise DataError(f"modality {name!r}: neither inputs nor features given")
            with torch.no_grad():
                features = enc.encode(inputs)
        else:
            want = tuple(enc.feature_shape)
            if tuple(features.shape[1:]) != want:
                raise DataError(f"modality {name!r}: cached features have shape {tuple(features.shape[1:])} per sample, "
                                f"encoder {type(enc).__name__} gives {want}; rebuild the feature cache")
        tokens = self.projectors[name](enc.pool(self.feature_norms[name](features)))
        k = self.config.tokens_per_modality
        if tokens.shape[1] != k:  # a one-token encoder (labs) fills all K slots with its token
            tokens = tokens.expand(-1, k, -1)
        return tokens

    def modality_tokens(self, modality_mask: torch.Tensor, modality_inputs: Mapping[str, torch.Tensor] | None = None,
                        modality_features: Mapping[str, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused tokens ``[B, M, K, D]`` (zeros for absent modalities) and weights ``[B, M]`` or None.

        Per modality, the tensors hold rows of the present samples only, in batch order (the
        collator format), or one row per sample (rows of absent samples are ignored).
        """
        inputs, feats = dict(modality_inputs or {}), dict(modality_features or {})
        unknown = sorted((set(inputs) | set(feats)) - set(self.modalities))
        if unknown:
            raise DataError(f"modality inputs for {', '.join(unknown)}, which the model does not use "
                            f"(modalities: {', '.join(self.modalities)})")
        b, m_count = modality_mask.shape
        if m_count != len(self.modalities):
            raise DataError(f"modality_mask has {m_count} columns, the model has {len(self.modalities)} "
                            f"modalities ({', '.join(self.modalities)})")
        mask = modality_mask.to(self.device, torch.bool)
        k, d = self.config.tokens_per_modality, self.hidden_size
        ref = next(self.projectors[self.modalities[0]].parameters())
        cols = []
        for j, m in enumerate(self.modalities):
            present = mask[:, j]
            n_present = int(present.sum())
            src = feats.get(m) if m in feats else inputs.get(m)
            if n_present == 0:
                cols.append(ref.new_zeros(b, k, d))
                continue
            if src is None:
                raise DataError(f"modality {m!r} is present in {n_present} sample(s) but no inputs or features were given")
            n = src.shape[0]
            if n not in (n_present, b):
                raise DataError(f"modality {m!r}: {n} rows of inputs/features but {n_present} sample(s) marked present "
                                f"(batch size {b}); give one row per present sample")
            idx = present.nonzero().squeeze(1)
            if n == b and n_present != b:
                src = src[idx.to(src.device)]  # full-batch rows: only the present ones are read
            src = src.to(self.device)
            tok = self.get_modality_features(m, features=src) if m in feats else self.get_modality_features(m, inputs=src)
            # Out-of-place index_copy: absent rows stay exactly zero and gradients reach `tok`.
            cols.append(tok.new_zeros(b, k, d).index_copy(0, idx, tok))
        tokens = torch.stack(cols, dim=1)  # [B, M, K, D]
        if not self.use_fusion:
            return tokens, None
        out = self.fusion(tokens, mask)
        return out.tokens, out.weights

    def embed(self, input_ids: torch.Tensor, modality_mask: torch.Tensor | None = None,
              modality_inputs: Mapping[str, torch.Tensor] | None = None,
              modality_features: Mapping[str, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input embeddings ``[B, L, D]`` with modality tokens at the placeholder positions, and the
        modality weights.  ``modality_mask`` None: every modality given is present in every sample."""
        b = input_ids.shape[0]
        if modality_mask is None:
            given = set(modality_inputs or {}) | set(modality_features or {})
            modality_mask = torch.tensor([m in given for m in self.modalities], dtype=torch.bool).expand(b, -1)
        ids = input_ids.to(self.device)
        mask = modality_mask.to(self.device, torch.bool)
        k = self.config.tokens_per_modality
        ph = torch.tensor([self.placeholder_ids[m] for m in self.modalities], device=ids.device)
        onehot = ids.unsqueeze(-1) == ph  # [B, L, M]
        counts = onehot.sum(1)  # [B, M]
        expected = mask.long() * k
        if self._foreign_ph:
            foreign = torch.isin(ids, torch.tensor(self._foreign_ph, device=ids.device))
            if foreign.any():
                bi = int(foreign.any(1).nonzero()[0])
                tok = self.tokenizer.convert_ids_to_tokens(int(ids[bi][foreign[bi]][0]))
                raise DataError(f"sample {bi}: placeholder {tok} of a modality the model does not use "
                                f"(modalities: {', '.join(self.modalities)})")
        bad = (counts != expected).nonzero()
        if len(bad):
            bi, j = (int(x) for x in bad[0])
            m = self.modalities[j]
            raise DataError(
                f"sample {bi}: {int(counts[bi, j])} {self.config.placeholders[m]} placeholder token(s) in input_ids "
                f"but {int(expected[bi, j])} {m} feature token(s) (modality {'present' if mask[bi, j] else 'absent'}, "
                f"K={k}); expand each placeholder K times (MedTVTProcessor) and mark absent modalities in modality_mask")
        embeds = self.llm.get_input_embeddings()(ids)
        tokens, weights = self.modality_tokens(mask, modality_inputs, modality_features)
        pos = onehot.any(-1)  # [B, L]
        if pos.any():
            # Placeholder positions in row-major order; for each, its sample, modality and rank k
            # among that modality's K copies -> one gather and one masked_scatter for the batch.
            rank = onehot.long().cumsum(1) - 1  # [B, L, M]
            m_idx = onehot.long().argmax(-1)[pos]
            k_idx = rank[pos].gather(-1, m_idx.unsqueeze(-1)).squeeze(-1)
            b_idx = pos.nonzero()[:, 0]
            src = tokens[b_idx, m_idx, k_idx].to(embeds.dtype)
            embeds = embeds.masked_scatter(pos.unsqueeze(-1), src)
        return embeds, weights

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                modality_mask: torch.Tensor | None = None, modality_inputs: Mapping[str, torch.Tensor] | None = None,
                modality_features: Mapping[str, torch.Tensor] | None = None, **_: Any) -> MedTVTOutput:
        """Logits ``[B, L, V]``; with ``labels`` (-100 = ignored) the mean next-token cross-entropy."""
        embeds, weights = self.embed(input_ids, modality_mask, modality_inputs, modality_features)
        am = attention_mask.to(self.device)
        logits = self.llm(inputs_embeds=embeds, attention_mask=am, position_ids=_positions(am), use_cache=False).logits
        loss = None
        if labels is not None:
            tgt = labels.to(logits.device)[:, 1:]
            shift = logits[:, :-1]
            if (tgt != -100).any():
                loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100)
            else:  # no answer token in the batch: a zero that still has a graph
                loss = shift.sum() * 0.0
        return MedTVTOutput(loss=loss, logits=logits, modality_weights=weights)

    # ---------------------------------------------------------------- generation
    def _generation_inputs(self, input_ids, attention_mask, modality_mask, modality_inputs, modality_features):
        am = attention_mask.to(self.device)
        if (am[:, -1] == 0).any():
            raise DataError("generation needs LEFT-padded prompts (the last position of every row must be a real "
                            "token); build them with MedTVTProcessor.generation_features")
        embeds, _ = self.embed(input_ids, modality_mask, modality_inputs, modality_features)
        return embeds, am

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modality_mask: torch.Tensor | None = None,
                 modality_inputs: Mapping[str, torch.Tensor] | None = None,
                 modality_features: Mapping[str, torch.Tensor] | None = None, *, num_return_sequences: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                 max_new_tokens: int = 64, min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                 use_cache: bool = True, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids ``[B * G, T]`` (rows of one prompt adjacent; EOS kept, then padding).

        Modality embeddings are computed once per prompt; transformers ``generate`` runs on
        ``inputs_embeds`` with the KV cache and expands each prompt ``G = num_return_sequences``
        times.  The train/eval mode is the caller's (dropout stays on in train mode).
        """
        from transformers import GenerationConfig

        embeds, am = self._generation_inputs(input_ids, attention_mask, modality_mask, modality_inputs, modality_features)
        g = int(num_return_sequences)
        if g < 1:
            raise ConfigError(f"num_return_sequences must be >= 1, got {g}")
        if not do_sample and g > 1:
            # transformers refuses G > 1 for greedy search; every copy would be the same anyway.
            embeds, am, g = embeds.repeat_interleave(g, 0), am.repeat_interleave(g, 0), 1
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                   num_return_sequences=g, eos_token_id=eos, pad_token_id=self.processor.pad_token_id,
                   bos_token_id=self.tokenizer.bos_token_id, use_cache=use_cache)
        if do_sample:  # passed only when sampling: transformers warns about unused sampling options
            gen.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)
        config = GenerationConfig(**gen)
        # Generation options (e.g. output_logits) go into the config; the rest are model inputs.
        model_kwargs = config.update(**generate_kwargs)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=am, generation_config=config, **model_kwargs)

    @torch.no_grad()
    def generate_recompute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           modality_mask: torch.Tensor | None = None,
                           modality_inputs: Mapping[str, torch.Tensor] | None = None,
                           modality_features: Mapping[str, torch.Tensor] | None = None, *,
                           num_return_sequences: int = 1, do_sample: bool = False, temperature: float = 1.0,
                           top_p: float = 1.0, max_new_tokens: int = 64, min_new_tokens: int = 0,
                           eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The reference's decoding: no KV cache, a full forward over all embeddings per new token.

        Same output format as :meth:`generate`; kept as the baseline of the KV-cache benchmark and
        the ground truth of the cache test (greedy results must be token-identical)."""
        embeds, am = self._generation_inputs(input_ids, attention_mask, modality_mask, modality_inputs, modality_features)
        g = int(num_return_sequences)
        embeds, am = embeds.repeat_interleave(g, 0), am.repeat_interleave(g, 0)
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.processor.pad_token_id
        emb_layer = self.llm.get_input_embeddings()
        n = embeds.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=embeds.device)
        out = []
        for step in range(max_new_tokens):
            logits = self.llm(inputs_embeds=embeds, attention_mask=am, position_ids=_positions(am),
                              use_cache=False).logits[:, -1].float()
            if step < min_new_tokens:
                logits[:, eos] = float("-inf")
            nxt = _sample_next(logits, do_sample, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            done |= nxt == eos
            embeds = torch.cat([embeds, emb_layer(nxt)[:, None].to(embeds.dtype)], dim=1)
            am = torch.cat([am, torch.ones_like(am[:, :1])], dim=1)
            if done.all():
                break
        return torch.stack(out, dim=1) if out else torch.zeros(n, 0, dtype=torch.long, device=embeds.device)

    def per_token_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor | None = None, modality_mask: torch.Tensor | None = None,
                        modality_inputs: Mapping[str, torch.Tensor] | None = None,
                        modality_features: Mapping[str, torch.Tensor] | None = None, *,
                        temperature: float = 1.0) -> torch.Tensor:
        """Log-probabilities ``[B * G, T]`` (float32) of ``completion_ids [B * G, T]`` given the left-padded
        prompts ``[B, L]`` (G = rows per prompt, inferred), with gradients.

        Positions follow :meth:`generate` (real tokens only), so the values are those of sampling at
        ``temperature``.  ``completion_mask`` (default: up to the first EOS) marks real completion tokens.
        """
        from .processing import completion_mask as _cmask

        embeds, am = self._generation_inputs(input_ids, attention_mask, modality_mask, modality_inputs, modality_features)
        n, t = completion_ids.shape
        b = embeds.shape[0]
        if n % b:
            raise DataError(f"{n} completions for {b} prompts: expected a multiple (G completions per prompt)")
        g = n // b
        comp = completion_ids.to(self.device)
        cmask = _cmask(comp, self.tokenizer.eos_token_id) if completion_mask is None else completion_mask.to(self.device)
        embeds, am = embeds.repeat_interleave(g, 0), am.repeat_interleave(g, 0)
        full = torch.cat([embeds, self.llm.get_input_embeddings()(comp).to(embeds.dtype)], dim=1)
        fam = torch.cat([am, cmask.to(am.dtype)], dim=1)
        # Only the logits that predict completion tokens: the last T+1 positions, minus the final one.
        logits = self.llm(inputs_embeds=full, attention_mask=fam, position_ids=_positions(fam), use_cache=False,
                          logits_to_keep=t + 1).logits[:, :-1]
        return selective_log_softmax(logits.float() / temperature, comp)

    # ---------------------------------------------------------------- stages
    def lora_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if "lora_" in n]

    def encoder_head_parameter_names(self) -> list[str]:
        heads = {id(p) for enc in self.encoders.values() for p in enc.head_parameters()}
        return [n for n, p in self.named_parameters() if n.startswith("encoders.") and id(p) in heads]

    def llm_extra_parameter_names(self) -> list[str]:
        """LLM norms, biases and input embeddings (``llm.``-prefixed), per the LLM plugin."""
        fn = getattr(self.backbone, "extra_parameter_names", None)
        if fn is None:
            raise ConfigError(f"LLM plugin {self.config.llm.name!r} does not say which norms/biases/embeddings "
                              f"to train (no extra_parameter_names); set train_extras false")
        return [f"llm.{n}" for n in fn(self.llm)]

    def _group_names(self, group: str) -> list[str]:
        if group == "encoder_heads":
            return self.encoder_head_parameter_names()
        if group == "projectors":
            return [n for n, _ in self.named_parameters() if n.startswith("projectors.")]
        if group == "fusion":
            return [n for n, _ in self.named_parameters() if n.startswith("fusion.")]
        if group == "lora":
            return self.lora_parameter_names()
        if group == "extras":
            return self.llm_extra_parameter_names()
        raise ConfigError(f"unknown parameter group {group!r}")

    def configure_trainable(self, stage: str, *, train_extras: bool = False) -> list[str]:
        """Freeze everything, then unfreeze the groups of ``stage`` (:data:`STAGES_TRAINABLE`),
        plus the LLM extras when ``train_extras``.  PT also switches fusion off.  Returns the
        trainable parameter names."""
        if stage not in STAGES_TRAINABLE:
            raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES_TRAINABLE)}")
        groups = list(STAGES_TRAINABLE[stage]) + (["extras"] if train_extras else [])
        names = {n for gname in groups for n in self._group_names(gname)}
        for n, p in self.named_parameters():
            p.requires_grad_(n in names)
        self.use_fusion = stage != "pt"
        self.stage = stage
        self.train_extras = train_extras
        self.extras_trained = self.extras_trained or train_extras
        return self.trainable_parameter_names()

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- save / load
    def _encoder_is_random(self, m: str) -> bool:
        # The backbone comes from a file when the encoder's `weights` option names one; anything
        # else (random init, an encoder without such an option) is saved with the model.
        opts = self.config.encoders[m].options
        enc_cfg = getattr(self.encoders[m], "config", None)
        weights = opts.get("weights", getattr(enc_cfg, "weights", None))
        return weights in (None, "")

    def _llm_base_is_random(self) -> bool:
        return getattr(self.backbone, "pretrained_path", None) is None

    def saved_state_keys(self) -> list[str]:
        """State-dict keys written to ``model.safetensors`` (one name per shared tensor)."""
        keep: set[str] = set()
        for m, enc in self.encoders.items():
            backbone = set(enc.backbone_state())
            for k in enc.state_dict():
                if self._encoder_is_random(m) or k not in backbone:
                    keep.add(f"encoders.{m}.{k}")
        state = self.state_dict(keep_vars=True)
        keep |= {k for k in state if k.startswith(("projectors.", "fusion.", "feature_norms."))}
        if self._llm_base_is_random():
            keep |= {k for k in state if k.startswith("llm.") and "lora_" not in k}
        elif self.extras_trained:
            keep |= set(self.llm_extra_parameter_names())
        out, seen = [], set()
        for k, v in state.items():  # state_dict order; a tensor registered twice is stored once
            if k in keep and id(v) not in seen:
                seen.add(id(v))
                out.append(k)
        return out

    def save_pretrained(self, save_dir: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors``, the peft adapter and the tokenizer to ``save_dir``."""
        from .checkpoints import save_safetensors

        d = Path(save_dir)
        d.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        save_safetensors({k: state[k] for k in self.saved_state_keys()}, d / WEIGHTS_NAME,
                         metadata={"format": "pt", "medtvt_format": str(FORMAT_VERSION)})
        # Embedding rows are ours to save (extras); peft must not look them up on a hub.
        self.llm.save_pretrained(str(d / ADAPTER_DIR), save_embedding_layers=False)
        self.tokenizer.save_pretrained(str(d / TOKENIZER_DIR))
        path = getattr(self.backbone, "pretrained_path", None)
        meta = {
            "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "state": {
                "stage": self.stage,
                "train_extras": self.train_extras,
                "use_fusion": self.use_fusion,
                "extras_trained": self.extras_trained,
                "llm_base": "saved" if path is None else str(path),
                "random_encoders": [m for m in self.modalities if self._encoder_is_random(m)],
            },
        }
        tmp = d / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(d / CONFIG_NAME)
        return d

    @staticmethod
    def read_config(save_dir: str | Path) -> tuple[MedTVTConfig, dict[str, Any]]:
        """``(MedTVTConfig, state dict of config.json)`` of a saved model."""
        f = Path(save_dir) / CONFIG_NAME
        if not f.is_file():
            raise CheckpointError(f"{save_dir}: no {CONFIG_NAME}; not a saved MedTVT model")
        try:
            meta = json.loads(f.read_text())
            cfg = MedTVTConfig.model_validate(meta["model"])
        except (ValueError, KeyError, TypeError) as exc:
            msg = format_validation_error(exc, str(f)) if isinstance(exc, ValidationError) else f"{f}: {exc}"
            raise CheckpointError(msg.replace("\n", " ")) from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{f}: format_version {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}")
        return cfg, meta.get("state", {})

    @classmethod
    def from_pretrained(cls, save_dir: str | Path, catalog: Any = None) -> "MedTVTModel":
        """Rebuild from ``config.json`` (tokenizer from the saved one), load the weights strictly and
        restore the stage's trainable parameters."""
        d = Path(save_dir)
        cfg, state = cls.read_config(d)
        model = cls.from_config(cfg, catalog, tokenizer_dir=d / TOKENIZER_DIR)
        model.load_weights(d)
        if state.get("stage") in STAGES_TRAINABLE:
            # Same frozen/trainable split as when saved (kernels can differ with requires_grad).
            model.configure_trainable(state["stage"], train_extras=bool(state.get("train_extras", False)))
        model.use_fusion = bool(state.get("use_fusion", True))
        return model

    def load_weights(self, save_dir: str | Path, *, exclude: Sequence[str] = ()) -> None:
        """Load ``model.safetensors`` and the adapter of ``save_dir`` strictly: every expected key present
        with its shape, none unknown.  ``exclude``: key prefixes to skip on both sides (e.g. ``"fusion."``
        when a stage changes the fusion)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from .checkpoints import load_state_file

        d = Path(save_dir)
        wfile = d / WEIGHTS_NAME
        if not wfile.is_file():
            raise CheckpointError(f"{d}: no {WEIGHTS_NAME}")
        if (d / CONFIG_NAME).is_file() and self.read_config(d)[1].get("extras_trained"):
            # The file holds trained LLM norms/embeddings: expect them, and keep saving them.
            self.extras_trained = True
        skip = tuple(exclude)
        got = load_state_file(wfile)
        if skip:
            got = {k: v for k, v in got.items() if not k.startswith(skip)}
        own = self.state_dict()
        expected = [k for k in self.saved_state_keys() if not (skip and k.startswith(skip))]
        check_state(got, {k: own[k] for k in expected}, str(wfile))
        self.load_state_dict(got, strict=False)

        adir = d / ADAPTER_DIR
        afile = adir / "adapter_model.safetensors"
        if not afile.is_file():
            raise CheckpointError(f"{adir}: no adapter_model.safetensors (LoRA adapters are read from safetensors only)")
        self._check_adapter_config(adir)
        adapter = load_state_file(afile)
        want = get_peft_model_state_dict(self.llm)
        check_state(adapter, want, str(afile))
        res = set_peft_model_state_dict(self.llm, adapter)
        unexpected = list(getattr(res, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(f"{afile}: unexpected adapter key {unexpected[0]} (+{len(unexpected) - 1} more)")

    def _check_adapter_config(self, adir: Path) -> None:
        # Rank and shapes are checked with the tensors; alpha (the scale) and targets are not.
        cfile = adir / "adapter_config.json"
        if not cfile.is_file():
            raise CheckpointError(f"{adir}: no adapter_config.json")
        try:
            saved = json.loads(cfile.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{cfile}: not valid JSON ({exc})") from None
        cur = self.llm.peft_config.get("default")
        if cur is None:
            return
        for key in ("r", "lora_alpha", "target_modules"):
            a, b = saved.get(key), getattr(cur, key, None)
            if isinstance(a, (list, set)) or isinstance(b, (list, set)):
                a, b = sorted(a or []), sorted(b or [])
            if a != b:
                raise CheckpointError(f"{cfile}: {key}={a!r} but the model is built with {key}={b!r} "
                                      f"(llm.options); use the options the adapter was trained with")


def check_state(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} expected {tuple(expected[k].shape)} found {tuple(got[k].shape)}"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

    problems = []
    if shapes:
        problems.append(f"shape mismatch: {names(shapes)}")
    if missing:
        problems.append(f"missing keys: {names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {names(unexpected)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))
