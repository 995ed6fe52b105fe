"""Generate, then decode: the one path from a batch to report texts.

Evaluation (greedy and sampled), the counterfactual attribution, ``diagnose`` and the GRPO
rollouts all call :func:`generate_reports`, so a report is made the same way wherever it is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..answers import answer_set
from ..errors import DataError

__all__ = ["GeneratedReports", "completion_mask", "generate_reports"]


def completion_mask(completion_ids: torch.Tensor, stop_token_ids: int | Sequence[int]) -> torch.Tensor:
    """``[N, T]`` long mask: 1 up to and including the first stop token of each row, 0 after it
    (all 1 for a row without one)."""
    stop = torch.as_tensor(stop_token_ids, device=completion_ids.device).reshape(-1)
    is_stop = torch.isin(completion_ids, stop)
    # Count of stop tokens strictly before each position: 0 means the position is still in the completion.
    before = is_stop.long().cumsum(-1) - is_stop.long()
    return (before == 0).long()


@dataclass
class GeneratedReports:
    """What one :func:`generate_reports` call made.

    ``prompt_ids``/``prompt_mask``: the left-padded prompts ``[n, P]`` that were generated from;
    ``index``: which of the batch's prompts they are (all unless ``max_prompt_length`` dropped some);
    ``completion_ids``: the new tokens ``[n * G, T]`` (a prompt's ``G`` rows adjacent; the stop token
    kept, then padding); ``texts``: each row decoded, cut at its first stop token.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    index: torch.Tensor
    completion_ids: torch.Tensor
    texts: list[str]

    def answer_sets(self) -> list[frozenset[str] | None]:
        """The disease set of each report's ``<answer>`` block (None: no answer block)."""
        return [answer_set(t) for t in self.texts]


@torch.no_grad()
def generate_reports(model: Any, processor: Any, batch: Mapping[str, Any], *, max_new_tokens: int,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                     num_return_sequences: int = 1, logits_processor: Sequence[Any] | None = None,
                     max_prompt_length: int | None = None, length_option: str = "max_prompt_length",
                     prompts: Sequence[str] | None = None) -> GeneratedReports:
    """Reports for a collated ``batch`` (``prompts``, ``ids``, ``modality_mask``, ``modality_inputs``,
    ``modality_features``) with ``model.generate`` and the processor's prompts, stops and padding.

    ``max_prompt_length``: a longer prompt is a :class:`DataError` naming ``length_option`` (a prompt
    is never cut: that could drop a placeholder). ``prompts``: instead of the batch's. The
    train/eval mode is the caller's.
    """
    n = len(prompts if prompts is not None else batch["prompts"])
    feats = processor(batch, answers=False, max_length=max_prompt_length, prompts=prompts)
    if feats["index"].numel() != n:
        raise DataError(f"{n - feats['index'].numel()} prompt(s) over {length_option}={max_prompt_length}; "
                        f"raise it (prompts are never cut: that could drop a placeholder)")
    extra = {"logits_processor": list(logits_processor)} if logits_processor else {}
    device = model.device
    new = model.generate(feats["input_ids"].to(device), feats["attention_mask"].to(device),
                         modality_mask=feats["modality_mask"], modality_inputs=feats["modality_inputs"],
                         modality_features=feats["modality_features"], do_sample=do_sample, temperature=temperature,
                         top_p=top_p, top_k=top_k, num_return_sequences=num_return_sequences,
                         max_new_tokens=max_new_tokens, eos_token_id=processor.stop_token_ids,
                         pad_token_id=processor.pad_token_id, **extra)
    return GeneratedReports(feats["input_ids"], feats["attention_mask"], feats["index"], new, processor.decode(new))
