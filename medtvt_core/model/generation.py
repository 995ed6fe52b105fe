"""Generate, then decode: the one path from a batch to report texts.

Evaluation (greedy and sampled), the counterfactual attribution, ``diagnose`` and the GRPO
rollouts all call :func:`generate_reports`, so a report is made the same way wherever it is scored.

``constrain=True`` decodes under :data:`REPORT_GRAMMAR` (xgrammar masks, at each step, the tokens
that would break ``<think> ... </think><answer> ... </answer>`` and allows a stop token only after
the answer closes). A report the model writes inside the grammar anyway is unchanged by it; elsewhere
each step takes the model's choice among the allowed tokens (a greedy path, not the most likely
well-formed report). ``diagnose`` uses it by default; evaluation only when asked
(``eval.constrained_decoding``, so the format reward measures the model); GRPO never (its format
reward must see the policy's own mistakes). docs/partial_patients.md.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..answers import answer_set
from ..errors import ConfigError, DataError

__all__ = ["GeneratedReports", "REPORT_GRAMMAR", "compiled_report_grammar", "completion_mask", "generate_reports",
           "report_constraint"]

#: The report format as an xgrammar EBNF grammar: the reference's format rule (docs/method.md, "Rewards":
#: ``<think>.*?</think>\s*<answer>.*?</answer>`` after leading whitespace) with each block's text free of
#: the four tags, and at most 4 whitespace characters before each block (training answers have 0 or 1:
#: unbounded, a weak model could spend its whole budget on blank lines). Inside a block a ``<`` may stand
#: before anything but ``/``, ``t``, ``a`` or another ``<`` ("EF < 40%", "<5 mm" stay writable; a tag
#: cannot start). After ``</answer>`` only a stop token.
REPORT_GRAMMAR = r"""
root ::= ws "<think>" text "</think>" ws "<answer>" text "</answer>"
ws ::= [ \t\r\n]{0,4}
text ::= ([^<] | "<" [^/ta<])*
"""

# tokenizer -> {(vocab size, stop ids): compiled grammar}; compiling walks the vocabulary once (LLaMA-3's
# 128,256 tokens: about a second), so a processor compiles once per process.
_COMPILED: "weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]]" = weakref.WeakKeyDictionary()


def compiled_report_grammar(processor: Any, vocab_size: int) -> Any:
    """:data:`REPORT_GRAMMAR` compiled for the processor's tokenizer (an ``xgrammar.CompiledGrammar``
    whose stop tokens are the processor's ``stop_token_ids``), once per tokenizer. ``vocab_size``: the
    rows of the model's logits (may exceed the tokenizer's length). A tokenizer xgrammar cannot read is
    a :class:`ConfigError`."""
    import xgrammar as xgr

    tok = processor.tokenizer
    key = (int(vocab_size), tuple(processor.stop_token_ids))
    per_tok = _COMPILED.setdefault(tok, {})
    if key not in per_tok:
        try:
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=key[0], stop_token_ids=list(key[1]))
            per_tok[key] = xgr.GrammarCompiler(info).compile_grammar(REPORT_GRAMMAR)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ConfigError(f"the report grammar cannot be compiled for tokenizer {type(tok).__name__} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              f"decode without it (diagnose --unconstrained)") from None
    return per_tok[key]


def report_constraint(processor: Any, vocab_size: int) -> Any:
    """A fresh ``transformers`` logits processor that keeps generation inside :data:`REPORT_GRAMMAR`
    (xgrammar's own ``contrib.hf.LogitsProcessor``; one per ``generate`` call: it holds each row's
    parser state)."""
    from xgrammar.contrib.hf import LogitsProcessor

    if sys.flags.optimize:  # xgrammar's processor advances each row's parser inside an assert statement
        raise ConfigError("constrained decoding does not work under python -O / PYTHONOPTIMIZE (xgrammar's "
                          "processor advances its parser in an assert); run without it, or decode unconstrained")
    return LogitsProcessor(compiled_report_grammar(processor, vocab_size))


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
                     prompts: Sequence[str] | None = None, constrain: bool = False) -> GeneratedReports:
    """Reports for a collated ``batch`` (``prompts``, ``ids``, ``modality_mask``, ``modality_inputs``,
    ``modality_features``) with ``model.generate`` and the processor's prompts, stops and padding.

    ``max_prompt_length``: a longer prompt is a :class:`DataError` naming ``length_option`` (a prompt
    is never cut: that could drop a placeholder). ``prompts``: instead of the batch's. ``constrain``:
    decode under :data:`REPORT_GRAMMAR` (:func:`report_constraint`). The train/eval mode is the caller's.
    """
    n = len(prompts if prompts is not None else batch["prompts"])
    feats = processor(batch, answers=False, max_length=max_prompt_length, prompts=prompts)
    if feats["index"].numel() != n:
        raise DataError(f"{n - feats['index'].numel()} prompt(s) over {length_option}={max_prompt_length}; "
                        f"raise it (prompts are never cut: that could drop a placeholder)")
    # The grammar masks first: a custom sampler given here (SeededRowSampler) then draws among allowed tokens.
    # the logits' width: the LLM config's vocabulary (the embedding's shape is empty under ZeRO-3)
    procs = [report_constraint(processor, int(model.config.text_config.vocab_size))] if constrain else []
    procs += list(logits_processor or [])
    extra = {"logits_processor": procs} if procs else {}
    device = model.device
    new = model.generate(feats["input_ids"].to(device), feats["attention_mask"].to(device),
                         modality_mask=feats["modality_mask"], modality_inputs=feats["modality_inputs"],
                         modality_features=feats["modality_features"], do_sample=do_sample, temperature=temperature,
                         top_p=top_p, top_k=top_k, num_return_sequences=num_return_sequences,
                         max_new_tokens=max_new_tokens, eos_token_id=processor.stop_token_ids,
                         pad_token_id=processor.pad_token_id, **extra)
    return GeneratedReports(feats["input_ids"], feats["attention_mask"], feats["index"], new, processor.decode(new))
