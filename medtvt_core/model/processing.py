"""``MedTVTProcessor``: read samples -> the model's batch, and the modality readers of a model.

Like a transformers processor (tokenizer + image processor), its call turns what was read (a
dataset's collated batch, or one patient's command-line inputs read by :meth:`read_patient`) into
the model's batch, for training, evaluation, attribution, GRPO and ``diagnose`` alike; it is saved
next to the model (``save_pretrained``: the tokenizer files and ``processor_config.json``) and holds:

* the tokenizer (with one special token per modality placeholder, e.g. ``<ecg>``);
* the modality readers (:class:`~medtvt_core.contracts.ModalityReader` plugins) with their options and
  training-split statistics (lab mean percentiles), so a saved model reads new inputs exactly as
  its training data were read, without the data directory;
* the prompt format:

  - ``"reference"`` (the reference code): ``BOS + question`` is the prompt, ``" " + answer`` plus the
    answer end token (``<|end_of_text|>`` for LLaMA-3; default: the tokenizer's EOS) is the target;
  - ``"chat"``: the tokenizer's chat template on one user turn (generation prompt added), with
    fixed template variables (``chat_template_kwargs``; the default pins LLaMA-3's ``date_string``,
    which would otherwise be today's date); without a template ``"User: {q}\\nAssistant: "``.

Each placeholder is expanded into ``K`` copies (one per modality token the model scatters there).
Training features: right padding, ``labels = -100`` on prompt and padding, the answer plus its end
token trained; the answer is cut on the right to ``max_length``, the prompt never (so no
placeholder is ever cut): a prompt that leaves no room raises :class:`DataError` or, with
``on_overflow="drop"``, drops the sample and reports it in ``index``.  Generation features: LEFT
padding, as batched decoder-only generation needs.
"""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from ..build import build_readers
from ..data.dataset import absent_text, read_input
from ..errors import CheckpointError, ConfigError, DataError
from ..io import atomic_write_text
from ..plugins import Catalog

__all__ = ["MedTVTProcessor", "PLAIN_TEMPLATE", "IGNORE_INDEX", "PROCESSOR_CONFIG", "FIXED_CHAT_DATE",
           "subset_modalities", "pad_sequences"]

PLAIN_TEMPLATE = "User: {q}\nAssistant: "
IGNORE_INDEX = -100
PROCESSOR_CONFIG = "processor_config.json"
#: LLaMA-3 chat templates print "Today Date: <date_string>", by default the current date: a
#: prompt must not change from one day to the next, so the date is pinned.
FIXED_CHAT_DATE = "26 Jul 2024"
PromptFormat = Literal["reference", "chat"]


