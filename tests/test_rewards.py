"""Rewards: answer parsing, the built-ins on edge cases, 1 MB inputs, and TRL interoperability.

The reference-exact ``format`` / ``jaccard`` are checked against a restatement of the
reference's rule in tests/test_reference_protocol.py; here: the normalised variants.
Timings live in benchmarks/rewards.py (no timed assertions on a shared machine).
"""

from __future__ import annotations

import doctest
import types

import pytest

import medtvt_core.answers as answers
import medtvt_plugins.rewards.builtin as builtin
from medtvt_core import hookimpl
from medtvt_core.answers import DISEASES, answer_set, extract_answer, is_well_formatted, parse_diseases
from medtvt_core.errors import ConfigError
from medtvt_plugins.rewards.builtin import (
    REWARDS, exact_set_reward, format_reward, format_strict_reward, jaccard_normalized_reward, jaccard_reward,
)

MB = 1 << 20
GOOD = "<think> irregular rhythm, consolidation </think>\n<answer> Atrial Fibrillation; Pneumonia </answer>"


# ----------------------------------------------------------------------------- doctests
@pytest.mark.parametrize("module", [builtin, answers], ids=["rewards", "answers"])
def test_doctests(module):
    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


# ----------------------------------------------------------------------------- parsing
def test_seven_canonical_categories():
    assert DISEASES == ("Coronary Artery Disease", "Acute Renal Failure", "Hypertension", "Atrial Fibrillation",
                        "Pneumonia", "Diabetes Mellitus", "Sepsis")


