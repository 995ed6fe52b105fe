"""LLaMA-3's tokenizer built offline (``llama3_dir`` fixture, medtvt_plugins.llms.llama3_tokenizer)
against quicktok's own encoder (an independent C++ BPE whose ids its README states are Meta's), and
the prompts medtvt builds with it against the reference's rules restated here."""

from __future__ import annotations

import json

import pytest

quicktok = pytest.importorskip("quicktok", reason="quicktok-v1 is in the dev extra")  # CI installs it

ODD = [
    "", " ", "a", "Hello, world!", "don't can't I'll we've they're 'tis 'TWAS He'S",
    "   leading\n\ttabs and  spaces   \r\n windows lines \r\n", "\n\n\n", "x\n \n  y", "trailing   ",
    "1 12 123 1234 12345 3.14159 0xDEADBEEF 99.99% 2024-07-26", "١٢٣ ٤٥٦ (Arabic-Indic digits)",
    "café résumé naïve — Zürich", "日本語のトークナイザー 中文 한국어", "Ω≈ç√∫ Икс हिन्दी", "á̛z (combining)",
    "emoji \U0001f680\U0001f525\U0001f44d mixed \U0001f468\u200d\U0001f469\u200d\U0001f467 family",
    "<think>reasoning</think> <answer>Sepsis; Pneumonia</answer>",
    "<ecg> <cxr> <lab> placeholders are plain text here", "a<|eot_id|>b <|begin_of_text|>",
    "https://example.com/path?q=1&x=2#frag <html><body>x</body></html>", "ALLCAPS lowercase MixedCase",
    "def f(x):\n    return [i**2 for i in range(100)]  # 1+2+3==6", "\u00a0nbsp\u2009thin\u3000ideographic",
]


@pytest.fixture(scope="module")
def tok(llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_dir), local_files_only=True)


@pytest.fixture(scope="module")
def enc():
    return quicktok.get_encoding("llama3")


def _cohort_texts(cohort) -> list[str]:
    texts = []
    for f in sorted((cohort / "qa").glob("*.json")):
        for rec in json.loads(f.read_text()):
            texts += [m["content"] for m in rec["messages"]]
    return [t for t in texts if t]


def test_ids_identical_to_quicktok_on_the_cohort_and_odd_strings(tok, enc, cohort):
    texts = _cohort_texts(cohort)
    assert len(texts) > 100
    for t in [*ODD, *texts]:
        # special-token strings in the text are one id each, as tiktoken's allowed_special="all"
        assert tok(t, add_special_tokens=False)["input_ids"] == enc.encode_with_special(t), repr(t)
        assert tok(t)["input_ids"] == [128000] + enc.encode_with_special(t), repr(t)  # BOS by the post-processor
        plain = enc.encode_ordinary(t)
        assert tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] == plain, repr(t)
        assert tok.decode(plain, clean_up_tokenization_spaces=False) == t, repr(t)


def test_vocabulary_and_special_tokens(tok, enc):
    assert len(tok) == 128256 == enc.n_vocab
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == \
        ("<|begin_of_text|>", 128000, "<|end_of_text|>", 128001)
    # Llama-3.1/3.2's names (Meta's llama_models tokenizer.py), restated: the 11 named ones, then reserved 3..247
    named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
             128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
             128010: "<|python_tag|>", 128002: "<|reserved_special_token_0|>", 128003: "<|reserved_special_token_1|>",
             128005: "<|reserved_special_token_2|>"}
    want = {**named, **{128011 + i: f"<|reserved_special_token_{3 + i}|>" for i in range(245)}}
    assert len(want) == 256 and tok.convert_ids_to_tokens(list(range(128000, 128256))) == [want[i] for i in sorted(want)]
    assert all(tok.added_tokens_decoder[i].special for i in want)  # dropped by decode(skip_special_tokens=True)
    assert tok.decode([128000, 9906, 128009, 128004], skip_special_tokens=True) == "Hello"
    # quicktok (LLaMA-3.0 names) agrees on the ids of the tokens both name alike
    for i in (128000, 128001, 128002, 128003, 128006, 128007, 128009):
        assert enc.encode_single_token(named[i]) == i
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    # the reasoning tags are several tokens each in LLaMA-3 (single ones only in the demo's trained tokenizer)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) >= 2, tag


def test_the_model_directory_loads_as_users_pass_it(llama3_dir):
    from medtvt_plugins.llms.llama_lora import LlamaLoraBackbone

    b = LlamaLoraBackbone(model_path=str(llama3_dir))
    t = b.load_tokenizer()
    assert t.pad_token == "<|finetune_right_pad_id|>" and t.pad_token_id == 128004
    cfg = b.text_config(t)
    assert cfg.vocab_size == 128256 and b.hidden_size == 64
    assert [p.name for p in b.weight_files()] == ["config.json", "model.safetensors"]


