"""The multimodal model: encoders -> projectors -> fusion -> placeholder tokens of a LoRA LLM.

In the manner of transformers' ``LlavaForConditionalGeneration``.  Per modality ``m`` present in
a sample the frozen encoder gives features ``[N, C]`` (or cached features are passed in), its
trainable head pools them to ``[K, pooled_dim]`` and the projector maps them to ``[K, D]``
(:meth:`~MedTVTForConditionalGeneration.get_modality_features`).  A batch's modalities are
stacked as ``[B, M, K, D]`` (absent modalities are zero and masked), fused (the identity in PT,
which has no MPL), counted against the placeholder positions of the prompt and written there
with one ``masked_scatter``.

This file does modelling only: building the parts from the plugin registry, embedding, the
forward pass (loss on answer tokens; ``logits_to_keep`` for GRPO's completion log-probs) and
KV-cached generation.  Stages (which parameters train) are in :mod:`.stages`, file formats in
:mod:`.serialization`, text and readers in :mod:`.processing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..build import build_encoder, build_fusion, build_llm_plugin
from ..contracts import IdentityFusion
from ..errors import ConfigError, DataError
from ..plugin_calls import encode_checked
from ..plugins import Catalog
from .configuration import MedTVTConfig
from .projector import DenseProjector, FeatureStandardizer
from .serialization import load_model, save_model

__all__ = ["MedTVTPreTrainedModel", "MedTVTForConditionalGeneration", "MedTVTOutput",
           "position_ids_from_mask"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: a left-padded prompt gets the positions transformers'
    ``generate`` gives it, and right padding keeps ``0..n-1``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class MedTVTOutput(ModelOutput):
    """``loss`` (None without labels), ``logits [B, L or logits_to_keep, V]``, ``modality_weights [B, M]``
    (None when the fusion weighs no modality, e.g. ``none`` or the PT stage)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    modality_weights: torch.Tensor | None = None


