"""grpo_loss == TRL 1.16's own ``GRPOTrainer._compute_loss`` under TRL's defaults (and off them).

The oracle is a real ``GRPOTrainer`` (TRL 1.16) built once around a tiny random Llama; each case
sets the trainer attributes ``_compute_loss`` reads (loss_type, beta, use_bias_correction_kl,
delta, current_gradient_accumulation_steps, steps_per_generation), calls ``compute_loss`` on a
prepared batch and backpropagates. Our side runs the same policy forward itself (logits /
temperature, :func:`selective_log_softmax`) and :func:`grpo_loss`. Compared: the loss, the gradient
of every parameter and the metrics TRL logs.

The batch is off-policy in both directions: the reference is a perturbed copy of the policy
(KL != 0) and the old log-probs come from another perturbed copy, so that tokens are clipped on
both sides; completions end in EOS followed by padding, one is fully masked (a truncated
completion under ``mask_truncated_completions``), and the old/ref log-probs hold junk at padded
positions, which must not count.

Tolerances (float32, CPU): loss ``atol=1e-6, rtol=1e-5``; gradients ``atol=1e-6, rtol=1e-4``;
metrics ``abs=1e-6``. TRL computes log-probs with its own chunked fused LM head (custom backward),
so agreement is to rounding, not bit-exact.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from medtvt_core.training.grpo.math import grpo_loss, selective_log_softmax

B, G, P, L, T = 8, 4, 5, 7, 0.7  # rows, generations per prompt, prompt length, completion length, temperature
EPS_LOW, EPS_HIGH = 0.2, 0.28
PAD, EOS = 0, 1
LOSS_TOL = {"atol": 1e-6, "rtol": 1e-5}
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}
METRIC_TOL = 1e-6
METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "clip_ratio/low_min", "clip_ratio/high_max")


# --------------------------------------------------------------------------- fixtures
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *(f"w{i}" for i in range(61))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _perturbed(model, scale, seed):
    c = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    c.requires_grad_(False)
    return c


def _logps(model, pid, pmask, cid, cmask, *, entropy=False):
    """Our per-token log-probs of the completion: logits / T, selective log-softmax (no TRL code)."""
    out = model(input_ids=torch.cat([pid, cid], 1), attention_mask=torch.cat([pmask, cmask], 1))
    logits = out.logits[:, P - 1:-1] / T
    lp = selective_log_softmax(logits, cid)
    if not entropy:
        return lp
    logp_all = torch.log_softmax(logits.detach(), -1)
    return lp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tk = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tk), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    ref_model = _perturbed(policy, 0.05, seed=1)  # a reference different from the policy
    old_model = _perturbed(policy, 0.02, seed=2)  # the policy that "sampled": off-policy old log-probs

    g = torch.Generator().manual_seed(3)
    pid = torch.randint(3, len(tk), (B, P), generator=g)
    pmask = torch.ones_like(pid)
    pmask[1, :2] = pmask[6, :1] = 0  # left padding
    pid = pid.masked_fill(pmask == 0, PAD)
    cid = torch.randint(3, len(tk), (B, L), generator=g)
    cid[0, 2] = cid[3, 5] = cid[4, 0] = cid[6, 3] = EOS
    cmask = torch.ones_like(cid)
    for i in range(B):
        hit = (cid[i] == EOS).nonzero()
        if len(hit):
            cmask[i, hit[0, 0] + 1:] = 0  # padding after EOS
    cmask[7] = 0  # truncated completion, masked out entirely (mask_truncated_completions)
    cid = cid.masked_fill(cmask == 0, PAD)
    adv = torch.tensor([1.2, -0.8, 0.5, -1.5, 0.9, -0.3, 0.7, -1.1])

    with torch.no_grad():
        old = _logps(old_model, pid, pmask, cid, cmask)
        ref = _logps(ref_model, pid, pmask, cid, cmask)
    junk = 1.0 - cmask.float()  # padded positions: junk old/ref log-probs (must not count anywhere)
    old, ref = old + 2.0 * junk, ref - 3.0 * junk

    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=B,
                      num_generations=G, beta=0.0, epsilon=EPS_LOW, epsilon_high=EPS_HIGH, temperature=T,
                      max_completion_length=L, use_vllm=False, report_to="none", bf16=False,
                      activation_checkpointing=False, use_cpu=True, save_strategy="no", logging_steps=1)
    assert args.loss_type == "dapo" and args.use_bias_correction_kl is True and args.delta is None  # TRL defaults
    trainer = GRPOTrainer(model=policy, reward_funcs=[lambda prompts, completions, **k: [0.0] * len(prompts)],
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tk)
    trainer.model.train()
    batch = {"pid": pid, "pmask": pmask, "cid": cid, "cmask": cmask, "adv": adv, "old": old, "ref": ref}
    return trainer, policy, batch


def _configure(trainer, *, loss_type, beta, bias, gas=1, spg=1, delta=None, level="token", eps_high=EPS_HIGH,
               sapo=(1.0, 1.05), eps_low=EPS_LOW):
    """Set what TRL's `_compute_loss` reads (constructed with beta=0, so no hub reference is loaded)."""
    trainer.epsilon_low = trainer.args.epsilon = eps_low
    trainer.loss_type = trainer.args.loss_type = loss_type
    trainer.importance_sampling_level = trainer.args.importance_sampling_level = level
    trainer.epsilon_high = trainer.args.epsilon_high = eps_high
    trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = sapo
    trainer.beta = trainer.args.beta = beta
    trainer.args.use_bias_correction_kl = bias
    trainer.args.delta = delta
    trainer.args.steps_per_generation = spg
    trainer.current_gradient_accumulation_steps = gas  # set by Trainer's training loop; we call compute_loss directly
    trainer._metrics["train"].clear()