def pad_sequences(seqs: Sequence[torch.Tensor], value: int, *, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [n, L], mask [n, L])`` of 1-D sequences padded with ``value`` on the ``side``."""
    if not seqs:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return empty, empty.clone()
    lens = torch.tensor([len(s) for s in seqs])
    width = int(lens.max())
    pos = torch.arange(width)[None, :]
    # Real tokens sit at [0, len) for right padding, at [width-len, width) for left padding.
    start = (width - lens)[:, None] if side == "left" else torch.zeros_like(lens)[:, None]
    mask = (pos >= start) & (pos < start + lens[:, None])
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    out[mask] = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs])  # row-major == concatenation order
    return out, mask.long()


class MedTVTProcessor:
    """Builds ``input_ids / attention_mask / labels`` with placeholders expanded ``K`` times.

    ``placeholders``: modality -> placeholder text (each one token of ``tokenizer``).
    ``readers``: modality -> reader (needed to read inputs; optional for text-only use).
    ``answer_end_token``: the token that ends an answer (default: the tokenizer's EOS).
    ``default_question``, ``max_new_tokens``: what ``medtvt diagnose`` uses when the caller gives none.
    """

    def __init__(self, tokenizer: Any, placeholders: Mapping[str, str], tokens_per_modality: int = 1, *,
                 readers: Mapping[str, Any] | None = None, prompt_format: PromptFormat = "chat",
                 answer_end_token: str | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
                 default_question: str | None = None, max_new_tokens: int = 600,
                 on_overflow: Literal["error", "drop"] = "error"):
        if tokens_per_modality < 1:
            raise ConfigError(f"tokens_per_modality must be >= 1, got {tokens_per_modality}")
        if on_overflow not in ("error", "drop"):
            raise ConfigError(f"on_overflow must be 'error' or 'drop', got {on_overflow!r}")
        if prompt_format not in ("reference", "chat"):
            raise ConfigError(f"prompt format {prompt_format!r}; allowed: reference, chat")
        self.tokenizer = tokenizer
        self.placeholders = dict(placeholders)
        self.tokens_per_modality = int(tokens_per_modality)
        self.readers = dict(readers or {})
        self.prompt_format: PromptFormat = prompt_format
        self.chat_template_kwargs = {"date_string": FIXED_CHAT_DATE, **dict(chat_template_kwargs or {})}
        self.default_question = default_question
        self.max_new_tokens = int(max_new_tokens)
        self.on_overflow = on_overflow
        self.use_chat_template = prompt_format == "chat" and bool(getattr(tokenizer, "chat_template", None))
        self.placeholder_ids: dict[str, int] = {}
        for m, text in self.placeholders.items():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f"placeholder {text!r} of modality {m!r} is {len(ids)} tokens, not one; "
                                  f"add it to the tokenizer as a special token")
            self.placeholder_ids[m] = int(ids[0])
        self._ph = torch.tensor(sorted(self.placeholder_ids.values()), dtype=torch.long)
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; answers cannot be terminated")
        self.answer_end_token = answer_end_token or tokenizer.eos_token
        end = tokenizer.convert_tokens_to_ids(self.answer_end_token)
        if end is None or end == tokenizer.unk_token_id:
            raise ConfigError(f"prompt.answer_end_token: answer end token {self.answer_end_token!r} is not a token of "
                              f"the tokenizer; set a token it has, or null for its EOS {tokenizer.eos_token!r}")
        self.eos_token_id = int(end)  # what ends an answer in training, and generation
        #: Generation stops at the answer end token or the tokenizer's EOS.
        self.stop_token_ids = list(dict.fromkeys([self.eos_token_id, int(tokenizer.eos_token_id)]))
        if prompt_format == "reference" and tokenizer.bos_token is None:
            raise ConfigError("prompt format 'reference' starts the prompt with BOS, but the tokenizer has none")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id

    # ---------------------------------------------------------------- text -> ids
    def prompt_text(self, question: str) -> str:
        """The prompt string that precedes the answer (BOS included for ``reference``)."""
        if self.prompt_format == "reference":
            return self.tokenizer.bos_token + question
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True,
                **self.chat_template_kwargs)
        return PLAIN_TEMPLATE.format(q=question)

    def prompt_ids(self, questions: Sequence[str]) -> list[torch.Tensor]:
        """Token ids of each prompt, placeholders expanded to ``K`` copies."""
        texts = [self.prompt_text(q) for q in questions]
        # The reference prompt and a chat template write BOS themselves; the plain template relies on
        # the tokenizer adding it.
        add = self.prompt_format == "chat" and not self.use_chat_template
        ids = self.tokenizer(texts, add_special_tokens=add)["input_ids"]
        return self._expand(ids)

    def answer_ids(self, answers: Sequence[str]) -> list[torch.Tensor]:
        """Token ids of each answer followed by the answer end token (no placeholder allowed)."""
        texts = [" " + a for a in answers] if self.prompt_format == "reference" else list(answers)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for i, a in enumerate(ids):
            t = torch.tensor(a + [self.eos_token_id], dtype=torch.long)
            if torch.isin(t, self._ph).any():
                raise DataError(f"answer {i}: contains a modality placeholder {sorted(self.placeholders.values())}; "
                                f"placeholders belong in the question")
            out.append(t)
        return out

    def _expand(self, ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        # One repeat_interleave over the whole batch, then split back per sample.
        lens = torch.tensor([len(x) for x in ids], dtype=torch.long)
        flat = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
        reps = torch.where(torch.isin(flat, self._ph), self.tokens_per_modality, 1)
        seg = torch.repeat_interleave(torch.arange(len(ids)), lens)
        new_lens = torch.zeros(len(ids), dtype=torch.long).index_add_(0, seg, reps)
        return list(flat.repeat_interleave(reps).split(new_lens.tolist()))

    # ---------------------------------------------------------------- features
    def _overflow(self, i: int, ids: Sequence[Any] | None, what: str) -> None:
        name = f"sample {i}" + (f" (id {ids[i]})" if ids is not None else "")
        if self.on_overflow == "error":
            raise DataError(f"{name}: {what}; prompts are never truncated (that could cut a placeholder): "
                            f"raise max_length or set on_overflow='drop'")

    def train_features(self, prompts: Sequence[str], answers: Sequence[str], max_length: int | None = None, *,
                       ids: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids, attention_mask, labels [n, L]`` and ``index [n]`` (kept samples)."""
        if len(prompts) != len(answers):
            raise DataError(f"{len(prompts)} prompts but {len(answers)} answers")
        p_ids, a_ids = self.prompt_ids(prompts), self.answer_ids(answers)
        seqs, labels, keep = [], [], []
        for i, (p, a) in enumerate(zip(p_ids, a_ids)):
            if max_length is not None:
                if len(p) >= max_length:
                    self._overflow(i, ids, f"prompt is {len(p)} tokens, leaving no room for the answer "
                                           f"within max_length={max_length}")
                    continue
                a = a[: max_length - len(p)]
            seqs.append(torch.cat([p, a]))
            labels.append(torch.cat([torch.full_like(p, IGNORE_INDEX), a]))
            keep.append(i)
        input_ids, mask = pad_sequences(seqs, self.pad_token_id, side="right")
        lab, _ = pad_sequences(labels, IGNORE_INDEX, side="right")
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab,
                "index": torch.tensor(keep, dtype=torch.long)}

    def generation_features(self, prompts: Sequence[str], max_length: int | None = None, *,
                            ids: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        """Left-padded prompt ``input_ids, attention_mask [n, L]`` and ``index [n]`` (kept samples)."""
        seqs, keep = [], []
        for i, p in enumerate(self.prompt_ids(prompts)):
            if max_length is not None and len(p) > max_length:
                self._overflow(i, ids, f"prompt is {len(p)} tokens > max_length={max_length}")
                continue
            seqs.append(p)
            keep.append(i)
        input_ids, mask = pad_sequences(seqs, self.pad_token_id, side="left")
        return {"input_ids": input_ids, "attention_mask": mask, "index": torch.tensor(keep, dtype=torch.long)}

    # ---------------------------------------------------------------- the model's batch
    def __call__(self, batch: Mapping[str, Any], *, answers: bool, max_length: int | None = None,
                 prompts: Sequence[str] | None = None) -> dict[str, Any]:
        """The model's batch from a batch of read samples (the dataset's collator or :meth:`read_patient`:
        ``prompts``, ``answers``, ``ids``, ``modality_names``, ``modality_mask``, ``modality_inputs``,
        ``modality_features``), like a transformers processor's call.

        ``answers=True``: :meth:`train_features` (right padding, answer-only labels); ``False``:
        :meth:`generation_features` (left padding). ``prompts``: instead of the batch's. ``index``: the
        samples kept (``max_length`` with ``on_overflow="drop"`` may drop some); the modality tensors are
        the kept samples' rows.
        """
        texts = list(prompts if prompts is not None else batch["prompts"])
        ids = batch.get("ids")
        feats = (self.train_features(texts, batch["answers"], max_length, ids=ids) if answers
                 else self.generation_features(texts, max_length, ids=ids))
        keep = feats["index"]
        mask, inputs, features = batch["modality_mask"], batch["modality_inputs"], batch["modality_features"]
        if keep.numel() != len(texts):
            names = batch["modality_names"]
            inputs = subset_modalities(mask, inputs, names, keep)
            features = subset_modalities(mask, features, names, keep)
            mask = mask[keep]
        return {**feats, "modality_mask": mask, "modality_inputs": inputs, "modality_features": features}

    def read_patient(self, inputs: Mapping[str, tuple[str, Mapping[str, str]]], question: str | None = None, *,
                     modalities: Sequence[str]) -> dict[str, Any]:
        """The batch of one patient, read through the readers: ``inputs`` maps modality -> (value, extra
        options) as given on the command line; ``modalities`` are the model's, in order; an absent one is
        masked and its placeholder replaced by :func:`~medtvt_core.data.dataset.absent_text`."""
        unknown = [m for m in inputs if m not in modalities]
        if unknown:
            raise ConfigError(f"--{unknown[0]}: the model has no {unknown[0]} modality "
                              f"(modalities: {', '.join(modalities)})")
        if not inputs:
            raise ConfigError("give at least one input: " + ", ".join(f"--{m}" for m in modalities))
        q = question or self.default_question
        if not q:
            raise ConfigError("the model holds no default question; pass --question with the placeholders "
                              + ", ".join(self.placeholders[m] for m in modalities))
        mask = torch.zeros(1, len(modalities), dtype=torch.bool)
        tensors: dict[str, torch.Tensor] = {}
        for j, m in enumerate(modalities):
            ph = self.placeholders[m]
            if m not in inputs:
                q = q.replace(ph, absent_text(m))
                continue
            if q.count(ph) != 1:
                raise ConfigError(f"--question must hold the placeholder {ph} once for the given --{m} input")
            value, extras = inputs[m]
            try:
                reader, root, ref = self.readers[m].for_input(value, dict(extras))
            except ValueError as exc:
                raise ConfigError(f"--{m}: {exc}") from None
            mask[0, j] = True
            tensors[m] = read_input(reader, ref, root=root, train=False, what=f"--{m} {value}").unsqueeze(0)
        return {"prompts": [q], "ids": None, "modality_names": list(modalities), "modality_mask": mask,
                "modality_inputs": tensors, "modality_features": {}}

    # ---------------------------------------------------------------- decoding
    def decode(self, token_ids: torch.Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Completion texts, each cut at its first stop token (excluded)."""
        rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [list(r) for r in token_ids]
        stops = set(self.stop_token_ids)
        cut = [r[: next((i for i, t in enumerate(r) if t in stops), len(r))] for r in rows]
        return self.tokenizer.batch_decode(cut, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- save / load
    def to_dict(self) -> dict[str, Any]:
        readers = {}
        for m, r in self.readers.items():
            readers[m] = {"name": getattr(r, "name", m), "options": json.loads(r.config.model_dump_json()),
                          "stats": r.stats}
        return {"processor_class": type(self).__name__, "placeholders": self.placeholders,
                "tokens_per_modality": self.tokens_per_modality, "prompt_format": self.prompt_format,
                "answer_end_token": self.answer_end_token, "chat_template_kwargs": self.chat_template_kwargs,
                "default_question": self.default_question, "max_new_tokens": self.max_new_tokens,
                "readers": readers}

    def save_pretrained(self, save_directory: str | os.PathLike[str], **_: Any) -> None:
        """Write the tokenizer files and ``processor_config.json`` into ``save_directory``."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(d))
        atomic_write_text(d / PROCESSOR_CONFIG, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *, catalog: Catalog | None = None) -> "MedTVTProcessor":
        """The processor saved in ``directory``; its readers come from the installed plugins."""
        from transformers import AutoTokenizer

        d = Path(directory)
        f = d / PROCESSOR_CONFIG
        if not f.is_file():
            raise CheckpointError(f"{d}: no {PROCESSOR_CONFIG}; not a saved medtvt model")
        try:
            meta = json.loads(f.read_text())
            specs = meta["readers"]
            names = list(specs)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{f}: malformed ({type(exc).__name__}: {exc})") from None
        try:
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{d}: tokenizer cannot be loaded: {exc}".replace("\n", " ")) from None
        readers = build_readers(names, {m: specs[m].get("options", {}) for m in names}, catalog,
                                plugin_names={m: specs[m].get("name", m) for m in names}, where=str(f))
        for m, r in readers.items():
            if specs[m].get("stats"):
                r.set_stats(specs[m]["stats"])
        return cls(tok, meta["placeholders"], meta["tokens_per_modality"], readers=readers,
                   prompt_format=meta.get("prompt_format", "chat"), answer_end_token=meta.get("answer_end_token"),
                   chat_template_kwargs=meta.get("chat_template_kwargs"), default_question=meta.get("default_question"),
                   max_new_tokens=meta.get("max_new_tokens", 600))


def subset_modalities(modality_mask: torch.Tensor, tensors: Mapping[str, torch.Tensor] | None, names: Sequence[str],
                      keep: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Rows of the samples ``keep`` from modality tensors that hold rows of present samples only.

    ``modality_mask [B, M]`` (columns in ``names`` order) says which samples have rows; the
    mask of the kept samples is simply ``modality_mask[keep]``.  ``None`` stays ``None``.
    """
    if tensors is None:
        return None
    keep = keep.to(modality_mask.device)
    out: dict[str, torch.Tensor] = {}
    for j, m in enumerate(names):
        if m not in tensors:
            continue
        present = modality_mask[:, j]
        row_of = present.long().cumsum(0) - 1  # row of sample b in the compact tensor (when present)
        rows = row_of[keep][present[keep]]
        out[m] = tensors[m][rows.to(tensors[m].device)]
    return out
