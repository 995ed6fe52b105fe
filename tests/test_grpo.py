"""GRPO: pure functions, parity of the loss with TRL 1.16's GRPOTrainer, the loop and bit-exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from medtvt_core.config import RFTConfig
from medtvt_core.errors import CheckpointError, PluginContractError
from medtvt_core.training.grpo import (
    CausalLMPolicy,
    GRPOLoop,
    GRPOPolicy,
    completion_mask_after_eos,
    compute_rewards,
    frozen_reference,
    group_advantages,
    grpo_loss,
    nanstd,
    repeat_batch,
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
    assert completion_mask_after_eos(ids, 1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask_after_eos(ids, [7, 1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


def test_repeat_batch_keeps_present_rows_in_order():
    batch = {"ids": ["a", "b"], "modality_mask": torch.tensor([[True, False], [True, True]]),
             "modality_features": {"ecg": torch.tensor([[1.0], [2.0]]), "cxr": torch.tensor([[3.0]])},
             "modality_names": ("ecg", "cxr"), "note": None}
    r = repeat_batch(batch, 2)
    assert r["ids"] == ["a", "a", "b", "b"] and r["modality_names"] == ("ecg", "ecg", "cxr", "cxr")
    assert r["modality_mask"][:, 1].tolist() == [False, False, True, True]
    assert r["modality_features"]["ecg"].flatten().tolist() == [1.0, 1.0, 2.0, 2.0]
    assert r["modality_features"]["cxr"].flatten().tolist() == [3.0, 3.0] and r["note"] is None


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


# --------------------------------------------------------------------------- parity with TRL
def _trl_trainer(model, tk, out, *, loss_type, beta, temperature, max_len):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=6, num_generations=2, beta=beta,
                      loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, temperature=temperature,
                      max_completion_length=max_len, use_vllm=False, report_to="none", bf16=False,
                      activation_checkpointing=False, use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **k: [0.0] * len(prompts)],
                          args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tk)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop; we call compute_loss directly
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_grads_equal_trl(tiny_dir, tmp_path, loss_type):
    """Our grpo_loss on CausalLMPolicy log-probs == GRPOTrainer.compute_loss (loss, grads, KL, clip ratios).

    TRL's reference model is loaded from the saved directory (offline); ours is frozen_reference().
    Old log-probs are perturbed so that clipping is active on both sides.
    """
    G, L, T, beta = 2, 7, 0.7, 0.04
    model, tk = _load(tiny_dir)
    policy = CausalLMPolicy(model, tk)
    ref = frozen_reference(policy)  # before TRL patches `model.forward` (a deepcopy would share its closure)
    trainer = _trl_trainer(model, tk, tmp_path, loss_type=loss_type, beta=beta, temperature=T, max_len=L)

    pid, pmask = policy.tokenize_prompts(PROMPTS)
    pid, pmask = pid.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0)
    g = torch.Generator().manual_seed(3)
    cid = torch.randint(3, len(tk), (pid.size(0), L), generator=g)
    cid[0, 2] = cid[3, 5] = cid[4, 0] = tk.eos_token_id
    cmask = completion_mask_after_eos(cid, tk.eos_token_id)
    cid = cid.masked_fill(cmask == 0, tk.pad_token_id)
    adv = torch.tensor([1.2, -0.8, 0.5, -1.5, 0.9, -0.3])
    with torch.no_grad():
        lp0 = policy.per_token_logps(None, pid, pmask, cid, cmask, temperature=T)
        old = lp0 + (torch.rand(lp0.shape, generator=g) - 0.5) * 0.8 * cmask
        ref_ours = ref.per_token_logps(None, pid, pmask, cid, cmask, temperature=T)
        ref_trl = trainer._get_per_token_logps_and_entropies(
            trainer.ref_model, torch.cat([pid, cid], 1), torch.cat([pmask, cmask], 1), L)[0]
    torch.testing.assert_close(ref_ours * cmask, ref_trl * cmask, atol=1e-6, rtol=1e-5)
    chunked = CausalLMPolicy(model, tk, logps_batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(chunked.per_token_logps(None, pid, pmask, cid, cmask, temperature=T), lp0)

    inputs = {"prompt_ids": pid, "prompt_mask": pmask, "completion_ids": cid, "completion_mask": cmask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref_trl,
              "num_items_in_batch": cmask.sum()}
    params = [p for p in model.parameters() if p.requires_grad]
    loss_trl = trainer.compute_loss(trainer.model, inputs)
    loss_trl.backward()
    grads_trl = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    logps = policy.per_token_logps(None, pid, pmask, cid, cmask, temperature=T)
    loss, m = grpo_loss(logps, old, ref_ours, adv, cmask, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                        loss_type=loss_type, max_completion_length=L, num_items_in_batch=cmask.sum())
    loss.backward()
    torch.testing.assert_close(loss, loss_trl.detach(), atol=1e-6, rtol=1e-5)
    for a, b in zip(params, grads_trl):
        torch.testing.assert_close(a.grad, b, atol=1e-6, rtol=1e-4)
    tm = trainer._metrics["train"]
    for k in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert m[k].item() == pytest.approx(tm[k][-1], abs=1e-6), k
    assert m["clip_ratio/low_mean"] > 0 and m["clip_ratio/high_mean"] > 0


# --------------------------------------------------------------------------- reference and loop
def test_frozen_reference_is_sft_adapter_not_base(tiny_dir):
    from peft import LoraConfig, get_peft_model

    model, tk = _load(tiny_dir)
    torch.manual_seed(1)  # init_lora_weights=False: non-zero B, i.e. a "trained" SFT adapter
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy = CausalLMPolicy(peft_model, tk)
    ref = frozen_reference(policy)
    assert not any(p.requires_grad for p in ref.model.parameters())
    assert all(p.requires_grad for p in policy.trainable_parameters())
    pairs = list(zip(peft_model.named_parameters(), ref.model.named_parameters()))
    assert all((p is q) == ("lora_" not in n) for (n, p), (_, q) in pairs)  # base shared, adapter copied
    full = frozen_reference(policy, share_frozen=False)
    assert not any(p is q for p, q in zip(peft_model.parameters(), full.model.parameters()))
    pid, pmask = policy.tokenize_prompts(PROMPTS)
    cid = torch.randint(3, len(tk), (3, 5), generator=torch.Generator().manual_seed(0))
    cmask = torch.ones_like(cid)
    with torch.no_grad():
        sft = policy.per_token_logps(None, pid, pmask, cid, cmask)
        r = ref.per_token_logps(None, pid, pmask, cid, cmask)
        with peft_model.disable_adapter():
            base = policy.per_token_logps(None, pid, pmask, cid, cmask)
    torch.testing.assert_close(r, sft)
    assert (r - base).abs().max() > 1e-3
    with torch.no_grad():
        policy.trainable_parameters()[0].add_(1.0)  # training the policy leaves the reference alone
        torch.testing.assert_close(ref.per_token_logps(None, pid, pmask, cid, cmask), r)


def _rft(**kw):
    base = dict(max_steps=4, batch_size=2, grad_accum=2, num_generations=2, lr=1e-3, beta=0.04,
                num_iterations=2, temperature=1.0, top_p=0.95, max_prompt_length=16, max_completion_length=6,
                logging_steps=1, save_steps=2)
    base.update(kw)
    return RFTConfig(**base)


DATA = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS * 2, ["fever", "pain", "yes", "no", "high", "low"])]


def _reward_len(prompts, completions, answer, completion_ids, **kw):
    assert len(answer) == len(prompts) == len(completion_ids)
    return [len(c) / 10.0 for c in completion_ids]


def _reward_answer(prompts, completions, answer, **kw):
    return [None if i % 3 == 0 else float(a in c) for i, (c, a) in enumerate(zip(completions, answer))]


def _loop(d, out=None, callbacks=(), **kw):
    model, tk = _load(d)
    policy = CausalLMPolicy(model, tk, max_prompt_length=16)
    return GRPOLoop(policy, [_reward_len, _reward_answer], DATA, _rft(**kw), reward_weights=[1.0, 0.5], seed=7,
                    output_dir=out, callbacks=callbacks)


def test_loop_trains_and_logs(tiny_dir):
    logs = []
    loop = _loop(tiny_dir, callbacks=[lambda ev, lp, rec: logs.append((ev, rec.get("step")))])
    assert isinstance(loop.policy, GRPOPolicy) and loop.ref_policy is not None
    before = [p.detach().clone() for p in loop.params]
    hist = loop.train()
    assert [h["step"] for h in hist] == [1, 2, 3, 4] and loop.state.rounds == 2
    for k in ("loss", "kl", "reward", "rewards/_reward_len/mean", "rewards/_reward_answer/mean",
              "clip_ratio/region_mean", "grad_norm", "learning_rate", "completions/mean_length",
              "rollout/tokens_per_second"):
        assert k in hist[-1] and math.isfinite(hist[-1][k]), k
    assert hist[0]["kl"] == 0.0 and hist[1]["kl"] > 0.0  # second iteration on the same rollout moved away
    assert any(not torch.equal(a, b) for a, b in zip(before, loop.params))
    assert ("log", 4) in logs and logs[-1] == ("end", 4)
    # beta = 0: no reference model is built; every loss type runs
    assert _loop(tiny_dir, beta=0.0, max_steps=1).ref_policy is None
    for lt in ("bnpo", "dr_grpo", "dapo"):
        h = _loop(tiny_dir, loss_type=lt, max_steps=1, num_iterations=1).train()
        assert math.isfinite(h[-1]["loss"]) and "kl" in h[-1]


def _run_then_kill9(model_dir, out):
    """Child process: train, and SIGKILL itself right after the first checkpoint."""
    import os
    import signal

    def kill(event, loop, logs):
        if event == "save":
            os.kill(os.getpid(), signal.SIGKILL)

    _loop(model_dir, out, callbacks=[kill]).train()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_resume_after_real_kill_is_bit_identical(tiny_dir, tmp_path):
    """Kill -9 a run after its first checkpoint (step 2 of 4), resume in a fresh loop: same result.

    The killed run is a forked child (no second interpreter start-up); one thread everywhere so
    the child and the parent reduce in the same order.
    """
    import multiprocessing as mp

    torch.set_num_threads(1)  # the autouse fixture restores the count
    child = mp.get_context("fork").Process(target=_run_then_kill9, args=(tiny_dir, tmp_path / "b"))
    child.start()
    child.join(300)
    assert child.exitcode == -9
    assert GRPOLoop.latest_checkpoint(tmp_path / "b").name == "checkpoint-2"

    full = _loop(tiny_dir, tmp_path / "a")
    full.train()
    resumed = _loop(tiny_dir, tmp_path / "b")
    resumed.train(resume_from="latest")
    assert resumed.state.global_step == 4
    for a, b in zip(full.params, resumed.params):
        assert torch.equal(a, b)
    for a, b in zip(full.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    drop = ("step_time", "round_seconds", "rollout/seconds", "rollout/tokens_per_second")
    strip = [[{k: v for k, v in h.items() if k not in drop} for h in lp.history] for lp in (full, resumed)]
    assert strip[0] == strip[1]
    with pytest.raises(CheckpointError, match="missing"):
        resumed.load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- the multimodal model
_CORPUS = ["<think> irregular rhythm, raised creatinine </think><answer> Atrial Fibrillation; Sepsis </answer>",
           "The ECG <ecg> shows atrial fibrillation. The chest x-ray <cxr> shows consolidation.",
           "Labs <lab>: creatinine raised, white cells raised, lactate normal. Which diseases?"] * 20


def test_loop_drives_the_multimodal_model(tmp_path):
    """GRPOLoop + MedTVTPolicy on a tiny MedTVTModel (installed plugins, tiny variants), TRL-style rewards."""
    from helpers import make_model
    from medtvt_core.model.stages import configure_trainable
    from medtvt_core.plugins import get_catalog
    from medtvt_core.training.grpo import MedTVTPolicy

    cat = get_catalog()
    need = {"encoders": ["ecgfm-ked", "vit", "symile"], "fusion": ["mpl"], "llms": ["llama-lora"],
            "rewards": ["format", "jaccard"]}
    missing = [f"{k}:{n}" for k, names in need.items() for n in names if n not in cat[k]]
    assert not missing, f"built-in plugins missing (reinstall the package): {', '.join(missing)}"
    names = {"ecg": "ecgfm-ked", "cxr": "vit", "lab": "symile"}
    model, proc = make_model(list(names), {m: {"name": n, "options": {"variant": "tiny"}} for m, n in names.items()},
                             cat)
    configure_trainable(model, "rft")
    g = torch.Generator().manual_seed(0)
    shapes = {m: model.encoders[m].input_shape for m in names}
    present = [(True, True, True), (False, True, True), (True, False, True), (True, True, False)]
    records = []
    for i, pr in enumerate(present):
        parts = [f"{m} <{m}>" if p else f"({m} not available)" for m, p in zip(names, pr)]
        records.append({"id": i, "prompt": " ".join(parts) + ". Which diseases?",
                        "answer": "<answer> Atrial Fibrillation; Sepsis </answer>", "present": pr,
                        "inputs": {m: torch.randn(shapes[m], generator=g) for m, p in zip(names, pr) if p}})

    def collate(recs):
        mask = torch.tensor([r["present"] for r in recs], dtype=torch.bool)
        inputs = {m: torch.stack([r["inputs"][m] for r in recs if m in r["inputs"]]) for m in names
                  if any(m in r["inputs"] for r in recs)}
        return {"ids": [r["id"] for r in recs], "prompts": [r["prompt"] for r in recs], "modality_mask": mask,
                "modality_inputs": inputs}

    policy = MedTVTPolicy(model, proc, max_prompt_length=64)
    loop = GRPOLoop(policy, [cat.rewards.get("format"), cat.rewards.get("jaccard")], records,
                    _rft(max_steps=2, num_iterations=1, grad_accum=1, max_completion_length=6), collate_fn=collate,
                    reward_names=["format", "jaccard"], seed=0)
    ref_model = loop.ref_policy.model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    shared = {n for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()) if p is q}
    assert shared == frozen and frozen  # encoders and LLM base shared, LoRA + MPL copied
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    hist = loop.train()
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["kl"]) for h in hist)
    assert "rewards/jaccard/mean" in hist[-1]
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in before.items() if "fusion" in n)
    assert any(not torch.equal(after[n], v) for n, v in before.items() if "lora_" in n)
    assert all(torch.equal(dict(ref_model.named_parameters())[n], v) for n, v in before.items())
