"""LLaMA-3's tokenizer built offline, for a random-weights ``llama-3.2-1b`` without a model directory.

Meta's tokenizer is a tiktoken BPE (128,000 ranks, LLaMA-3's pre-tokenisation pattern) plus 256
special tokens at ids 128,000..128,255 (named as in Llama-3.1/3.2, the paper's LLaMA-3.2-1B), with ``<|begin_of_text|>`` prepended by the post-processor.
Its ranks are not in transformers or tokenizers; the registry package ``quicktok-v1`` (MIT) ships
them with ids identical to Meta's. This module turns them into a Hugging Face tokenizer with
transformers' own ``TikTokenConverter`` (the converter transformers uses for tiktoken models), so
nothing is downloaded. quicktok is an optional dependency (the ``dev`` extra): without it, a run
must point ``llm.options.model_path`` at a directory holding a LLaMA-3 tokenizer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLAMA3_PATTERN", "LLAMA3_BOS", "LLAMA3_EOS", "quicktok_available", "llama32_special_tokens",
           "build_llama3_tokenizer"]

#: LLaMA-3's pre-tokenisation regex (Meta's ``tokenizer.py``, ``pat_str``).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_BOS = "<|begin_of_text|>"
#: The base model's EOS (Llama-3.2-1B); the Instruct model's turn end is ``<|eot_id|>``.
LLAMA3_EOS = "<|end_of_text|>"
#: What a user without quicktok must do instead (one line, used in errors).
NEEDS = ("set llm.options.model_path=<dir with a LLaMA-3 tokenizer> (a local Llama-3.2-1B directory), "
         "or install quicktok-v1 (pip install 'medtvt[dev]') to build LLaMA-3's tokenizer offline")


def quicktok_available() -> bool:
    try:  # imported, not only found: a broken install counts as absent (cheap: ~2 ms)
        import quicktok  # noqa: F401
    except ImportError:
        return False
    return True


def llama32_special_tokens() -> list[str]:
    """The 256 special tokens of Llama-3.1/3.2, in id order from 128,000 (Meta's ``llama_models``
    ``tokenizer.py``). quicktok names them as Llama-3.0 did: the same ids, but 128004, 128008 and
    128010 reserved there, and the reserved tokens numbered differently."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(named))]


def _encoding() -> Any:
    import quicktok

    return quicktok.get_encoding("llama3")


def build_llama3_tokenizer() -> Any:
    """LLaMA-3's tokenizer as a ``PreTrainedTokenizerFast`` (BOS ``<|begin_of_text|>``, EOS
    ``<|end_of_text|>``, no chat template, no pad token); needs ``quicktok-v1``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = _encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(128000)}  # (token_byte_values() is not by rank)
    specials = llama32_special_tokens()
    named = [s for s in specials if "reserved" not in s and s in enc.special_tokens_set]
    if len(ranks) != 128000 or enc.n_vocab != 128256 or \
            any(enc.encode_single_token(s) != 128000 + specials.index(s) for s in named):
        raise RuntimeError(f"quicktok's llama3 encoding is not LLaMA-3's ({len(ranks)} ranks, {enc.n_vocab} ids)")

    class _Converter(TikTokenConverter):
        # The converter reads ranks from a tiktoken file; here they come from quicktok's encoding.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    # Specials are added in id order after the 128,000 ranks, so each lands on its Meta id.
    tok = _Converter(vocab_file="quicktok:llama3", pattern=LLAMA3_PATTERN, extra_special_tokens=specials).converted()
    bos = tok.token_to_id(LLAMA3_BOS)
    # As Meta's tokenizer.json: byte-level offsets, then BOS before each sequence.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS} $B",
                                      special_tokens=[(LLAMA3_BOS, bos)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOS,
                                   model_max_length=131072, clean_up_tokenization_spaces=True)
