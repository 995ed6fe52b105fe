"""``llama-lora`` LLM plugin and :class:`MedTVTProcessor` (prompts, expansion, labels, padding)."""

from __future__ import annotations

import copy

import pytest
import torch

from medtvt_core.errors import CheckpointError, ConfigError, DataError
from types import SimpleNamespace

from pydantic import ValidationError

from medtvt_core.model.generation import completion_mask
from medtvt_core.model.processing import (FIXED_CHAT_DATE, IGNORE_INDEX, MedTVTProcessor,
                                          subset_modalities)
from medtvt_plugins.llms.llama_lora import (
    REASONING_TAGS, LlamaLoraBackbone, LlamaLoraConfig, extra_parameter_names, llama_config,
)

PLACEHOLDERS = ["<ecg>", "<cxr>", "<lab>"]
CORPUS = [
    "<think> sinus rhythm, rate 80 </think><answer> Hypertension; Sepsis </answer>",
    "The ECG <ecg> shows atrial fibrillation; the chest x-ray <cxr> shows consolidation.",
    "Labs <lab>: creatinine raised, white cells raised.",
] * 20


def build(backbone, placeholders=PLACEHOLDERS, corpus=lambda: CORPUS, tokenizer=None):
    """Tokenizer + placeholders + LM, the three calls medtvt_core.build.new_model makes."""
    tok = copy.deepcopy(tokenizer) if tokenizer is not None else backbone.load_tokenizer(corpus)
    tok.add_special_tokens({"extra_special_tokens": list(placeholders)}, replace_extra_special_tokens=False)
    model = backbone.build_model(backbone.text_config(tok))
    return SimpleNamespace(model=model, tokenizer=tok, hidden_size=model.get_input_embeddings().embedding_dim,
                           placeholder_ids={p: tok.convert_tokens_to_ids(p) for p in placeholders})


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return build(LlamaLoraBackbone(variant="tiny", tokenizer_vocab_size=400))


# --------------------------------------------------------------------------- plugin
def test_config_defaults_and_errors():
    cfg = LlamaLoraConfig()
    assert cfg.lora_rank == 8 and cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValidationError, match="lora_rnak"):
        LlamaLoraBackbone(lora_rnak=4)
    with pytest.raises(ValidationError, match="target_modules"):
        LlamaLoraBackbone(target_modules=[])
    from medtvt_core.build import validated_options

    with pytest.raises(ConfigError, match=r"llm.options \(llama-lora\): lora_rnak"):
        validated_options("llms", "llama-lora", {"lora_rnak": 4}, "llm")


def test_contract(loaded):
    from medtvt_core.plugins import build_catalog
    from medtvt_core.testing.checks import check_plugin

    import medtvt_plugins.llms.llama_lora as mod

    spec = build_catalog(plugins=[mod], autoload=False).llms.spec("llama-lora")
    assert check_plugin(spec) == []


def test_tiny_build_tokens(loaded):
    tok = loaded.tokenizer
    for ph in PLACEHOLDERS:
        assert tok(ph, add_special_tokens=False)["input_ids"] == [loaded.placeholder_ids[ph]]
        assert ph in tok.all_special_tokens
    for tag in REASONING_TAGS:  # one token each, kept by decode(skip_special_tokens=True)
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    text = "<think> rate 80 </think><answer> Sepsis </answer>"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    emb = loaded.model.get_input_embeddings().weight
    assert emb.shape == (len(tok), 64) and loaded.hidden_size == 64
    # The same corpus trains the same tokenizer; the same seed builds the same base.
    again = build(LlamaLoraBackbone(variant="tiny", tokenizer_vocab_size=400))
    assert again.tokenizer(text)["input_ids"] == ids and len(again.tokenizer) == len(tok)
    a, b = loaded.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_" not in k)


def test_lora_wrapping_and_extras(loaded):
    model = loaded.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    names = set(extra_parameter_names(model))
    assert any("embed_tokens" in n for n in names) and any(n.endswith("norm.weight") for n in names)
    assert not any("lora_" in n or "proj" in n for n in names)
    assert names == set(LlamaLoraBackbone(variant="tiny").extra_parameter_names(model))