def _trl(trainer, policy, b, num_items):
    inputs = {"prompt_ids": b["pid"], "prompt_mask": b["pmask"], "completion_ids": b["cid"],
              "completion_mask": b["cmask"], "advantages": b["adv"], "old_per_token_logps": b["old"],
              "ref_per_token_logps": b["ref"], "num_items_in_batch": torch.as_tensor(num_items)}
    policy.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _ours(policy, b, rows=slice(None), **kw):
    lp, ent = _logps(policy, b["pid"][rows], b["pmask"][rows], b["cid"][rows], b["cmask"][rows], entropy=True)
    kw.setdefault("epsilon_high", EPS_HIGH)
    kw.setdefault("epsilon_low", EPS_LOW)
    return grpo_loss(lp, b["old"][rows], b["ref"][rows], b["adv"][rows], b["cmask"][rows],
                     max_completion_length=L, entropies=ent, **kw)


def _grads(policy, loss):
    policy.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    return grads


def _max_grad_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


# (loss_type, beta, use_bias_correction_kl, current_gradient_accumulation_steps, steps_per_generation, extra
#  active tokens of the generation batch beyond this micro-batch, delta)
CASES = [
    ("dapo", 0.04, True, 1, 1, 0, None),
    ("dapo", 0.04, False, 1, 1, 0, None),
    ("dapo", 0.0, True, 1, 1, 0, None),
    ("dapo", 0.04, True, 2, 4, 97, None),  # one of 4 micro-batches of a generation batch, 2-step accumulation
    ("dapo", 0.04, False, 2, 4, 97, None),
    ("dapo", 0.04, True, 3, 3, 61, None),
    ("dapo", 0.0, True, 2, 2, 40, None),
    ("dapo", 0.04, True, 1, 1, 0, 1.3),  # two-sided clipping (INTELLECT-2 delta)
    *[(lt, beta, bias, gas, gas, 0, None) for lt in ("grpo", "bnpo", "dr_grpo")
      for beta, bias in ((0.04, True), (0.04, False), (0.0, True)) for gas in (1, 2)],
]


