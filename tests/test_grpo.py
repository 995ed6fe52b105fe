"""GRPO: pure functions (equal to TRL's formulas) and the Trainer on a tiny multimodal model.

The loss against TRL 1.16's own GRPOTrainer, off-policy and with a reference unlike the policy, is in
tests/test_grpo_parity.py; resume after a real kill in tests/test_orchestrator.py."""

from __future__ import annotations

import math

import pytest
import torch

from medtvt_core.config import RFTConfig
from medtvt_core.errors import PluginContractError
from medtvt_core.errors import ConfigError
from medtvt_core.model.generation import completion_mask
from medtvt_core.training.grpo import (
    compute_rewards,
    frozen_reference,
    group_advantages,
    grpo_loss,
    nanstd,
    selective_log_softmax,
    weighted_rewards,
)

WORDS = ("the patient has fever cough chest pain atrial fibrillation sepsis pneumonia renal failure "
         "diabetes hypertension coronary disease think answer yes no ecg cxr lab shows high low normal").split()
PROMPTS = ["the patient has fever", "chest pain", "ecg shows atrial fibrillation and high lab"]


# --------------------------------------------------------------------------- tiny offline LM
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 32) and its tokenizer saved with save_pretrained (offline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tk = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tk), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tk.pad_token_id, eos_token_id=tk.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tk.save_pretrained(d)
    return d


def _load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d), _tokenizer()


# --------------------------------------------------------------------------- pure functions
def test_group_advantages_match_trl_formula():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.5, float("nan"), 1.5, 0.25])
    adv = group_advantages(r, 4, True)
    g = r.view(2, 4)
    # group 0: unbiased std; group 1: NaN left out of mean/std
    a0 = (g[0] - g[0].mean()) / (g[0].std(unbiased=True) + 1e-4)
    v1 = g[1][~g[1].isnan()]
    a1 = (g[1] - v1.mean()) / (v1.std(unbiased=True) + 1e-4)
    torch.testing.assert_close(adv, torch.nan_to_num(torch.cat([a0, a1]), nan=0.0))
    assert adv[5] == 0.0
    # zero-std group -> 0; "none" does not divide; "batch" uses the batch std
    assert torch.equal(group_advantages(torch.ones(4), 2, "group"), torch.zeros(4))
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 3.0]), 2, False), torch.tensor([-1.0, 1.0]))
    rb = torch.tensor([0.0, 1.0, 3.0, 5.0])
    torch.testing.assert_close(group_advantages(rb, 2, "batch"),
                               (rb - torch.tensor([0.5, 0.5, 4.0, 4.0])) / (rb.std() + 1e-4))


def test_nanstd_and_logsoftmax_equal_trl():
    from trl.trainer import utils as tu

    x = torch.tensor([[1.0, 2.0, float("nan"), 4.0], [float("nan")] * 3 + [1.0]])
    torch.testing.assert_close(nanstd(x, dim=1), tu.nanstd(x, dim=1), equal_nan=True)
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(selective_log_softmax(logits, idx), tu.selective_log_softmax(logits, idx))
    torch.testing.assert_close(selective_log_softmax(logits.bfloat16(), idx).float(),
                               tu.selective_log_softmax(logits.bfloat16(), idx).float())


def test_rewards_none_to_nan_weighted_nansum():
    def fa(prompts, completions, answer, **kw):
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    def fb(prompts, completions, **kw):
        return [None, 0.5, None]

    rpf = compute_rewards([fa, fb], ["p"] * 3, ["x", "y", "z"], answer=["x", "q", "z"])
    assert torch.isnan(rpf[0, 1]) and rpf[1, 1] == 0.5
    torch.testing.assert_close(weighted_rewards(rpf, [1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0]))
    all_nan = weighted_rewards(torch.full((1, 2), float("nan")))
    assert torch.isnan(all_nan).all()
    with pytest.raises(PluginContractError, match="returned 1 values for 3"):
        compute_rewards([lambda prompts, completions, **k: [0.0]], ["p"] * 3, ["a"] * 3)