def test_options_dtype_targets_checkpointing(loaded):
    b = LlamaLoraBackbone(variant="tiny", dtype="bfloat16", target_modules=["gate_proj"], lora_rank=4,
                          gradient_checkpointing=True)
    llm = build(b, tokenizer=loaded.tokenizer, placeholders=[])
    assert llm.model.get_input_embeddings().weight.dtype == torch.bfloat16
    lora = [n for n, p in llm.model.named_parameters() if p.requires_grad]
    assert lora and all("gate_proj" in n for n in lora)
    assert llm.model.get_base_model().is_activation_checkpointing
    llm.model.train()
    ids = torch.tensor([[1, 5, 6, 7]])
    llm.model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in llm.model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="target_modules"):
        build(LlamaLoraBackbone(variant="tiny", target_modules=["no_such_module"]), tokenizer=loaded.tokenizer,
              placeholders=[])


def test_llama_3_2_1b_config_without_building():
    b = LlamaLoraBackbone(variant="llama-3.2-1b")
    assert b.hidden_size == 2048 and b.pretrained_path is None
    c = llama_config("llama-3.2-1b", vocab_size=500)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2048, 16, 32, 8)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (8192, 128256, True)
    assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["rope_theta"] == 500000.0
    assert llama_config("llama-3.2-1b", vocab_size=130000).vocab_size == 130000


def test_missing_sources_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory.*never downloaded"):
        LlamaLoraBackbone(model_path=str(tmp_path / "nope")).load_tokenizer()
    with pytest.raises(CheckpointError, match="not a directory"):
        LlamaLoraBackbone(model_path=str(tmp_path / "nope")).hidden_size
    with pytest.raises(ConfigError, match="no tokenizer of its own"):
        LlamaLoraBackbone(variant="tiny").load_tokenizer()