def _expected_prompt(enc, text: str, placeholders: dict[str, int], k: int) -> list[int]:
    """Token ids of ``text`` where each placeholder string is its id repeated ``k`` times (the
    reference inserts K modality tokens there), the rest encoded by quicktok with specials."""
    import re

    out: list[int] = []
    pat = "(" + "|".join(re.escape(p) for p in placeholders) + ")"
    for piece in re.split(pat, text):
        if piece in placeholders:
            out += [placeholders[piece]] * k
        elif piece:
            out += enc.encode_with_special(piece)
    return out


@pytest.mark.parametrize("fmt", ["reference", "chat"])
def test_prompts_tokenise_as_the_reference(tok, enc, fmt):
    from medtvt_core.model.processing import FIXED_CHAT_DATE, MedTVTProcessor

    tok = tok.__class__.from_pretrained(tok.name_or_path)  # a copy: placeholders are added below
    ph = {"ecg": "<ecg>", "cxr": "<cxr>"}
    tok.add_special_tokens({"extra_special_tokens": list(ph.values())}, replace_extra_special_tokens=False)
    ids = {v: tok.convert_tokens_to_ids(v) for v in ph.values()}
    assert sorted(ids.values()) == [128256, 128257]
    proc = MedTVTProcessor(tok, ph, 2, prompt_format=fmt,
                           answer_end_token="<|end_of_text|>" if fmt == "reference" else None)
    q = "Given the ECG <ecg> and the chest X-ray <cxr>, what does the patient have?"
    a = "<think>Irregular rhythm; consolidation.</think>\n<answer>Atrial Fibrillation; Pneumonia</answer>"
    f = proc.train_features([q], [a])
    row = f["input_ids"][0].tolist()
    if fmt == "reference":
        # the reference: BOS + question; target " " + answer + <|end_of_text|>
        prompt = _expected_prompt(enc, "<|begin_of_text|>" + q, ids, 2)
        answer = enc.encode(" " + a) + [128001]
    else:
        # Llama-3.2 Instruct: one user turn, generation prompt added; answer then EOS
        text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                f"Today Date: {FIXED_CHAT_DATE}\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
        prompt = _expected_prompt(enc, text, ids, 2)
        answer = enc.encode(a) + [128001]
    assert row == prompt + answer
    assert row.count(128000) == 1 and row[0] == 128000  # BOS once
    labels = f["labels"][0].tolist()
    assert labels == [-100] * len(prompt) + answer
    # decoding keeps the tags (plain text, several tokens each) and stops at the end token
    gen = proc.decode([answer + [5, 6, 7]])[0]
    assert gen == (" " + a if fmt == "reference" else a)
    from medtvt_core.metrics import compute_protocols
    from medtvt_plugins.rewards.builtin import format_reward, jaccard_reward

    assert format_reward(completions=[gen]) == [1.0] and jaccard_reward(completions=[gen], answer=[a]) == [1.0]
    both = compute_protocols([gen], [a], metrics=[])
    assert both["strict"]["ce"]["f1"] == 1.0 and both["reference"]["ce"]["f1"] == 1.0
    assert proc.generation_features([q])["input_ids"][0].tolist() == prompt


def test_a_tokenizer_lacking_the_answer_end_token_is_refused(cohort, tmp_path):
    """The paper preset's <|end_of_text|> on the demo's trained tokenizer: one line, before any model exists."""
    from test_orchestrator import medtvt, one_line_error

    r = medtvt("run", "--preset", "demo", "--out", tmp_path / "run", "--set", f"data.root={cohort}",
               "--set", "prompt.answer_end_token=<|end_of_text|>", "--set", "llm.options.pretrain_steps=5",
               "--set", "encoders.lab.options.variant=tiny", "--set", "rft.eval_steps=0")  # the cohort has no val split
    one_line_error(r, "prompt.answer_end_token", "'<|end_of_text|>' is not a token", "'</s>'")
    assert "[pt]" not in r.stdout and not (tmp_path / "run" / "pt").exists()


def test_an_unknown_eval_metric_is_refused_with_the_config(tmp_path):
    from test_orchestrator import medtvt, one_line_error

    r = medtvt("run", "--preset", "demo", "--out", tmp_path / "run", "--set", "eval.metrics=[bleu,cider]")
    one_line_error(r, "eval.metrics", "cider", "'bleu', 'rouge', 'meteor' or 'bertscore'")
    assert not (tmp_path / "run").exists()