def test_completion_mask_keeps_first_eos_only():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 5, 5, 5]])
    assert completion_mask(ids, 1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask(ids, [7, 1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_padding_tokens_do_not_count():
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (-torch.rand(4, 6, generator=g) for _ in range(3))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.2])
    junk = torch.where(mask.bool(), logp, torch.full_like(logp, 9.0))
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        a = grpo_loss(logp, old, ref, adv, mask, beta=0.04, epsilon_low=0.2, loss_type=lt, max_completion_length=6)
        b = grpo_loss(junk, old, ref, adv, mask, beta=0.04, epsilon_low=0.2, loss_type=lt, max_completion_length=6)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1]["kl"], b[1]["kl"])


def test_accumulation_scaling_matches_one_big_batch():
    """grpo/dr_grpo: mean of micro-batch losses; dapo: sum with the window's token count (TRL)."""
    g = torch.Generator().manual_seed(1)
    logp, old, ref = (-torch.rand(4, 5, generator=g) for _ in range(3))
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0], [1] * 3 + [0] * 2])
    adv = torch.tensor([0.7, -1.0, 0.2, -0.4])
    kw = dict(beta=0.04, epsilon_low=0.2, max_completion_length=5)
    halves = [slice(0, 2), slice(2, 4)]
    for lt, combine in (("grpo", "mean"), ("dr_grpo", "mean"), ("dapo", "sum")):
        n = mask.sum() if lt == "dapo" else None
        full = grpo_loss(logp, old, ref, adv, mask, loss_type=lt, num_items_in_batch=n, **kw)[0]
        parts = torch.stack([grpo_loss(logp[h], old[h], ref[h], adv[h], mask[h], loss_type=lt,
                                       num_items_in_batch=n, **kw)[0] for h in halves])
        torch.testing.assert_close(parts.mean() if combine == "mean" else parts.sum(), full)


# --------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from medtvt_core.data.synth import synthesize

    root = tmp_path_factory.mktemp("grpo") / "data"
    synthesize(root, n_patients=16, seed=3)
    return root


def _tiny(cohort, *, on_bad_sample="fail", train_extras=False):
    """A tiny multimodal model (installed plugins) and the cohort's disease-level training split."""
    from helpers import make_model
    from medtvt_core.build import build_readers
    from medtvt_core.data.dataset import open_splits
    from medtvt_core.model.stages import configure_trainable
    from medtvt_core.plugins import get_catalog

    names = {"ecg": "ecgfm-ked", "cxr": "vit", "lab": "symile"}
    model, proc = make_model(list(names), {m: {"name": n, "options": {"variant": "tiny"}} for m, n in names.items()},
                             get_catalog())
    configure_trainable(model, "rft", train_extras=train_extras)
    readers = build_readers(list(names), {"cxr": {"train_crop": "center"}})
    ds = open_splits(cohort, modalities=readers, train_file="qa/disease_train.json", on_bad_sample=on_bad_sample,
                     persist_stats=False)["train"]
    return model, proc, ds


def _rft(**kw):
    base = dict(max_steps=2, batch_size=2, grad_accum=2, num_generations=2, lr=1e-3, beta=0.04, num_iterations=1,
                temperature=1.0, top_p=0.95, max_prompt_length=256, max_completion_length=6, logging_steps=1,
                save_steps=100)
    base.update(kw)
    return RFTConfig(**base)


def _trainer(model, proc, ds, out, rewards, **kw):
    from medtvt_core.training.arguments import training_arguments
    from medtvt_core.training.grpo import MedTVTGRPOTrainer

    cfg = _rft(**kw)
    args = training_arguments(cfg, out, seed=7, device="cpu", progress=False)
    return MedTVTGRPOTrainer(model, args, rft=cfg, processor=proc, train_dataset=ds, reward_funcs=rewards,
                             reward_names=[f.__name__ for f in rewards])