def test_local_model_directory(loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    # A "released" model: base weights + tokenizer without placeholders, HF format, safetensors.
    src_tok = LlamaLoraBackbone(variant="tiny", tokenizer_vocab_size=400).load_tokenizer(corpus=lambda: CORPUS)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_config(llama_config("tiny", vocab_size=len(src_tok), pad_token_id=0))
    base.save_pretrained(tmp_path)
    src_tok.save_pretrained(tmp_path)
    b = LlamaLoraBackbone(model_path=str(tmp_path))
    assert b.hidden_size == 64 and b.pretrained_path == tmp_path
    assert [p.name for p in b.weight_files()] == ["config.json", "model.safetensors"]
    llm = build(b)
    n0 = len(src_tok)
    emb = llm.model.get_input_embeddings().weight
    assert emb.shape[0] == n0 + 3 == len(llm.tokenizer)
    torch.testing.assert_close(emb[n0:], emb[:n0].mean(0, keepdim=True).expand(3, -1))  # deterministic new rows
    ids = torch.tensor([[1, 10, 20, 30]])
    base.eval()
    llm.model.eval()
    # LoRA B starts at zero: the wrapped model computes the released model's logits.
    torch.testing.assert_close(llm.model(input_ids=ids).logits[..., :n0], base(input_ids=ids).logits)
    # A directory with only a pickled checkpoint is refused (unpickling can run code).
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text((tmp_path / "config.json").read_text())
    (pk / "pytorch_model.bin").write_bytes(b"not read")
    src_tok.save_pretrained(pk)
    with pytest.raises(CheckpointError, match="holds no \\*.safetensors weights"):
        LlamaLoraBackbone(model_path=str(pk)).weight_files()
    with pytest.raises(CheckpointError, match="safetensors weights required"):
        build(LlamaLoraBackbone(model_path=str(pk)))


# --------------------------------------------------------------------------- processor
@pytest.fixture
def proc(loaded):
    return MedTVTProcessor(loaded.tokenizer, {"ecg": "<ecg>", "cxr": "<cxr>", "lab": "<lab>"}, tokens_per_modality=3)


def test_prompt_expansion_and_labels(proc, loaded):
    tok = loaded.tokenizer
    f = proc.train_features(["ECG <ecg> labs <lab>?", "only <cxr>"], ["<answer> Sepsis </answer>", "no"])
    ids, am, lab = f["input_ids"], f["attention_mask"], f["labels"]
    assert ids.shape == am.shape == lab.shape and f["index"].tolist() == [0, 1]
    ecg = proc.placeholder_ids["ecg"]
    assert (ids[0] == ecg).sum() == 3 and (ids[1] == proc.placeholder_ids["cxr"]).sum() == 3
    # K copies are adjacent.
    pos = (ids[0] == ecg).nonzero().squeeze(1)
    assert (pos.diff() == 1).all()
    for row in range(2):
        n = int(am[row].sum())
        assert (am[row, :n] == 1).all() and (am[row, n:] == 0).all()  # right padding
        assert (ids[row, n:] == proc.pad_token_id).all() and (lab[row, n:] == IGNORE_INDEX).all()
        trained = lab[row][lab[row] != IGNORE_INDEX]
        assert trained[-1] == tok.eos_token_id  # EOS is trained
        assert torch.equal(ids[row, n - len(trained):n], trained)  # labels = the answer tail, aligned
    prompt = proc.prompt_ids(["ECG <ecg> labs <lab>?"])[0]
    assert (lab[0, : len(prompt)] == IGNORE_INDEX).all() and torch.equal(ids[0, : len(prompt)], prompt)
    assert tok.decode(prompt, skip_special_tokens=True) == "User: ECG  labs ?\nAssistant: "
    assert prompt[0] == tok.bos_token_id


def test_truncation_never_cuts_a_placeholder(proc):
    long_q = "x " * 50 + "<ecg>"
    with pytest.raises(DataError, match=r"sample 1 \(id r1\): prompt is \d+ tokens.*max_length=30"):
        proc.train_features(["a <ecg>", long_q], ["answer " * 40, "b"], max_length=30, ids=["r0", "r1"])
    dropper = MedTVTProcessor(proc.tokenizer, proc.placeholders, 3, on_overflow="drop")
    f = dropper.train_features(["a <ecg>", long_q], ["answer " * 40, "b"], max_length=30)
    assert f["index"].tolist() == [0] and f["input_ids"].shape == (1, 30)
    assert (f["input_ids"][0] == proc.placeholder_ids["ecg"]).sum() == 3  # prompt intact, answer cut
    g = dropper.generation_features(["a <ecg>", long_q], max_length=30)
    assert g["index"].tolist() == [0]
    # the processor's call: the dropped sample's modality rows go with it (the ECG rows of a batch
    # hold present samples only: sample 1's is row 0 here, sample 2's row 1)
    read = {"prompts": ["a <ecg>", long_q, "c <ecg>"], "answers": ["answer " * 40, "b", "d"], "ids": ["r0", "r1", "r2"],
            "modality_names": ["ecg", "lab"], "modality_mask": torch.tensor([[False, True], [True, True], [True, False]]),
            "modality_inputs": {"ecg": torch.tensor([[1.0], [2.0]]), "lab": torch.tensor([[5.0], [6.0]])},
            "modality_features": {}}
    for answers in (True, False):
        b = dropper(read, answers=answers, max_length=30)
        assert b["index"].tolist() == [0, 2] and b["modality_mask"].tolist() == [[False, True], [True, False]]
        assert b["modality_inputs"]["ecg"].tolist() == [[2.0]] and b["modality_inputs"]["lab"].tolist() == [[5.0]]
        assert ("labels" in b) is answers and b["input_ids"].shape[0] == 2
    assert proc(read, answers=False)["modality_inputs"] is read["modality_inputs"]  # nothing dropped: as read


def test_generation_features_left_padded(proc):
    g = proc.generation_features(["short <lab>", "a much longer question <ecg> with more words"])
    ids, am = g["input_ids"], g["attention_mask"]
    assert am[0, 0] == 0 and (am[:, -1] == 1).all()
    n = int(am[0].sum())
    assert (am[0, -n:] == 1).all() and (ids[0, :-n] == proc.pad_token_id).all()
    assert torch.equal(ids[0, -n:], proc.prompt_ids(["short <lab>"])[0])


def test_chat_template_is_used(loaded):
    tok = copy.deepcopy(loaded.tokenizer)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    p = MedTVTProcessor(tok, {"ecg": "<ecg>"}, 2)
    assert p.use_chat_template and p.prompt_text("hi <ecg>") == "<s>[user] hi <ecg>\n[assistant] "
    ids = p.prompt_ids(["hi <ecg>"])[0]
    assert (ids == tok.bos_token_id).sum() == 1  # the template's BOS only
    assert (ids == p.placeholder_ids["ecg"]).sum() == 2
    assert not MedTVTProcessor(tok, {"ecg": "<ecg>"}, 2, prompt_format="reference").use_chat_template


def test_chat_prompt_holds_no_run_time_date(loaded):
    """LLaMA-3 templates print today's date unless date_string is given: the processor pins it."""
    tok = copy.deepcopy(loaded.tokenizer)
    tok.chat_template = ('{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
                         '{%- endif %}{{ bos_token }}Today Date: {{ date_string }}\n'
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    import datetime

    p = MedTVTProcessor(tok, {"ecg": "<ecg>"}, 1)
    text = p.prompt_text("q <ecg>")
    assert f"Today Date: {FIXED_CHAT_DATE}" in text
    assert datetime.date.today().strftime("%d %b %Y") not in text or FIXED_CHAT_DATE == datetime.date.today().strftime("%d %b %Y")
    unpinned = tok.apply_chat_template([{"role": "user", "content": "q <ecg>"}], tokenize=False)
    assert "Today Date: " + datetime.date.today().strftime("%d %b %Y") in unpinned  # what the pin prevents


def test_reference_prompt_format_is_the_reference_rule(loaded):
    """Reference: BOS + question is the prompt; ' ' + answer + end token the trained target."""
    tok = copy.deepcopy(loaded.tokenizer)
    p = MedTVTProcessor(tok, {"ecg": "<ecg>", "lab": "<lab>"}, 2, prompt_format="reference", answer_end_token="</s>")
    q, a = "ECG <ecg> and labs <lab>: diagnose.", "<think> t </think><answer> Sepsis </answer>"
    f = p.train_features([q], [a])
    # The rule restated with the tokenizer alone (placeholders encoded as special tokens, then K copies).
    prompt = tok(tok.bos_token + q, add_special_tokens=False)["input_ids"]
    answer = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("</s>")]
    expanded = [t for t in prompt for _ in range(2 if t in p.placeholder_ids.values() else 1)]
    assert f["input_ids"][0].tolist() == expanded + answer
    assert f["labels"][0].tolist() == [IGNORE_INDEX] * len(expanded) + answer
    assert p.generation_features([q])["input_ids"][0].tolist() == expanded
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1


def test_processor_errors(proc, loaded):
    with pytest.raises(ConfigError, match="not one"):
        MedTVTProcessor(loaded.tokenizer, {"ecg": "<not a token>"}, 1)
    with pytest.raises(DataError, match="answer 0: contains a modality placeholder"):
        proc.train_features(["q <ecg>"], ["a <ecg>"])


def test_decode_completion_mask_subset(proc):
    eos = proc.eos_token_id
    ids = torch.tensor([[5, 6, eos, 0, 0], [7, 8, 9, 10, 11]])
    assert completion_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    texts = proc.decode(ids)
    assert texts[0] == proc.tokenizer.decode([5, 6])
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    tensors = {"ecg": torch.tensor([[0.0], [2.0]]), "lab": torch.tensor([[1.0], [2.0]])}
    sub = subset_modalities(mask, tensors, ["ecg", "lab"], torch.tensor([1, 2]))
    assert sub["ecg"].tolist() == [[2.0]] and sub["lab"].tolist() == [[1.0], [2.0]]
    assert subset_modalities(mask, None, ["ecg", "lab"], torch.tensor([0])) is None
