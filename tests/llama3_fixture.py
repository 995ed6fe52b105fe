"""A local LLaMA-3 model directory, as users pass it in ``llm.options.model_path``: Meta's tokenizer
(built offline from quicktok-v1's ranks with transformers' ``TikTokenConverter``, see
``medtvt_plugins.llms.llama3_tokenizer``), the Llama-3.2 Instruct chat template, and a small random
``LlamaForCausalLM`` with the full 128,256-row vocabulary (tied embeddings like Llama-3.2-1B).

tests/test_llama3_tokenizer.py checks the tokenizer against quicktok's own encoder.
"""

from __future__ import annotations

from pathlib import Path

# Llama-3.2-1B-Instruct's chat template (its tokenizer_config.json), restated without the
# tool-calling branches, which no medtvt prompt uses: BOS, a system header with the knowledge
# cut-off and the date, each turn as header + trimmed content + <|eot_id|>, then the assistant header.
LLAMA32_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

#: Small enough for CI, the real vocabulary and special-token ids (Llama-3.2-1B's config otherwise).
TINY_LLAMA3 = dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                    "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                    "original_max_position_embeddings": 8192})


def make_llama3_model_dir(path: Path, seed: int = 0) -> Path:
    """Write tokenizer files, ``config.json`` and ``model.safetensors`` into ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medtvt_plugins.llms.llama3_tokenizer import build_llama3_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = build_llama3_tokenizer()
    tok.chat_template = LLAMA32_CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA3))
    model.save_pretrained(str(path), safe_serialization=True)
    return path