def _len_reward(prompts, completions, completion_ids, **kw):
    return [len(c) / 10.0 for c in completion_ids]


def test_frozen_reference_is_the_sft_model_not_the_base(cohort):
    model, proc, ds = _tiny(cohort)
    with torch.no_grad():  # a "trained" SFT adapter and fusion
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ref = frozen_reference(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    shared = {n for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()) if p is q}
    assert shared == frozen and frozen  # encoders and LLM base shared, LoRA + MPL copied
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    full = frozen_reference(model, share_frozen=False)
    assert not any(p is q for p, q in zip(model.parameters(), full.parameters()))
    batch = ds.collator()([ds[0], ds[1]])
    f = proc.train_features(batch["prompts"], batch["answers"])
    kw = dict(input_ids=f["input_ids"], attention_mask=f["attention_mask"], modality_mask=batch["modality_mask"],
              modality_features=batch["modality_features"], modality_inputs=batch["modality_inputs"])
    model.eval()
    with torch.no_grad():
        sft, r = model(**kw).logits, ref(**kw).logits
        with model.llm.disable_adapter():
            base = model(**kw).logits
    torch.testing.assert_close(r, sft)
    assert (r - base).abs().max() > 1e-4
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)  # training leaves the reference alone
        torch.testing.assert_close(ref(**kw).logits, r)


def test_trainer_trains_logs_and_shares_frozen_weights(cohort, tmp_path):
    model, proc, ds = _tiny(cohort)
    seen = []

    def answer_reward(prompts, completions, answer, ids, **kw):
        seen.extend(zip(ids, answer))
        return [None if i % 3 == 0 else float("Sepsis" in c) for i, c in enumerate(completions)]

    tr = _trainer(model, proc, ds, tmp_path, [_len_reward, answer_reward])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr.train()
    logs = [h for h in tr.state.log_history if "reward" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for k in ("loss", "kl", "reward", "reward_std", "frac_reward_zero_std", "rewards/_len_reward/mean",
              "rewards/answer_reward/mean", "clip_ratio/region_mean", "grad_norm", "learning_rate",
              "completions/mean_length"):
        assert k in logs[-1] and logs[-1][k] is not None and math.isfinite(logs[-1][k]), k
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in before.items() if n.startswith("fusion."))
    assert any(not torch.equal(after[n], v) for n, v in before.items() if "lora_" in n)
    ref = dict(tr.ref_model.named_parameters())
    assert all(torch.equal(ref[n], v) for n, v in before.items())  # pi_ref stays the SFT model
    # every reward call got the ground truth of its own record: 2 steps x 2 micro-batches x 2 prompts x G=2
    truth = {r.id: r.answer for r in ds.records}
    assert len(seen) == 16 and all(truth[i] == a for i, a in seen)
    assert _trainer(*_tiny(cohort), tmp_path / "b0", [_len_reward], beta=0.0).ref_model is None


