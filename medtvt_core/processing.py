"""Text side of a batch: prompts, placeholder expansion, labels, padding.

:class:`MedTVTProcessor` turns (question, answer) texts into LLM inputs:

* the prompt is the tokenizer's chat template applied to one user turn (generation prompt
  added) when the tokenizer has a template, else ``"User: {q}\\nAssistant: "`` (BOS added by
  the tokenizer when it adds one);
* each modality placeholder token (``<ecg>``) is expanded into ``K`` copies, one per modality
  token the model will scatter there;
* training features: right padding, ``labels = -100`` on prompt and padding, the answer plus EOS
  trained; the answer is truncated on the right to ``max_length``, the prompt never (so no
  placeholder is ever cut): a prompt that leaves no room raises :class:`DataError` or, with
  ``on_overflow="drop"``, drops the sample and reports it in ``index``;
* generation features: LEFT padding, as batched decoder-only generation needs.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Literal, Mapping, Sequence

import torch

from .errors import ConfigError, DataError

__all__ = ["MedTVTProcessor", "PLAIN_TEMPLATE", "IGNORE_INDEX", "subset_modalities", "completion_mask"]

PLAIN_TEMPLATE = "User: {q}\nAssistant: "
IGNORE_INDEX = -100


class MedTVTProcessor:
    """Builds ``input_ids / attention_mask / labels`` with placeholders expanded ``K`` times.

    ``placeholders``: modality name -> placeholder token text (each one token of ``tokenizer``).
    ``tokens_per_modality``: ``K`` copies per placeholder.
    ``use_chat_template``: None = use it when the tokenizer has one.
    ``chat_template_kwargs``: extra variables for the template (e.g. a fixed ``date_string``).
    ``on_overflow``: ``"error"`` or ``"drop"`` for a prompt longer than the length limit.
    """

    def __init__(self, tokenizer: Any, placeholders: Mapping[str, str], tokens_per_modality: int = 1, *,
                 use_chat_template: bool | None = None, plain_template: str = PLAIN_TEMPLATE,
                 chat_template_kwargs: Mapping[str, Any] | None = None,
                 on_overflow: Literal["error", "drop"] = "error"):
        if tokens_per_modality < 1:
            raise ConfigError(f"tokens_per_modality must be >= 1, got {tokens_per_modality}")
        if on_overflow not in ("error", "drop"):
            raise ConfigError(f"on_overflow must be 'error' or 'drop', got {on_overflow!r}")
        if "{q}" not in plain_template:
            raise ConfigError(f"plain_template must contain '{{q}}', got {plain_template!r}")
        self.tokenizer = tokenizer
        self.placeholders = dict(placeholders)
        self.tokens_per_modality = int(tokens_per_modality)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ConfigError("use_chat_template=True but the tokenizer has no chat template")
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        self.plain_template = plain_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.on_overflow = on_overflow
        self.placeholder_ids: dict[str, int] = {}
        for m, text in self.placeholders.items():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f"placeholder {text!r} of modality {m!r} is {len(ids)} tokens, not one; "
                                  f"add it to the tokenizer as a special token")
            self.placeholder_ids[m] = int(ids[0])
        self._ph = torch.tensor(sorted(self.placeholder_ids.values()), dtype=torch.long)
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; answers cannot be terminated")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id

    # ---------------------------------------------------------------- text -> ids
    def prompt_text(self, question: str) -> str:
        """The prompt string (template applied) that precedes the answer."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True,
                **self.chat_template_kwargs)
        return self.plain_template.format(q=question)

    def prompt_ids(self, questions: Sequence[str]) -> list[torch.Tensor]:
        """Token ids of each prompt, placeholders expanded to ``K`` copies."""
        texts = [self.prompt_text(q) for q in questions]
        # A chat template writes BOS itself; the plain template relies on the tokenizer adding it.
        ids = self.tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"]
        return self._expand(ids)

    def answer_ids(self, answers: Sequence[str]) -> list[torch.Tensor]:
        """Token ids of each answer followed by EOS (placeholders are not allowed in answers)."""
        ids = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
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
        """Right-padded ``input_ids, attention_mask, labels [n, L]`` and ``index [n]`` (kept samples).

        Labels are -100 on prompt and padding; the answer is cut on the right to fit ``max_length``.
        """
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
        return {**self._pad(seqs, side="right", labels=labels), "index": torch.tensor(keep, dtype=torch.long)}

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
        return {**self._pad(seqs, side="left"), "index": torch.tensor(keep, dtype=torch.long)}

    def _pad(self, seqs: list[torch.Tensor], side: str, labels: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if not seqs:
            empty = torch.zeros(0, 0, dtype=torch.long)
            out = {"input_ids": empty, "attention_mask": empty.clone()}
            if labels is not None:
                out["labels"] = empty.clone()
            return out
        lens = torch.tensor([len(s) for s in seqs])
        width = int(lens.max())
        pos = torch.arange(width)[None, :]
        # Real tokens sit at [0, len) for right padding, at [width-len, width) for left padding.
        start = (width - lens)[:, None] if side == "left" else torch.zeros_like(lens)[:, None]
        mask = (pos >= start) & (pos < start + lens[:, None])
        flat = torch.cat(seqs)

        def fill(values: torch.Tensor, pad: int) -> torch.Tensor:
            out = torch.full((len(seqs), width), pad, dtype=torch.long)
            out[mask] = values  # row-major order of mask == concatenation order of seqs
            return out

        res = {"input_ids": fill(flat, self.pad_token_id), "attention_mask": mask.long()}
        if labels is not None:
            res["labels"] = fill(torch.cat(labels), IGNORE_INDEX)
        return res

    # ---------------------------------------------------------------- decoding
    def decode(self, token_ids: torch.Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Completion texts, each cut at its first EOS (EOS excluded)."""
        rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [list(r) for r in token_ids]
        cut = [r[: r.index(self.eos_token_id)] if self.eos_token_id in r else r for r in rows]
        return self.tokenizer.batch_decode(cut, skip_special_tokens=skip_special_tokens)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """``[N, T]`` long mask: 1 up to and including the first EOS of each row, 0 after it."""
    eos = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos)
    # Count of EOS strictly before each position: 0 means the position is still in the completion.
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return (before == 0).long()


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