class MedTVTPreTrainedModel(PreTrainedModel):
    config_class = MedTVTConfig
    base_model_prefix = "medtvt"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Every part is initialised by the plugin that builds it (seeded), or loaded from its
        # checkpoint; re-initialising here would overwrite pretrained encoder and LLM weights.
        pass

    # Activation checkpointing is the LLM's (the llm plugin's gradient_checkpointing option): calls on
    # the composite model (TRL pauses it around generation) go to the LM, non-reentrant by default,
    # since reentrant checkpointing would stop gradients at LoRA inputs that do not require grad.
    def _lm(self) -> Any:
        llm = self.llm
        return llm.get_base_model() if hasattr(llm, "get_base_model") else llm

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        lm = self._lm()
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs or {"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        lm = self._lm()
        (getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable)()

    activation_checkpointing_enable = gradient_checkpointing_enable
    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        lm = self._lm()
        return bool(getattr(lm, "is_activation_checkpointing", None) if hasattr(lm, "is_activation_checkpointing")
                    else lm.is_gradient_checkpointing)

    is_activation_checkpointing = is_gradient_checkpointing

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        # transformers maps the LM's tied keys by the LM's own module paths, which the peft wrapper
        # moves; the LM ties its own weights (relative to itself) instead.
        llm = getattr(self, "llm", None)
        if llm is not None:
            base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
            base.tie_weights()


class MedTVTForConditionalGeneration(MedTVTPreTrainedModel):
    """Encoders + projectors + fusion + peft LLM, all built from ``config`` through the plugin registry.

    ``catalog``: the plugin catalog (default: the installed plugins); ``seed``: initial state of
    the fusion layer (``None``: the global RNG).  Load a saved model with :meth:`from_pretrained`.
    """

    def __init__(self, config: MedTVTConfig, *, catalog: Catalog | None = None, seed: int | None = None):
        super().__init__(config)
        missing = [m for m in config.modalities
                   if m not in config.encoders or m not in config.placeholder_token_ids]
        if missing:
            raise ConfigError(f"model config: no encoder or placeholder token for modality {', '.join(missing)}")
        if config.text_config is None:
            raise ConfigError("model config: text_config (the LLM's config) is missing")
        k = config.tokens_per_modality
        self.encoders = nn.ModuleDict({m: build_encoder(m, config.encoders[m], k, catalog) for m in config.modalities})
        for enc in self.encoders.values():
            enc.backbone_eval()  # modules start in train mode; a frozen backbone's BatchNorm must not
        self.llm_plugin = build_llm_plugin(config.llm, catalog)  # the plugin (a factory), not a module
        self.llm = self.llm_plugin.build_model(config.text_config, adapter=not config.lora_merged)
        d = int(config.text_config.hidden_size)
        proj = config.projector
        norm = proj["normalize_input"]  # true / false, or the modalities to normalise (the reference: cxr, lab)
        self.projectors = nn.ModuleDict({
            m: DenseProjector(self.encoders[m].pooled_dim, d, blocks=int(proj["blocks"]),
                              normalize_input=(m in norm) if isinstance(norm, list) else bool(norm))
            for m in config.modalities})
        # Identity until fitted (projector.standardize_features); saved with the projectors.
        self.feature_norms = nn.ModuleDict({m: FeatureStandardizer(int(self.encoders[m].feature_shape[-1]))
                                            for m in config.modalities})
        self.fusion = build_fusion(config.fusion, d, len(config.modalities), seed, catalog,
                                   modality_names=list(config.modalities))
        self.no_fusion = IdentityFusion(d, len(config.modalities))
        self.post_init()

    # ---------------------------------------------------------------- info
    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    @property
    def placeholder_ids(self) -> dict[str, int]:
        return dict(self.config.placeholder_token_ids)

    @property
    def hidden_size(self) -> int:
        return int(self.llm.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def replace_fusion(self, fusion: Mapping[str, Any], seed: int | None, catalog: Catalog | None = None) -> None:
        """Build a new fusion layer ``{"name", "options"}`` in place of the current one (an ablation
        variant that reuses another variant's PT stage, which never ran the fusion)."""
        self.fusion = build_fusion(fusion, self.hidden_size, len(self.modalities), seed, catalog,
                                   modality_names=self.modalities).to(self.device)
        self.config.fusion = {"name": fusion["name"], "options": dict(fusion.get("options") or {})}

    # ---------------------------------------------------------------- modality tokens
    def get_modality_features(self, name: str, inputs: torch.Tensor | None = None,
                              features: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, K, D]`` projected tokens of modality ``name`` from raw ``inputs`` (encoded frozen) or
        cached frozen ``features [n, N, C]``; a one-token encoder's token fills all ``K`` slots."""
        enc = self.encoders[name]
        if features is None:
            if inputs is None:
                raise DataError(f"modality {name!r}: neither inputs nor features given")
            features = encode_checked(enc, inputs)  # an encoder's failure names it (one line)
        else:
            want = tuple(enc.feature_shape)
            if tuple(features.shape[1:]) != want:
                raise DataError(f"modality {name!r}: cached features have shape {tuple(features.shape[1:])} per sample, "
                                f"encoder {type(enc).__name__} gives {want}; rebuild the feature cache")
        tokens = self.projectors[name](enc.pool(self.feature_norms[name](features)))
        k = self.config.tokens_per_modality
        if tokens.shape[1] != k:
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
        fusion = self.fusion if self.config.uses_fusion else self.no_fusion
        out = fusion(tokens, mask)
        return out.tokens, out.weights

    def embed(self, input_ids: torch.Tensor, modality_mask: torch.Tensor | None = None,
              modality_inputs: Mapping[str, torch.Tensor] | None = None,
              modality_features: Mapping[str, torch.Tensor] | None = None, *, rows_per_sample: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input embeddings ``[B * G, L, D]`` with modality tokens at the placeholder positions, and
        the modality weights ``[B, M]``.

        The modality arguments describe ``B`` samples; ``input_ids`` has ``G = rows_per_sample``
        consecutive rows per sample (G completions of one prompt share its modality tokens, which
        are computed once).  ``modality_mask`` None: every modality given is present everywhere.
        """
        g = int(rows_per_sample)
        rows = input_ids.shape[0]
        if g < 1 or rows % g:
            raise DataError(f"{rows} rows of input_ids is not a multiple of rows_per_sample={g}")
        b = rows // g
        if modality_mask is None:
            given = set(modality_inputs or {}) | set(modality_features or {})
            modality_mask = torch.tensor([m in given for m in self.modalities], dtype=torch.bool).expand(b, -1)
        if modality_mask.shape[0] != b:
            raise DataError(f"modality_mask has {modality_mask.shape[0]} rows for {b} samples "
                            f"({rows} input rows, {g} per sample)")
        ids = input_ids.to(self.device)
        mask = modality_mask.to(self.device, torch.bool)
        k = self.config.tokens_per_modality
        ph = torch.tensor([self.config.placeholder_token_ids[m] for m in self.modalities], device=ids.device)
        onehot = ids.unsqueeze(-1) == ph  # [B*G, L, M]
        counts = onehot.sum(1)  # [B*G, M]
        expected = mask.long().repeat_interleave(g, 0) * k
        bad = (counts != expected).nonzero()
        if len(bad):
            bi, j = (int(x) for x in bad[0])
            m = self.modalities[j]
            raise DataError(
                f"row {bi}: {int(counts[bi, j])} {self.config.placeholders[m]} placeholder token(s) in input_ids "
                f"but {int(expected[bi, j])} {m} feature token(s) (modality "
                f"{'present' if mask[bi // g, j] else 'absent'}, K={k}); expand each placeholder K times "
                f"(MedTVTProcessor) and mark absent modalities in modality_mask")
        embeds = self.llm.get_input_embeddings()(ids)
        tokens, weights = self.modality_tokens(mask, modality_inputs, modality_features)
        pos = onehot.any(-1)  # [B*G, L]
        if pos.any():
            # Placeholder positions in row-major order; for each, its sample, modality and rank k
            # among that modality's K copies -> one gather and one masked_scatter for the batch.
            rank = onehot.long().cumsum(1) - 1  # [B*G, L, M]
            m_idx = onehot.long().argmax(-1)[pos]
            k_idx = rank[pos].gather(-1, m_idx.unsqueeze(-1)).squeeze(-1)
            b_idx = pos.nonzero()[:, 0] // g
            src = tokens[b_idx, m_idx, k_idx].to(embeds.dtype)
            embeds = embeds.masked_scatter(pos.unsqueeze(-1), src)
        return embeds, weights

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                modality_mask: torch.Tensor | None = None, modality_inputs: Mapping[str, torch.Tensor] | None = None,
                modality_features: Mapping[str, torch.Tensor] | None = None, *, logits_to_keep: int = 0,
                rows_per_sample: int = 1, num_items_in_batch: torch.Tensor | int | None = None,
                **kwargs: Any) -> MedTVTOutput:
        """Logits (of the last ``logits_to_keep`` positions when > 0); with ``labels`` (-100 = ignored)
        the next-token cross-entropy of transformers' ``ForCausalLMLoss``: summed over the answer
        tokens and divided by ``num_items_in_batch`` when given (the Trainer's count over the whole
        accumulation window and all processes), else averaged."""
        from transformers.loss.loss_utils import ForCausalLMLoss

        embeds, weights = self.embed(input_ids, modality_mask, modality_inputs, modality_features,
                                     rows_per_sample=rows_per_sample)
        am = attention_mask.to(self.device)
        out = self.llm(inputs_embeds=embeds, attention_mask=am, position_ids=position_ids_from_mask(am),
                       use_cache=False, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ConfigError("forward: labels need the logits of every position (logits_to_keep=0)")
            loss = ForCausalLMLoss(out.logits.float(), labels.to(out.logits.device), self.llm.config.vocab_size,
                                   num_items_in_batch=num_items_in_batch)
        return MedTVTOutput(loss=loss, logits=out.logits, modality_weights=weights)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modality_mask: torch.Tensor | None = None,
                 modality_inputs: Mapping[str, torch.Tensor] | None = None,
                 modality_features: Mapping[str, torch.Tensor] | None = None, *, num_return_sequences: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                 max_new_tokens: int = 64, min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, use_cache: bool = True, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids ``[B * G, T]`` (rows of one prompt adjacent; the stop token kept, then padding).

        Modality embeddings are computed once per prompt; transformers ``generate`` runs on
        ``inputs_embeds`` with the KV cache and expands each prompt ``G = num_return_sequences``
        times.  ``eos_token_id``/``pad_token_id`` default to the LLM config's (pass the processor's
        ``stop_token_ids``/``pad_token_id``).  The train/eval mode is the caller's.
        """
        from transformers import GenerationConfig

        am = attention_mask.to(self.device)
        if (am[:, -1] == 0).any():
            raise DataError("generation needs LEFT-padded prompts (the last position of every row must be a real "
                            "token); build them with the processor: processor(batch, answers=False)")
        embeds, _ = self.embed(input_ids, modality_mask, modality_inputs, modality_features)
        g = int(num_return_sequences)
        if g < 1:
            raise ConfigError(f"num_return_sequences must be >= 1, got {g}")
        if not do_sample and g > 1:
            # transformers refuses G > 1 for greedy search; every copy would be the same anyway.
            embeds, am, g = embeds.repeat_interleave(g, 0), am.repeat_interleave(g, 0), 1
        tc = self.llm.config
        eos = tc.eos_token_id if eos_token_id is None else eos_token_id
        pad = (tc.pad_token_id if tc.pad_token_id is not None else eos if isinstance(eos, int) else eos[0]) \
            if pad_token_id is None else pad_token_id
        # A placeholder is an input slot, never text: the model must not write one (it would also break
        # scoring the completion, whose placeholders must match the modality tokens).
        gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                   num_return_sequences=g, eos_token_id=eos, pad_token_id=pad, bos_token_id=tc.bos_token_id,
                   use_cache=use_cache, suppress_tokens=sorted(self.config.placeholder_token_ids.values()),
                   # Explicit neutral values: generate() fills every unset (None) field from the LLM's own
                   # generation_config (e.g. a hub repetition_penalty), which would make rollouts come from
                   # another distribution than the one the GRPO loss scores (TRL sets these too).
                   repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_repetition_penalty=1.0)
        if do_sample:  # passed only when sampling: transformers warns about unused sampling options
            gen.update(temperature=temperature, top_p=top_p, top_k=top_k or 0,
                       typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
        config = GenerationConfig(**gen)
        # Generation options (e.g. output_logits) go into the config; the rest are model inputs.
        model_kwargs = config.update(**generate_kwargs)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=am, generation_config=config, **model_kwargs)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: Any, *, is_main_process: bool = True,
                        state_dict: Mapping[str, torch.Tensor] | None = None, **_: Any) -> None:
        """Write ``config.json`` and ``model.safetensors`` (every weight that cannot be rebuilt from a
        file the user named; those files are referenced by path and SHA-256): see :mod:`.serialization`."""
        if is_main_process:
            save_model(self, save_directory, state_dict=state_dict)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, catalog: Catalog | None = None,
                        device_map: Any = None, dtype: Any = None, **kwargs: Any) -> "MedTVTForConditionalGeneration":
        """Load a saved model directory (local only): plugins from ``catalog`` (default: installed),
        referenced weight files checked, every saved tensor loaded strictly.  ``device_map``: a
        device for the whole model (``"cpu"``, ``"cuda"``); ``dtype``: a floating dtype to cast to."""
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments")
        return load_model(cls, pretrained_model_name_or_path, catalog=catalog, device=device_map,
                          dtype=dtype if dtype is not None else kwargs.get("torch_dtype"))