def test_rollouts_do_not_depend_on_batching(cohort, tmp_path):
    """Each completion comes from its own seeded generator: the same whether its prompt is sampled
    with three others (one process) or with one other (two processes), and a different one per row."""
    model, proc, ds = _tiny(cohort)
    tr = _trainer(model, proc, ds, tmp_path, [_len_reward], num_generations=3, max_completion_length=12)
    collate = ds.collator()
    items = [ds[i] for i in range(4)]

    def completions(batch_items):  # every micro-batch (of rft.batch_size=2 prompts) of the window
        outs = tr._generate_and_score(collate(batch_items), ga=len(batch_items) // 2)
        return [tuple(c[m.bool()].tolist()) for o in outs for c, m in zip(o["completion_ids"], o["completion_mask"])]

    together = completions(items)
    apart = completions(items[:2]) + completions(items[2:])
    assert together == apart
    assert len(set(together)) > 4  # sampling, not greedy: the rows of a group differ
    tr.state.global_step = 1
    assert completions(items) != together  # a new step draws new completions


def test_bad_sample_during_rft_is_skipped_and_counted(cohort, tmp_path):
    """A file that breaks at read time under on_bad_sample=skip: the record is left out of its window,
    counted in the logs and in dataset.skipped, and no other record gets its reward."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(cohort, root)
    model, proc, ds = _tiny(root, on_bad_sample="skip")
    victim = ds.records[0]
    img = root / victim.ref("image")
    img.write_bytes(img.read_bytes()[:100])  # truncated after the dataset was opened: fails when read
    seen = []

    def answer_reward(prompts, completions, answer, ids, **kw):
        seen.extend(zip(ids, answer))
        return [float(len(c) > 3) for c in completions]

    tr = _trainer(model, proc, ds, tmp_path / "out", [answer_reward], batch_size=4, grad_accum=1,
                  max_steps=3, lr=1e-4)
    tr.train()
    assert any(s.id == victim.id and "unreadable image" in s.reason for s in ds.skipped)
    assert victim.id not in {i for i, _ in seen}
    truth = {r.id: r.answer for r in ds.records}
    assert all(truth[i] == a for i, a in seen)
    assert any(h.get("skipped_prompts") for h in tr.state.log_history)


def test_layout_errors_before_training():
    from medtvt_core.training.grpo import PromptWindowSampler, check_rft_layout

    with pytest.raises(ConfigError, match="4 process\\(es\\) x rft.batch_size=2 x rft.grad_accum=2 = 16 prompts per step, "
                                          "but RFT has 10 training record"):
        check_rft_layout(_rft(), world_size=4, n_prompts=10)
    with pytest.raises(ConfigError, match="save_steps=3 must be a multiple of rft.num_iterations=2"):
        check_rft_layout(_rft(save_steps=3, num_iterations=2), world_size=1)
    s = [PromptWindowSampler(10, per_process=2, num_processes=2, rank=r, repeats=3, seed=0) for r in (0, 1)]
    b0, b1 = list(s[0]), list(s[1])
    assert len(b0) == len(s[0]) == 6 and b0[0] == b0[1] == b0[2] and not set(b0[0]) & set(b1[0])
    assert sorted(b0[0] + b1[0] + b0[3] + b1[3]) == sorted(set(b0[0] + b1[0] + b0[3] + b1[3]))  # no repeats


def test_seeded_row_sampler_draws_from_the_top_p_distribution():
    """Its tokens follow softmax(logits / T) restricted to the smallest top-p set (restated here), and
    a row's draws depend only on its own generator."""
    from medtvt_core.model.sampling import SeededRowSampler

    torch.manual_seed(0)
    logits = torch.randn(2, 10) * 2
    T, p = 0.7, 0.8
    probs = torch.softmax(logits / T, -1)
    want = torch.zeros_like(probs)
    for r in range(2):
        order = probs[r].argsort(descending=True)
        cum = probs[r][order].cumsum(0)
        keep = order[: int((cum < p).sum()) + 1]  # smallest prefix whose mass reaches p
        want[r, keep] = probs[r, keep] / probs[r, keep].sum()
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    s = SeededRowSampler(gens, temperature=T, top_p=p, max_steps=4000)
    counts = torch.zeros_like(probs)
    for _ in range(4000):
        out = s(None, logits)
        assert ((out == 0).sum(1) == 1).all() and torch.isinf(out).sum() == 18  # one token left per row
        counts[torch.arange(2), out.argmax(1)] += 1
    freq = counts / 4000
    assert (freq[want == 0] == 0).all()
    assert (freq - want).abs().max() < 0.03, (freq, want)
    # row 1's draws do not depend on row 0 being there
    a = SeededRowSampler([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], temperature=T, top_p=p,
                         max_steps=50)
    b = SeededRowSampler([torch.Generator().manual_seed(6)], temperature=T, top_p=p, max_steps=50)
    for _ in range(50):
        assert a(None, logits)[1].argmax() == b(None, logits[1:])[0].argmax()


def test_grpo_raises_the_reward_of_a_small_task(cohort, tmp_path):
    """GRPO learns: a tiny untrained model, rewarded for writing tokens from the lower half of the
    vocabulary (about half of its sampled tokens at first: SFT never asked for it), raises its mean
    reward by at least 0.3 within 24 steps.  Margin and steps fixed in advance; seeds fixed.  RFT
    trains the LLM extras too, as the demo and the reference do (the tied embeddings let a random
    64-wide model express a preference over half its vocabulary at all)."""
    model, proc, ds = _tiny(cohort, train_extras=True)
    half = len(proc.tokenizer) // 2

    def low_tokens(prompts, completions, completion_ids, **kw):
        return [sum(t < half for t in c) / max(len(c), 1) for c in completion_ids]

    tr = _trainer(model, proc, ds, tmp_path, [low_tokens], max_steps=24, batch_size=2, grad_accum=1,
                  num_generations=4, lr=3e-2, beta=0.0, max_completion_length=8)
    tr.train()
    r = [h["reward"] for h in tr.state.log_history if "reward" in h]
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert len(r) == 24 and 0.3 < first < 0.7, r
    assert last - first >= 0.3, (first, last, r)  # measured here: 0.51 -> 1.00


def test_the_trainers_reward_scores_are_the_evaluations():
    """RFT scores completions the way evaluation does (one function, plugin_calls.call_rewards): the
    orchestrator's reward list through the trainer's path (compute_rewards with RFT's keyword arguments,
    then weighted_rewards) and evaluation's reward_values give the same numbers on the same completions,
    an undefined reward included."""
    from medtvt_core.config import RewardRef
    from medtvt_core.plugins import get_catalog
    from medtvt_core.run.evaluation import _reward_columns, reward_values
    from medtvt_core.training.grpo.math import compute_rewards, weighted_rewards

    catalog = get_catalog()
    refs = [RewardRef(name="format", weight=1.0), RewardRef(name="jaccard", weight=0.5)]
    answer = "<think> ECG: sinus 72 bpm. </think><answer>Hypertension, Sepsis</answer>"
    completions = [
        answer,                                                                     # exact
        "<think> fast. </think><answer>Sepsis, Pneumonia</answer>",                  # partial
        "<think> no answer block </think>",                                          # malformed
        "<answer>Hypertension</answer>",                                             # no reasoning
        "",                                                                          # empty
        "<think> a </think><answer>Hypertension, Sepsis</answer><answer>x</answer>",  # two blocks
    ]
    n = len(completions)
    prompts = ["Which diseases?"] * n
    answers = [answer] * (n - 1) + [None]  # no ground truth: Jaccard undefined (None)
    records = [{"prompt": p, "prediction": c, "reference": a, "id": f"r{i}"}
               for i, (p, c, a) in enumerate(zip(prompts, completions, answers))]
    funcs = [catalog.rewards.get(r.name) for r in refs]  # what Run._run_rft hands the trainer
    rpf = compute_rewards(funcs, prompts, completions, [r.name for r in refs], answer=answers,
                          ids=[r["id"] for r in records], completion_ids=[[1, 2]] * n, trainer_state=None)
    trained = weighted_rewards(rpf, [r.weight for r in refs])
    cols = _reward_columns(records, refs, catalog)
    for j in range(len(refs)):
        assert [None if v != v else v for v in rpf[:, j].tolist()] == \
            [None if v is None else float(torch.tensor(v, dtype=torch.float32)) for v in cols[j]]
    evaluated = reward_values(records, refs, catalog)
    assert len(set(rpf[:, 0].tolist())) > 1 and len(set(rpf[:-1, 1].tolist())) > 1  # the cases differ
    assert cols[1][-1] is None and math.isnan(rpf[-1, 1]) and evaluated[-1] == trained[-1].item() == rpf[-1, 0]
    for t, e in zip(trained.tolist(), evaluated):
        assert (e is None and t != t) or t == pytest.approx(e, abs=1e-6)