@pytest.mark.parametrize("loss_type,beta,bias,gas,spg,extra,delta", CASES,
                         ids=[f"{c[0]}-beta{c[1]}-bias{int(c[2])}-gas{c[3]}-spg{c[4]}"
                              + (f"-delta{c[6]}" if c[6] else "") for c in CASES])
def test_loss_grads_metrics_equal_trl(setup, loss_type, beta, bias, gas, spg, extra, delta):
    trainer, policy, b = setup
    num_items = b["cmask"].sum() + extra  # TRL: active tokens of the whole generation batch, all processes
    _configure(trainer, loss_type=loss_type, beta=beta, bias=bias, gas=gas, spg=spg, delta=delta)
    loss_trl, grads_trl, m_trl = _trl(trainer, policy, b, num_items)

    loss, m = _ours(policy, b, beta=beta, loss_type=loss_type, num_items_in_batch=num_items,
                    gradient_accumulation_steps=gas, steps_per_generation=spg,
                    use_bias_correction_kl=bias, delta=delta)
    grads = _grads(policy, loss)
    dl, dg = (loss.detach() - loss_trl).abs().item(), _max_grad_diff(grads, grads_trl)
    print(f"\n|loss diff| {dl:.2e}  max|grad diff| {dg:.2e}  loss {loss.item():.6f}")

    torch.testing.assert_close(loss.detach(), loss_trl, **LOSS_TOL)
    assert grads.keys() == grads_trl.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(grads[n], grads_trl[n], **GRAD_TOL, msg=lambda s, n=n: f"{n}: {s}")
    expected = [k for k in METRICS if k != "kl" or beta != 0.0]
    assert set(expected) <= m.keys() and ("kl" in m) == (beta != 0.0)
    for k in expected:
        assert m[k].item() == pytest.approx(m_trl[k], abs=METRIC_TOL), k
    # the batch exercises what it claims: clipping on both sides, non-zero KL
    assert m["clip_ratio/low_mean"] > 0.02 and m["clip_ratio/high_mean"] > 0.02
    if beta:
        assert m["kl"] > 1e-3


# TRL 1.16's other one-turn losses: GSPO (sequence-level ratios; the paper's setup: loss_type grpo, clip
# ranges 3e-4/4e-4, which clip half of the rows here, on both sides),
# cispo (epsilon_high is its maximum ratio: 1.05 here, so some ratios are capped and some not) and sapo
# (temperatures off TRL's defaults, and unequal, so that the sign of A picks one).
# (loss_type, importance_sampling_level, beta, use_bias_correction_kl, gas, spg, extra, epsilon_high, sapo temps)
SEQ_EPS = (0.0003, 0.0004)
NEW_CASES = [
    ("grpo", "sequence", 0.04, True, 2, 2, 0, SEQ_EPS[1], (1.0, 1.05)),
    ("dapo", "sequence", 0.04, True, 2, 4, 97, SEQ_EPS[1], (1.0, 1.05)),
    ("dapo", "sequence", 0.0, True, 1, 1, 0, SEQ_EPS[1], (1.0, 1.05)),
    ("cispo", "token", 0.04, True, 2, 4, 97, 1.05, (1.0, 1.05)),
    ("cispo", "token", 0.0, True, 1, 1, 0, 1.05, (1.0, 1.05)),
    ("cispo", "sequence", 0.04, False, 1, 1, 0, 1.05, (1.0, 1.05)),
    ("sapo", "token", 0.04, True, 2, 2, 0, EPS_HIGH, (1.0, 1.05)),
    ("sapo", "token", 0.0, True, 1, 1, 0, EPS_HIGH, (2.0, 0.5)),
    ("sapo", "sequence", 0.04, True, 1, 1, 0, EPS_HIGH, (1.0, 1.05)),
]


@pytest.mark.parametrize("loss_type,level,beta,bias,gas,spg,extra,eps_high,sapo", NEW_CASES,
                         ids=[f"{c[0]}-{c[1]}-beta{c[2]}-bias{int(c[3])}-gas{c[4]}-spg{c[5]}-epsh{c[7]}-tau{c[8][0]}"
                              for c in NEW_CASES])