@pytest.mark.parametrize("text, expected", [
    ("<answer> A; B </answer>", "A; B"),
    ("pre <answer>x</answer> post", "x"),
    ("<answer></answer>", ""),
    ("no tags", None),
    ("<answer> A", None),
    ("A </answer>", None),
    ("</answer> A <answer>", None),
    ("<answer> A </answer><answer> B </answer>", None),  # several answers: invalid
    ("<answer> A <answer> B </answer></answer>", None),  # nested: invalid
    ("<answer> A </answer></answer>", None),
    (None, None),
    (42, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_diseases_normalises_and_keeps_unknown_names():
    assert parse_diseases(" coronary  artery DISEASE ;; ;Sepsis;sepsis; Acute  Flu ") == {
        "Coronary Artery Disease", "Sepsis", "acute flu"}
    assert parse_diseases("") == set() and parse_diseases(None) == set()


def test_answer_set_forms():
    assert answer_set("<answer> Sepsis </answer>") == {"Sepsis"}
    assert answer_set("Sepsis; pneumonia") is None  # tags required unless bare_ok
    assert answer_set("Sepsis; pneumonia", bare_ok=True) == {"Sepsis", "Pneumonia"}
    assert answer_set("<answer> a </answer><answer> b </answer>", bare_ok=True) is None
    assert answer_set(["sepsis", " Hypertension "]) == {"Sepsis", "Hypertension"}
    assert answer_set(None) is None
    assert answer_set("<answer>" + "Sepsis;" * 2000 + "</answer>") is None  # > MAX_ANSWER_CHARS


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("text, ok", [
    (GOOD, True),
    ("<think></think><answer></answer>", True),
    ("  \n<think>a</think>   \n\t<answer>b</answer>\n ", True),
    ("<think>a</think>x<answer>b</answer>", False),  # text between the blocks
    ("<think>a</think><answer>b</answer> trailing", False),
    ("lead <think>a</think><answer>b</answer>", False),
    ("<answer>b</answer><think>a</think>", False),
    ("<think>a</think>", False),
    ("<answer>b</answer>", False),
    ("<think>a<think>b</think><answer>c</answer>", False),  # nested think
    ("<think>a</think><answer>b</answer><answer>c</answer>", False),  # several answers
    ("<think>a</think><answer>b<answer>c</answer>", False),
    ("<think>a</answer></think><answer>b</answer>", False),
    ("", False),
    ("no tags at all", False),
])
def test_format_strict_cases(text, ok):
    assert format_strict_reward(prompts=["q"], completions=[text]) == [1.0 if ok else 0.0]
    assert is_well_formatted(text) is ok


# ----------------------------------------------------------------------------- label rewards
def _all(completion, truth):
    kw = dict(prompts=["q"], completions=[completion], solution=[truth])
    return tuple(REWARDS[n](**kw)[0] for n in ("jaccard-normalized", "exact_set", "disease_f1"))


@pytest.mark.parametrize("completion, truth, expected", [
    # P={AF,Pn} G={AF,Pn}
    (GOOD, "<answer> Pneumonia; Atrial Fibrillation </answer>", (1.0, 1.0, 1.0)),
    # P={AF,Pn} G={AF}: J=1/2, F1=2*1/(2+1)
    (GOOD, "<answer> Atrial Fibrillation </answer>", (0.5, 0.0, 2 / 3)),
    # P={AF,Pn} G={AF,Se,Ht}: J=1/4, F1=2/5
    (GOOD, "<answer> Atrial Fibrillation; Sepsis; Hypertension </answer>", (0.25, 0.0, 0.4)),
    # disjoint
    (GOOD, "<answer> Sepsis </answer>", (0.0, 0.0, 0.0)),
    # unknown name counts as a wrong prediction: P={Se,"flu"} G={Se}
    ("<answer> Sepsis; Flu </answer>", "<answer> Sepsis </answer>", (0.5, 0.0, 2 / 3)),
    # only unknown names
    ("<answer> Xyz; Abc </answer>", "<answer> Sepsis </answer>", (0.0, 0.0, 0.0)),
    # case / whitespace insensitive, duplicates collapse
    ("<answer>atrial  fibrillation;ATRIAL FIBRILLATION;</answer>", "<answer> Atrial Fibrillation </answer>",
     (1.0, 1.0, 1.0)),
    # no tags, several tags, nested tags: no answer -> 0
    ("Sepsis", "<answer> Sepsis </answer>", (0.0, 0.0, 0.0)),
    ("<answer> Sepsis </answer><answer> Sepsis </answer>", "<answer> Sepsis </answer>", (0.0, 0.0, 0.0)),
    ("<answer> Sepsis <answer> Sepsis </answer></answer>", "<answer> Sepsis </answer>", (0.0, 0.0, 0.0)),
    # empty sets: jaccard 0 (docs/method.md, "Rewards": empty union), exact/F1 1
    ("<answer> </answer>", "<answer></answer>", (0.0, 1.0, 1.0)),
    ("<answer> </answer>", "<answer> Sepsis </answer>", (0.0, 0.0, 0.0)),
    ("<answer> Sepsis </answer>", "<answer></answer>", (0.0, 0.0, 0.0)),
    # ground truth as a bare list or a list of names
    ("<answer> Sepsis </answer>", "Sepsis; Pneumonia", (0.5, 0.0, 2 / 3)),
    ("<answer> Sepsis </answer>", ["sepsis"], (1.0, 1.0, 1.0)),
    # a report with a <think> block but no answer is not a bare list
    ("<answer> Sepsis </answer>", "<think> r </think> Sepsis", (None, None, None)),
    # unusable ground truth -> None (TRL: not scored)
    ("<answer> Sepsis </answer>", None, (None, None, None)),
    ("<answer> Sepsis </answer>", "<answer> a </answer><answer> b </answer>", (None, None, None)),
    ("<answer> Sepsis </answer>", "<answer> unclosed", (None, None, None)),
])
def test_label_rewards_hand_computed(completion, truth, expected):
    got = _all(completion, truth)
    assert got == pytest.approx(expected) if None not in expected else got == expected


def test_conversational_completions():
    conv = [[{"role": "assistant", "content": GOOD}],
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<answer> Sepsis </answer>"}],
            [{"role": "assistant", "content": [{"type": "text", "text": "<think>t</think>"},
                                               {"type": "text", "text": "<answer>Pneumonia</answer>"}]}],
            []]
    truth = ["<answer> Pneumonia </answer>"] * 4
    for fmt in (format_reward, format_strict_reward):
        assert fmt(prompts=["q"] * 4, completions=conv) == [1.0, 0.0, 1.0, 0.0]
    for jac in (jaccard_reward, jaccard_normalized_reward):
        assert jac(prompts=["q"] * 4, completions=conv, solution=truth) == [0.5, 0.0, 1.0, 0.0]
        assert jac(prompts=["q"], completions=conv[:1], answer=[[{"role": "assistant", "content": truth[0]}]]) == [0.5]


def test_label_column_names():
    c = ["<answer> Sepsis </answer>"]
    for jac in (jaccard_reward, jaccard_normalized_reward):
        assert jac(prompts=["q"], completions=c, answer=["<answer> Sepsis </answer>"]) == [1.0]
        # `solution` (TRL's name) wins over `answer`
        assert jac(prompts=["q"], completions=c, solution=["<answer> Sepsis </answer>"],
                   answer=["<answer> Pneumonia </answer>"]) == [1.0]
        with pytest.raises(ConfigError, match="'solution' or 'answer'"):
            jac(prompts=["q"], completions=c, labels=[["Sepsis"]])
    with pytest.raises(ConfigError, match="2 entries for 1 completions"):
        exact_set_reward(prompts=["q"], completions=c, solution=["Sepsis", "Sepsis"])
    with pytest.raises(ConfigError, match="jaccard-normalized"):
        jaccard_reward(prompts=["q"], completions=c, solution=[["Sepsis"]])


def test_untagged_ground_truth_by_column():
    """A bare list is a label column's form (`solution`); the dataset's `answer` text must hold the block."""
    c = ["<answer> Sepsis </answer>"]
    assert jaccard_normalized_reward(completions=c, solution=["Sepsis"]) == [1.0]
    assert jaccard_normalized_reward(completions=c, answer=["Sepsis"]) == [None]
    assert exact_set_reward(completions=c, answer=["The patient has Sepsis"]) == [None]
    # the reference's rule: no block in the ground truth -> 0.0, whatever the column
    assert jaccard_reward(completions=c, solution=["Sepsis"]) == jaccard_reward(completions=c, answer=["Sepsis"]) == [0.0]


def test_accepts_trl_extra_kwargs():
    kw = dict(prompts=["q"], completions=[GOOD], solution=["<answer> Pneumonia </answer>"], completion_ids=[[1, 2]],
              trainer_state=object(), log_extra=lambda *a: None, log_metric=lambda *a: None, other_column=["x"])
    got = {n: REWARDS[n](**kw)[0] for n in REWARDS}
    assert got == pytest.approx({"format": 1.0, "jaccard": 0.5, "format-strict": 1.0, "jaccard-normalized": 0.5,
                                 "exact_set": 0.0, "disease_f1": 2 / 3})


def test_empty_batch():
    assert all(REWARDS[n](prompts=[], completions=[], solution=[]) == [] for n in REWARDS)


# ----------------------------------------------------------------------------- big inputs
NAMES = ("format", "jaccard", "format-strict", "jaccard-normalized", "exact_set", "disease_f1")
# expected values in NAMES order; ground truth "<answer> Sepsis </answer>"
BIG = {
    "no tags": ("x" * MB, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    "1 MB reasoning": (f"<think> {'y' * MB} </think><answer> Sepsis </answer>", (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)),
    # the reference has no cap: the 131,072 equal labels collapse to {Sepsis}
    "1 MB answer": (f"<think> t </think><answer> {'Sepsis; ' * (MB // 8)} </answer>", (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)),
    # the reference reads the first block; the normalised rules refuse several
    "answer tags x 40k": ("<answer> Sepsis </answer>" * (MB // 25), (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)),
    "1 MB then answer": ("z" * MB + "<think> t </think><answer> Sepsis </answer>", (0.0, 1.0, 0.0, 1.0, 1.0, 1.0)),
    "open tags only": ("<answer>" * (MB // 8), (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    "think closes, no final tag": ("<think>" + "</think><answer> Sepsis </answer> x" * (MB // 36),
                                   (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)),
    "lt signs": ("<" * MB, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
}


@pytest.mark.parametrize("case", list(BIG))
def test_megabyte_completions(case):
    # Values only; the regex-worst cases (open tags only, think closes without a final tag)
    # would take minutes with the bare reference regex, so finishing at all is the check.
    text, expected = BIG[case]
    got = tuple(REWARDS[n](prompts=["q"], completions=[text], solution=["<answer> Sepsis </answer>"])[0] for n in NAMES)
    assert got == expected


# ----------------------------------------------------------------------------- registry and TRL
def test_registered_and_pass_contract_kit():
    from medtvt_core.plugins import build_catalog
    from medtvt_core.testing import check_plugin

    cat = build_catalog(plugins=[builtin], autoload=False)
    assert cat.rewards.list() == sorted(REWARDS)
    for name in REWARDS:
        spec = cat.rewards.spec(name)
        assert spec.obj is REWARDS[name] and spec.description
        assert check_plugin(spec) == []


def test_ours_inside_trl_grpo_trainer(tmp_path):
    """TRL 1.16's GRPOTrainer._calculate_rewards calls our rewards with its own kwargs."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    tok = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tk = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, use_vllm=False, report_to="none", bf16=False, use_cpu=True,
                      activation_checkpointing=False, save_strategy="no")
    ds = Dataset.from_dict({"prompt": ["a b", "b a"],
                            "solution": ["<answer> Sepsis </answer>", "<answer> Pneumonia; Sepsis </answer>"]})
    funcs = [REWARDS[n] for n in NAMES]
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tk)
    assert trainer.reward_func_names == ["format_reward", "jaccard_reward", "format_strict_reward",
                                         "jaccard_normalized_reward", "exact_set_reward", "disease_f1_reward"]
    inputs = [dict(ds[0]), dict(ds[0]), dict(ds[1]), dict(ds[1])]
    completions = ["<think> x </think><answer> Sepsis </answer>", "junk",
                   "<think> y </think><answer> Sepsis </answer>", "<answer> Pneumonia; Sepsis </answer>"]
    got = trainer._calculate_rewards(inputs, [x["prompt"] for x in inputs], completions, [[3], [4], [3], [4]])
    expected = [[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0.5, 1, 0.5, 0, 2 / 3], [0, 1, 0, 1, 1, 1]]
    assert [v for row in got.tolist() for v in row] == pytest.approx([v for row in expected for v in row])


def test_trl_rewards_inside_our_registry():
    """TRL's own rewards register here and score through our GRPO reward call."""
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    from medtvt_core.plugins import build_catalog
    from medtvt_core.training.grpo import compute_rewards

    plugin = types.SimpleNamespace()

    @hookimpl
    def medtvt_register_rewards(register):
        register("trl-think-format", think_format_reward)
        register("trl-overlong", get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2))

    plugin.medtvt_register_rewards = medtvt_register_rewards
    cat = build_catalog(plugins=[builtin, plugin], autoload=False)
    assert not cat.failures
    funcs = [cat.rewards.get(n) for n in ("trl-think-format", "trl-overlong", "jaccard")]
    # TRL's think_format_reward reads conversational completions (completion[0]["content"])
    completions = [[{"role": "assistant", "content": "<think>r</think><answer>Sepsis</answer>"}],
                   [{"role": "assistant", "content": "Sepsis"}]]
    out = compute_rewards(funcs, ["q", "q"], completions, completion_ids=[[1, 2], [1, 2, 3, 4]],
                          answer=["<answer> Sepsis </answer>"] * 2)
    assert out.tolist() == [[1.0, 0.0, 1.0], [0.0, -1.0, 0.0]]