def test_the_report_grammar_on_llama3_tokens_accepts_exactly_the_well_formed_reports(tok, cohort):
    """``diagnose``'s constrained decoding (model.generation.REPORT_GRAMMAR, masked by xgrammar) fed
    LLaMA-3's token ids of whole reports, where each tag is several tokens: it accepts a report and
    then the answer's end token exactly when the text obeys the rule restated here (the reference's
    format regex after leading whitespace, each block free of the four tags, a '<' in a block not
    followed by '/', 't', 'a' or '<', at most 4 whitespace characters before each block)."""
    import re

    import xgrammar as xgr

    from medtvt_core.model.generation import compiled_report_grammar
    from medtvt_core.model.processing import MedTVTProcessor

    block = r"(?:[^<]|<[^/ta<])*"
    rule = re.compile(rf"[ \t\r\n]{{0,4}}<think>{block}</think>[ \t\r\n]{{0,4}}<answer>{block}</answer>", re.S)
    proc = MedTVTProcessor(tok, {}, 1, prompt_format="chat")
    stop = proc.stop_token_ids
    assert stop == [128001]  # the answer's end token (the tokenizer's EOS without prompt.answer_end_token)
    grammar = compiled_report_grammar(proc, 128256)
    answers = [m["content"] for f in sorted((cohort / "qa").glob("*.json")) for rec in json.loads(f.read_text())
               for m in rec["messages"] if m["role"] == "assistant" and "<answer>" in m["content"]][:24]
    assert len(answers) == 24
    a = answers[0]
    bad = [a.replace("</think>", ""), a.replace("</think>", "</answer>", 1), a + " and more", a.replace("<think>", ""),
           a.replace("<answer>", "<answer><answer>"), "<think> x </think><answer> A </answer><answer> B </answer>",
           "<answer> Sepsis </answer>", "<think> EF </think> so <answer> Sepsis </answer>",
           a.replace(" </think>", " lactate <t </think>")]
    good = [*answers, " \n" + answers[1], "<think></think><answer></answer>", "<think> EF < 40%, K <5 </think>\n<answer> Sepsis </answer>",
            "<think>a</think>\n\n <answer> Sepsis; Pneumonia </answer>"]
    bad += ["\n\n\n\n\n" + answers[2], answers[3].replace("</think>", "</think>\n \n \n "), answers[4] + "\n",
            "\x0c" + answers[5]]
    for text in good + bad:
        want = bool(rule.fullmatch(text))
        assert want == (text in good), text
        m = xgr.GrammarMatcher(grammar)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        fed = 0
        for t in ids:
            if not m.accept_token(t):
                break
            fed += 1
        accepted = fed == len(ids) and m.accept_token(stop[0]) and m.is_terminated()
        assert accepted == want, (text, fed, len(ids))


def test_sampled_reports_under_the_grammar_with_the_seeded_sampler(llama3_dir, tok, one_torch_thread):
    """The grammar masks before medtvt's seeded per-row sampler draws (the order generate_reports gives
    them): a random LLaMA-3 model's sampled tokens, fed back to xgrammar, are each accepted, and every
    text opens with ``<think>`` (four tokens in LLaMA-3) although random weights would rarely write it."""
    import torch
    import xgrammar as xgr
    from transformers import LlamaForCausalLM

    from medtvt_core.model.generation import compiled_report_grammar, report_constraint
    from medtvt_core.model.processing import MedTVTProcessor
    from medtvt_core.model.sampling import SeededRowSampler, row_generators

    model = LlamaForCausalLM.from_pretrained(str(llama3_dir)).eval()
    proc = MedTVTProcessor(tok, {}, 1, prompt_format="chat")
    enc = tok(["Diagnose the patient."] * 4, return_tensors="pt", add_special_tokens=True)
    n = 12
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=n, eos_token_id=proc.stop_token_ids,
                             pad_token_id=proc.pad_token_id,
                             logits_processor=[report_constraint(proc, 128256),
                                               SeededRowSampler(row_generators(0, ["a", "b"], 2, "t"), max_steps=n)])
    new = out[:, enc["input_ids"].shape[1]:]
    for row in new.tolist():
        text = tok.decode(row, skip_special_tokens=True)
        assert text.lstrip(" \t\r\n").startswith("<think>"), text
        m = xgr.GrammarMatcher(compiled_report_grammar(proc, 128256))
        assert all(m.accept_token(t) for t in row if t != proc.pad_token_id), text