def test_gspo_cispo_sapo_equal_trl(setup, loss_type, level, beta, bias, gas, spg, extra, eps_high, sapo):
    trainer, policy, b = setup
    num_items = b["cmask"].sum() + extra
    eps_low = SEQ_EPS[0] if level == "sequence" and loss_type not in ("cispo", "sapo") else EPS_LOW
    _configure(trainer, loss_type=loss_type, beta=beta, bias=bias, gas=gas, spg=spg, level=level,
               eps_high=eps_high, sapo=sapo, eps_low=eps_low)
    try:
        loss_trl, grads_trl, m_trl = _trl(trainer, policy, b, num_items)
    finally:  # the module's trainer goes back to what the other tests expect
        _configure(trainer, loss_type="dapo", beta=0.0, bias=True)
    loss, m = _ours(policy, b, beta=beta, loss_type=loss_type, num_items_in_batch=num_items,
                    gradient_accumulation_steps=gas, steps_per_generation=spg, use_bias_correction_kl=bias,
                    importance_sampling_level=level, epsilon_low=eps_low, epsilon_high=eps_high,
                    sapo_temperature_pos=sapo[0],
                    sapo_temperature_neg=sapo[1])
    grads = _grads(policy, loss)
    dl, dg = (loss.detach() - loss_trl).abs().item(), _max_grad_diff(grads, grads_trl)
    print(f"\n|loss diff| {dl:.2e}  max|grad diff| {dg:.2e}  loss {loss.item():.6f}")
    torch.testing.assert_close(loss.detach(), loss_trl, **LOSS_TOL)
    assert grads.keys() == grads_trl.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(grads[n], grads_trl[n], **GRAD_TOL, msg=lambda s, n=n: f"{n}: {s}")
    assert set(m) == set(m_trl) - {"num_tokens"}, (sorted(m), sorted(m_trl))
    for k in m:
        assert m[k].item() == pytest.approx(m_trl[k], abs=METRIC_TOL), k
    # the batch exercises what it claims
    if loss_type == "cispo":
        assert 0.05 < m["cispo_clip_ratio"] < 0.95
    elif loss_type != "sapo":
        assert m["clip_ratio/low_mean"] > 0.02 and m["clip_ratio/high_mean"] > 0.02
    if beta:
        assert m["kl"] > 1e-3


def test_new_loss_options_change_the_result(setup):
    """The parity cases would not notice an ignored level/temperature unless these change the loss."""
    _, policy, b = setup
    base = {"beta": 0.04, "loss_type": "dapo"}
    tok = _ours(policy, b, **base)[0]
    seq = _ours(policy, b, importance_sampling_level="sequence", **base)[0]
    s1 = _ours(policy, b, beta=0.04, loss_type="sapo")[0]
    s2 = _ours(policy, b, beta=0.04, loss_type="sapo", sapo_temperature_pos=2.0)[0]
    c1 = _ours(policy, b, beta=0.04, loss_type="cispo", epsilon_high=1.05)[0]
    c2 = _ours(policy, b, beta=0.04, loss_type="cispo", epsilon_high=5.0)[0]
    assert min((tok - seq).abs(), (s1 - s2).abs(), (c1 - c2).abs()).item() > 1e-4
    with pytest.raises(Exception, match="importance_sampling_level"):
        _ours(policy, b, importance_sampling_level="sentence", **base)


def test_bias_correction_and_delta_matter(setup):
    """The cases above would not notice a missing correction/delta unless these change the result."""
    _, policy, b = setup
    kw = {"beta": 0.04, "loss_type": "dapo"}
    on, m_on = _ours(policy, b, use_bias_correction_kl=True, **kw)
    g_on = _grads(policy, on)
    off, m_off = _ours(policy, b, use_bias_correction_kl=False, **kw)
    g_off = _grads(policy, off)
    dl, dg = (on - off).abs().item(), _max_grad_diff(g_on, g_off)
    print(f"\ncorrection on vs off: |loss diff| {dl:.2e}  max|grad diff| {dg:.2e}")
    assert dl > 5e-5 and dg > 1e-4  # far above the parity tolerances
    assert m_on["kl"] != m_off["kl"]  # TRL logs the corrected KL
    d, _ = _ours(policy, b, delta=1.3, **kw)
    assert (d - on).abs().item() > 1e-4
    # on-policy (old=None): the ratio is 1, yet differentiable, so the correction still changes the gradient
    lp = _logps(policy, b["pid"], b["pmask"], b["cid"], b["cmask"])
    a = grpo_loss(lp, None, b["ref"], b["adv"], b["cmask"], beta=0.04)[0]
    lp2 = _logps(policy, b["pid"], b["pmask"], b["cid"], b["cmask"])
    c = grpo_loss(lp2, None, b["ref"], b["adv"], b["cmask"], beta=0.04, use_bias_correction_kl=False)[0]
    torch.testing.assert_close(a, c)
    assert _max_grad_diff(_grads(policy, a), _grads(policy, c)) > 1e-5


def test_two_processes_equal_trl_single_process(setup):
    """Rows split over 2 emulated processes: DDP's gradient mean of our per-process losses, and the
    metrics reduced with ``reduce``/``gather`` (a thread-barrier all-reduce / all-gather), equal TRL on
    the whole batch in one process (``num_items_in_batch`` is the global count on every process)."""
    trainer, policy, b = setup
    gas, spg, extra = 2, 4, 97
    num_items = b["cmask"].sum() + extra
    _configure(trainer, loss_type="dapo", beta=0.04, bias=True, gas=gas, spg=spg)
    loss_trl, grads_trl, m_trl = _trl(trainer, policy, b, num_items)

    halves = (slice(0, 3), slice(3, B))  # unequal rows and tokens per process
    slots: list = [None, None]
    barrier = threading.Barrier(2)

    def collective(rank, combine):
        def fn(t):
            slots[rank] = t
            barrier.wait()
            out = combine(slots)
            barrier.wait()
            return out
        return fn

    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def run(rank):
        try:
            with torch.no_grad():
                results[rank] = _ours(policy, b, halves[rank], beta=0.04, num_items_in_batch=num_items,
                                      num_processes=2, gradient_accumulation_steps=gas, steps_per_generation=spg,
                                      reduce=collective(rank, lambda s: s[0] + s[1]),
                                      gather=collective(rank, lambda s: torch.cat(s)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for rank in (0, 1):
        for k in METRICS:
            assert results[rank][1][k].item() == pytest.approx(m_trl[k], abs=METRIC_TOL), (rank, k)

    # gradients: DDP averages the per-process gradients
    losses = [_ours(policy, b, h, beta=0.04, num_items_in_batch=num_items, num_processes=2,
                    gradient_accumulation_steps=gas, steps_per_generation=spg)[0] for h in halves]
    torch.testing.assert_close(sum(losses) / 2, loss_trl, **LOSS_TOL)
    grads = _grads(policy, sum(losses) / 2)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_trl[n], **GRAD_TOL)
    print(f"\n2 processes: |loss diff| {(sum(losses) / 2 - loss_trl).abs().item():.2e}  "
          f"max|grad diff| {_max_grad_diff(grads, grads_trl):.2e}")


def test_defaults_are_trl_defaults():
    import inspect

    from trl import GRPOConfig

    sig = inspect.signature(grpo_loss).parameters
    c = GRPOConfig(output_dir="unused", use_cpu=True, report_to="none")
    assert sig["loss_type"].default == c.loss_type == "dapo"
    assert sig["beta"].default == c.beta and sig["epsilon_low"].default == c.epsilon
    assert sig["epsilon_high"].default is c.epsilon_high is None and sig["delta"].default is c.delta is None
    assert sig["use_bias_correction_kl"].default is c.use_bias_correction_kl is True
