"""Built-in fusion plugins (mpl, cmha, cao, none): shapes, masking, the formulas of docs/method.md, gradients."""

from __future__ import annotations

import math

import pytest
import torch

import medtvt_plugins.fusion.builtin as builtin
from medtvt_core.contracts import Fusion, FusionOutput
from medtvt_core.errors import ConfigError
from medtvt_core.plugins import build_catalog
from medtvt_core.testing.checks import check_plugin
from medtvt_plugins.fusion.builtin import CAOFusion, CMHAFusion, MPLConfig, MPLFusion, NoFusion

D = 32
PLUGINS = ["mpl", "cmha", "cao", "none"]
# (plugin, options) variants covering every code path of the MPL.
VARIANTS = [
    ("mpl", {"style": "official"}),
    ("mpl", {"style": "paper"}),
    ("mpl", {"cmha": False}),
    ("mpl", {"cao": False}),
    ("cmha", {}),
    ("cmha", {"style": "paper"}),
    ("cao", {}),
    ("none", {}),
]
WITH_DROPOUT = {"mpl", "cmha"}


@pytest.fixture(scope="module")
def catalog():
    return build_catalog([builtin], autoload=False)


def build(catalog, name: str, m: int, modality_names=None, **opts) -> Fusion:
    """As the core builds a fusion: validated options, plus the run's modality names when given."""
    spec = catalog.fusion.spec(name)
    names = {} if modality_names is None else {"modality_names": modality_names}
    return spec.obj(D, m, **spec.config.model_validate(opts).model_dump(), **names)


def randomize(fus: Fusion, seed: int = 1) -> None:
    """Hand-set every weight (LayerNorm and biases included) so no default init hides a term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fus.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.5))


def masks_for(m: int) -> torch.Tensor:
    """Rows: all present, one missing at each position, only the first present, none present."""
    rows = [[True] * m]
    rows += [[j != i for j in range(m)] for i in range(m)]
    rows += [[j == 0 for j in range(m)], [False] * m]
    return torch.tensor(rows, dtype=torch.bool)


# --------------------------------------------------------------------------- hand reference
def ref_attention(fus: MPLFusion, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention ``[K, D]`` by hand: per head softmax(Q K^T / sqrt(d)) V, then out_proj."""
    wq, wk, wv = fus.attn.in_proj_weight.chunk(3)
    bq, bk, bv = fus.attn.in_proj_bias.chunk(3)
    h = fus.attn.num_heads
    dh = D // h

    def heads(x):
        return x.reshape(x.shape[0], h, dh).transpose(0, 1)

    qh, kh, vh = heads(q @ wq.T + bq), heads(k @ wk.T + bk), heads(v @ wv.T + bv)
    att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(dh), dim=-1)
    o = (att @ vh).transpose(0, 1).reshape(q.shape[0], D)
    return o @ fus.attn.out_proj.weight.T + fus.attn.out_proj.bias


def ref_layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_forward(fus: Fusion, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The formulas of docs/method.md (MPL) with explicit loops over samples and rotations (eval mode)."""
    b, m, k, _ = z.shape
    out = torch.zeros_like(z)
    weights = torch.zeros(b, m) if getattr(fus, "use_cao", False) else None
    for s in range(b):
        present = [bool(x) for x in mask[s]]
        mm = {i: z[s, i] for i in range(m) if present[i]}
        if getattr(fus, "use_cmha", False):
            rot = [ref_attention(fus, z[s, r], z[s, (r + 1) % m], z[s, (r + 2) % m])
                   for r in range(m) if present[r] and present[(r + 1) % m] and present[(r + 2) % m]]
            f = torch.stack(rot).mean(0) if rot else torch.zeros(k, D)
            for i in mm:
                if fus.style == "official":
                    mm[i] = ref_layer_norm(z[s, i] + fus.residual_scale * f, fus.norm)
                else:
                    mm[i] = z[s, i] + f
        if weights is not None:
            summary = torch.cat([mm[i].mean(0) if i in mm else torch.zeros(D) for i in range(m)])
            g = torch.sigmoid(summary @ fus.gate.weight.T + fus.gate.bias)
            for i in mm:
                weights[s, i] = g[i]
                mm[i] = g[i] * mm[i]
        for i in mm:
            out[s, i] = mm[i]
    return out, weights


# --------------------------------------------------------------------------- registration
def test_registered_through_entry_point():
    cat = build_catalog(allow=["fusion"])
    assert not cat.failures, cat.failures
    assert cat.fusion.list() == sorted(PLUGINS)
    assert cat.fusion.get("mpl") is MPLFusion and cat.fusion.spec("mpl").config is MPLConfig


@pytest.mark.parametrize("name", PLUGINS)
def test_contract_kit(catalog, name):
    assert check_plugin(catalog.fusion.spec(name)) == []


def test_config_fields_documented_and_strict(catalog):
    for name in PLUGINS:
        model = catalog.fusion.spec(name).config
        assert model.model_config["extra"] == "forbid"
        assert all(f.description for f in model.model_fields.values()), name
    assert set(MPLConfig.model_fields) == {"style", "num_heads", "dropout", "residual_scale", "rotations",
                                           "f_dropout_masks", "cmha", "cao", "gate_input_norm"}
    assert MPLConfig().model_dump() == {"style": "official", "num_heads": 4, "dropout": 0.1,
                                        "residual_scale": 0.01, "rotations": None, "f_dropout_masks": "shared",
                                        "cmha": True, "cao": True, "gate_input_norm": False}


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name,opts", VARIANTS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_shapes(catalog, name, opts, m, k):
    torch.manual_seed(0)
    fus = build(catalog, name, m, **opts).eval()
    res = fus(torch.randn(2, m, k, D), torch.ones(2, m, dtype=torch.bool))
    assert isinstance(res, FusionOutput)
    assert res.tokens.shape == (2, m, k, D) and torch.isfinite(res.tokens).all()
    if fus.__class__ is MPLFusion and opts.get("cao", True) or name == "cao":
        assert res.weights is not None and res.weights.shape == (2, m)
    else:
        assert res.weights is None


def test_bad_input_shapes(catalog):
    fus = build(catalog, "mpl", 3)
    with pytest.raises(ValueError, match=r"\[B, M=3, K, D=32\]"):
        fus(torch.randn(2, 2, 1, D), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        fus(torch.randn(2, 3, 1, D), torch.ones(2, 2, dtype=torch.bool))


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("name,opts", VARIANTS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_modality_changes_nothing(catalog, name, opts, m, k, mode):
    torch.manual_seed(0)
    if name in WITH_DROPOUT:
        opts = {**opts, "dropout": 0.0}
    fus = build(catalog, name, m, **opts)
    randomize(fus)
    fus.train(mode == "train")
    mask = masks_for(m)
    b = mask.shape[0]
    tokens = torch.randn(b, m, k, D)
    res = fus(tokens, mask)
    assert torch.isfinite(res.tokens).all()
    assert (res.tokens[~mask] == 0).all(), "output tokens of a masked modality must be exactly zero"
    if res.weights is not None:
        assert (res.weights[~mask] == 0).all()
    changed = tokens.clone()
    noise = torch.randn_like(changed[~mask]) * 100
    noise[..., 0] = float("nan")  # even NaN in a missing modality must not leak
    changed[~mask] = noise
    res2 = fus(changed, mask)
    torch.testing.assert_close(res2.tokens, res.tokens, rtol=0, atol=1e-6)
    if res.weights is not None:
        torch.testing.assert_close(res2.weights, res.weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["mpl", "cmha"])
def test_masked_modality_changes_nothing_with_dropout(catalog, name):
    # Dropout draws the same random numbers whatever a masked modality holds.
    torch.manual_seed(0)
    fus = build(catalog, name, 4, dropout=0.5).train()
    mask = masks_for(4)
    tokens = torch.randn(mask.shape[0], 4, 3, D)
    changed = tokens.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 100
    torch.manual_seed(5)
    a = fus(tokens, mask)
    torch.manual_seed(5)
    b = fus(changed, mask)
    torch.testing.assert_close(b.tokens, a.tokens, rtol=0, atol=1e-6)
    assert (a.tokens[~mask] == 0).all()


def test_batch_samples_are_independent(catalog):
    torch.manual_seed(0)
    fus = build(catalog, "mpl", 3).eval()
    mask = masks_for(3)
    tokens = torch.randn(mask.shape[0], 3, 2, D)
    full = fus(tokens, mask)
    for s in range(mask.shape[0]):
        one = fus(tokens[s : s + 1], mask[s : s + 1])
        torch.testing.assert_close(one.tokens[0], full.tokens[s], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one.weights[0], full.weights[s], rtol=1e-5, atol=1e-6)


def test_rotation_needs_all_three_modalities(catalog):
    # M=3: each rotation uses all three modalities, so one missing modality leaves F = 0 and the
    # official output is LayerNorm(Z_i) for the present ones.
    torch.manual_seed(0)
    fus = build(catalog, "mpl", 3, cao=False).eval()
    randomize(fus)
    tokens = torch.randn(1, 3, 2, D)
    mask = torch.tensor([[True, False, True]])
    res = fus(tokens, mask)
    for i in (0, 2):
        torch.testing.assert_close(res.tokens[0, i], ref_layer_norm(tokens[0, i], fus.norm), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- formulas
def test_official_mpl_matches_spec_single_token():
    """as_reference: K=1, (C, E, L); attention over one key is its value projection."""
    torch.manual_seed(0)
    fus = MPLFusion(D, 3, style="official").eval()
    randomize(fus)
    z = torch.randn(5, 3, 1, D)
    zc, ze, zl = z[:, 0, 0], z[:, 1, 0], z[:, 2, 0]
    _, _, wv = fus.attn.in_proj_weight.chunk(3)
    _, _, bv = fus.attn.in_proj_bias.chunk(3)
    wo, bo = fus.attn.out_proj.weight, fus.attn.out_proj.bias

    def attn_single(v):  # softmax over a single key is 1: out_proj(W_v v)
        return (v @ wv.T + bv) @ wo.T + bo

    # (Q,K,V) = (C,E,L), (E,L,C), (L,C,E): the value modalities are L, C, E.
    f = (attn_single(zl) + attn_single(zc) + attn_single(ze)) / 3
    m_c, m_e, m_l = (ref_layer_norm(zi + 0.01 * f, fus.norm) for zi in (zc, ze, zl))
    gate = torch.sigmoid(torch.cat([m_c, m_e, m_l], dim=-1) @ fus.gate.weight.T + fus.gate.bias)
    expected = torch.stack([gate[:, 0:1] * m_c, gate[:, 1:2] * m_e, gate[:, 2:3] * m_l], dim=1)[:, :, None]

    res = fus(z, torch.ones(5, 3, dtype=torch.bool))
    torch.testing.assert_close(res.tokens, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.weights, gate, rtol=1e-5, atol=1e-6)


def test_paper_style_formula_with_mask():
    # M=4, modality 3 missing: only rotation 0 = (0, 1, 2) is valid, so F = out_proj(W_v z_2).
    torch.manual_seed(0)
    fus = MPLFusion(D, 4, style="paper").eval()
    randomize(fus)
    assert fus.norm is None and fus.f_dropout is None  # paper style has no LayerNorm
    z = torch.randn(2, 4, 1, D)
    mask = torch.tensor([[True, True, True, False]] * 2)
    _, _, wv = fus.attn.in_proj_weight.chunk(3)
    _, _, bv = fus.attn.in_proj_bias.chunk(3)
    f = (z[:, 2, 0] @ wv.T + bv) @ fus.attn.out_proj.weight.T + fus.attn.out_proj.bias
    mm = z[:, :3, 0] + f[:, None]
    summary = torch.cat([mm[:, 0], mm[:, 1], mm[:, 2], torch.zeros(2, D)], dim=-1)
    gate = torch.sigmoid(summary @ fus.gate.weight.T + fus.gate.bias)
    gate[:, 3] = 0
    res = fus(z, mask)
    torch.testing.assert_close(res.tokens[:, :3, 0], gate[:, :3, None] * mm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.weights, gate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,opts", VARIANTS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_matches_hand_reference_multi_token(catalog, name, opts, m):
    # K=4: real multi-head softmax attention, written per head and per sample by hand.
    torch.manual_seed(0)
    fus = build(catalog, name, m, **opts).eval()
    randomize(fus)
    mask = masks_for(m)
    z = torch.randn(mask.shape[0], m, 4, D)
    res = fus(z, mask)
    exp_tokens, exp_weights = ref_forward(fus, z, mask)
    torch.testing.assert_close(res.tokens, exp_tokens, rtol=1e-4, atol=1e-5)
    if exp_weights is None:
        assert res.weights is None
    else:
        torch.testing.assert_close(res.weights, exp_weights, rtol=1e-4, atol=1e-6)


def test_rotation_order_two_modalities():
    # M=2: rotations (A,B,A) and (B,A,B), i.e. query r, key r+1, value r+2 = r.
    torch.manual_seed(0)
    fus = MPLFusion(D, 2, style="paper", cao=False).eval()
    randomize(fus)
    z = torch.randn(1, 2, 3, D)
    a, b = z[0, 0], z[0, 1]
    f = (ref_attention(fus, a, b, a) + ref_attention(fus, b, a, b)) / 2
    res = fus(z, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(res.tokens[0], z[0] + f, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- attention is real
def _reset_query_key_projection(fus: MPLFusion, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fus.attn.in_proj_weight[: 2 * D] = torch.randn(2 * D, D, generator=g)
        fus.attn.in_proj_bias[: 2 * D] = torch.randn(2 * D, generator=g)


@pytest.mark.parametrize("k,matters", [(1, False), (4, True)])
def test_query_key_projection_matters_only_with_several_tokens(k, matters):
    # K=1: every softmax is over one key, so it is 1 and W_q, W_k weigh nothing (docs/method.md, MPL).
    torch.manual_seed(0)
    fus = MPLFusion(D, 3).eval()
    randomize(fus)
    z, mask = torch.randn(3, 3, k, D), torch.ones(3, 3, dtype=torch.bool)
    before = fus(z, mask).tokens
    _reset_query_key_projection(fus, seed=7)
    after = fus(z, mask).tokens
    assert (not torch.allclose(before, after, atol=1e-4)) == matters

    _, w = fus.attn(z[:, 0], z[:, 1], z[:, 2], need_weights=True)
    if k == 1:
        assert torch.equal(w, torch.ones_like(w))
    else:
        assert w.std() > 0.01  # non-uniform attention weights

    fus.zero_grad()
    fus(z, mask).tokens.pow(2).sum().backward()
    qk_grad = fus.attn.in_proj_weight.grad[: 2 * D].abs().max()
    ref = fus.attn.in_proj_weight.grad[2 * D :].abs().max()  # value part, for scale
    if matters:
        assert qk_grad > 1e-3 * ref
    else:
        assert qk_grad < 1e-6 * ref  # zero up to rounding in the softmax backward


def test_joint_token_permutation_is_equivariant():
    # Keys and values of a rotation come from modalities that are permuted together, so the
    # attention sums are unchanged and each output follows its query token.
    torch.manual_seed(0)
    fus = MPLFusion(D, 3).eval()
    randomize(fus)
    z, mask = torch.randn(2, 3, 4, D), torch.ones(2, 3, dtype=torch.bool)
    perm = torch.tensor([2, 0, 3, 1])
    base, permuted = fus(z, mask), fus(z[:, :, perm], mask)
    torch.testing.assert_close(permuted.tokens, base.tokens[:, :, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted.weights, base.weights, rtol=1e-5, atol=1e-6)


def test_changing_one_key_token_changes_every_query_position():
    # With K=4 a single token of modality E (the key of rotation (C,E,L)) reaches all query
    # positions of C through the softmax, not only position 0.
    torch.manual_seed(0)
    fus = MPLFusion(D, 3, cao=False).eval()
    randomize(fus)
    z, mask = torch.randn(1, 3, 4, D), torch.ones(1, 3, dtype=torch.bool)
    changed = z.clone()
    changed[0, 1, 0] += torch.randn(D)
    diff = (fus(changed, mask).tokens - fus(z, mask).tokens).abs().amax(dim=-1)  # [1, M, K]
    assert (diff[0, 0] > 1e-6).all()


# --------------------------------------------------------------------------- gradients, gates, errors
@pytest.mark.parametrize("name,opts", [v for v in VARIANTS if v[0] != "none"])
def test_gradients_reach_all_parameters(catalog, name, opts):
    torch.manual_seed(0)
    if name in WITH_DROPOUT:
        opts = {**opts, "dropout": 0.0}
    fus = build(catalog, name, 3, **opts).train()
    randomize(fus)
    z = torch.randn(2, 3, 4, D, requires_grad=True)
    fus(z, torch.ones(2, 3, dtype=torch.bool)).tokens.pow(2).mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    params = dict(fus.named_parameters())
    assert params
    for pname, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_none_is_identity_with_zeroed_masked(catalog):
    fus = build(catalog, "none", 3)
    assert not list(fus.parameters())
    mask = masks_for(3)
    z = torch.randn(mask.shape[0], 3, 2, D)
    res = fus(z, mask)
    assert res.weights is None
    torch.testing.assert_close(res.tokens, z * mask[:, :, None, None])


def test_gates_in_open_unit_interval_and_zero_when_masked(catalog):
    torch.manual_seed(0)
    for name in ("mpl", "cao"):
        fus = build(catalog, name, 3).eval()
        mask = masks_for(3)
        res = fus(torch.randn(mask.shape[0], 3, 2, D), mask)
        w = res.weights
        assert ((w[mask] > 0) & (w[mask] < 1)).all(), name
        assert (w[~mask] == 0).all(), name
        # T_i = g_i * M_i: the cao plugin scales the raw tokens.
    fus = CAOFusion(D, 3).eval()
    z = torch.randn(2, 3, 2, D)
    res = fus(z, torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(res.tokens, res.weights[:, :, None, None] * z)


def test_heads_must_divide_dim():
    with pytest.raises(ConfigError, match=r"num_heads: 4 does not divide the hidden size D=30"):
        MPLFusion(30, 3, num_heads=4)
    with pytest.raises(ConfigError, match="num_heads"):
        CMHAFusion(30, 3, num_heads=4)
    CAOFusion(30, 3)  # no attention, no constraint
    MPLFusion(30, 3, num_heads=4, cmha=False)


def test_bad_options_are_config_errors(catalog):
    from pydantic import ValidationError

    from medtvt_core.build import validated_options

    with pytest.raises(ConfigError, match=r"fusion.options \(mpl\): style"):
        validated_options("fusion", "mpl", {"style": "nope"}, "fusion", catalog)
    with pytest.raises(ValidationError, match="dropout"):
        MPLFusion(D, 3, dropout=1.5)
    with pytest.raises(ConfigError, match="num_modalities"):
        MPLFusion(D, 0)
    with pytest.raises(Exception):
        MPLConfig.model_validate({"heads": 4})  # unknown key
    with pytest.raises(TypeError):
        NoFusion(D, 3, style="paper")


# --------------------------------------------------------------------------- the reference's CMHA
# Re-statement of the reference (llama/MPL.py of keke-nice/MedTVT-R1, CyclicCrossModalAttention,
# called from Cardio_llama.py as CMHA(cxr, ecg, lab)):
#   three separate calls of one shared nn.MultiheadAttention with (Q, K, V) = (C, E, L), (E, L, C),
#   (L, C, E); F = their sum / 3; M_i = LayerNorm(Z_i + 0.01 * dropout(F)), dropout called once per
#   output modality (independent masks); attention-weight dropout inside each call.
REF_ROTATIONS = [["cxr", "ecg", "lab"], ["ecg", "lab", "cxr"], ["lab", "cxr", "ecg"]]


def ref_cmha(fus: MPLFusion, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference rule by name: ``z[name] [B, K, D]`` -> ``M[name]``, with the module's weights."""
    c, e, l = z["cxr"], z["ecg"], z["lab"]
    o1, _ = fus.attn(c, e, l)
    o2, _ = fus.attn(e, l, c)
    o3, _ = fus.attn(l, c, e)
    f = (o1 + o2 + o3) / 3
    if fus.style == "official":
        return {n: fus.norm(x + fus.residual_scale * fus.f_dropout(f)) for n, x in z.items()}
    return {n: x + f for n, x in z.items()}


@pytest.mark.parametrize("order", [("cxr", "ecg", "lab"), ("ecg", "cxr", "lab"), ("lab", "ecg", "cxr")])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("style", ["official", "paper"])
def test_named_rotations_reproduce_the_reference(catalog, order, k, style):
    torch.manual_seed(0)
    fus = build(catalog, "mpl", 3, style=style, rotations=REF_ROTATIONS, modality_names=order).eval()
    randomize(fus)
    z = torch.randn(4, 3, k, D)
    by_name = {n: z[:, i] for i, n in enumerate(order)}
    expected_m = ref_cmha(fus, by_name)
    m_stack = torch.stack([expected_m[n] for n in order], dim=1)  # model order
    # CAO on [M_1 : ... : M_M] in the model's order (a relabelling of the reference's C, E, L columns).
    gate = torch.sigmoid(m_stack.mean(2).reshape(4, 3 * D) @ fus.gate.weight.T + fus.gate.bias)
    res = fus(z, torch.ones(4, 3, dtype=torch.bool))
    torch.testing.assert_close(res.tokens, gate[:, :, None, None] * m_stack, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.weights, gate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,same", [(1, True), (3, False)])
def test_cyclic_default_follows_the_config_order(catalog, k, same):
    # The default rotates (r, r+1, r+2) in the run's order: for (ecg, cxr, lab) that is
    # (E,C,L), (C,L,E), (L,E,C), not the reference's.  With K=1 only the value modality counts
    # (L, E, C either way), so the outputs agree; with K=3 they differ.
    order = ("ecg", "cxr", "lab")
    torch.manual_seed(0)
    named = build(catalog, "cmha", 3, rotations=REF_ROTATIONS, modality_names=order).eval()
    default = build(catalog, "cmha", 3, modality_names=order).eval()
    randomize(named)
    default.load_state_dict(named.state_dict())
    assert default.rotations == [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    assert named.rotations == [(1, 0, 2), (0, 2, 1), (2, 1, 0)]
    z, mask = torch.randn(3, 3, k, D), torch.ones(3, 3, dtype=torch.bool)
    a, b = named(z, mask).tokens, default(z, mask).tokens
    assert torch.allclose(a, b, atol=1e-5) == same
    # In the reference's own order the cyclic default is the reference's rotation.
    ref_order = ("cxr", "ecg", "lab")
    cyc = build(catalog, "cmha", 3, modality_names=ref_order).eval()
    nam = build(catalog, "cmha", 3, rotations=REF_ROTATIONS, modality_names=ref_order).eval()
    randomize(cyc)
    nam.load_state_dict(cyc.state_dict())
    torch.testing.assert_close(cyc(z, mask).tokens, nam(z, mask).tokens, rtol=0, atol=0)


def test_named_rotations_do_not_depend_on_the_config_order(catalog):
    # Same weights, modalities listed in another order, tokens permuted alike: same output per name.
    torch.manual_seed(0)
    a = build(catalog, "cmha", 3, rotations=REF_ROTATIONS, modality_names=("cxr", "ecg", "lab")).eval()
    b = build(catalog, "cmha", 3, rotations=REF_ROTATIONS, modality_names=("lab", "cxr", "ecg")).eval()
    randomize(a)
    b.load_state_dict(a.state_dict())  # rotation_index is not persistent: same keys whatever the order
    assert set(a.state_dict()) == set(b.state_dict()) and not any("rotation" in key for key in a.state_dict())
    z = torch.randn(2, 3, 3, D)
    perm = [2, 0, 1]  # b's order as positions of a's
    torch.testing.assert_close(b(z[:, perm], torch.ones(2, 3, dtype=torch.bool)).tokens,
                               a(z, torch.ones(2, 3, dtype=torch.bool)).tokens[:, perm], rtol=1e-5, atol=1e-6)


def test_named_rotations_with_a_masked_modality(catalog):
    # M=4 (cxr, ecg, lab, x); rotations use only cxr/ecg/lab plus one with x. A sample missing x
    # keeps the three reference rotations; one missing ecg keeps only (lab, x, cxr).
    rots = [*REF_ROTATIONS, ["lab", "x", "cxr"]]
    order = ("ecg", "x", "cxr", "lab")
    torch.manual_seed(0)
    fus = build(catalog, "cmha", 4, style="paper", rotations=rots, modality_names=order).eval()
    randomize(fus)
    z = torch.randn(3, 4, 3, D)
    mask = torch.tensor([[True, True, True, True], [True, False, True, True], [False, True, True, True]])
    res = fus(z, mask).tokens
    n = {name: z[:, i] for i, name in enumerate(order)}

    def att(q, k, v, s):
        return fus.attn(n[q][s : s + 1], n[k][s : s + 1], n[v][s : s + 1])[0][0]

    f = [sum(att(*r, 0) for r in rots) / 4, sum(att(*r, 1) for r in REF_ROTATIONS) / 3, att("lab", "x", "cxr", 2)]
    for s in range(3):
        for i in range(4):
            exp = z[s, i] + f[s] if mask[s, i] else torch.zeros(3, D)
            torch.testing.assert_close(res[s, i], exp, rtol=1e-5, atol=1e-5)
    # Changing the masked modality changes nothing.
    changed = z.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 100
    torch.testing.assert_close(fus(changed, mask).tokens, res, rtol=0, atol=1e-6)


def test_rotations_errors(catalog):
    names = ("ecg", "cxr", "lab")
    with pytest.raises(ConfigError, match="without modality_names"):
        MPLFusion(D, 3, rotations=REF_ROTATIONS)
    with pytest.raises(ConfigError, match=r"'ppg', not a modality of this model; allowed: ecg, cxr, lab"):
        MPLFusion(D, 3, rotations=[["cxr", "ppg", "lab"]], modality_names=names)
    with pytest.raises(ConfigError, match="distinct names"):
        MPLFusion(D, 3, rotations=REF_ROTATIONS, modality_names=("ecg", "ecg", "lab"))
    with pytest.raises(ConfigError, match="distinct names"):
        CMHAFusion(D, 3, modality_names=("ecg", "cxr"))
    from medtvt_core.build import validated_options

    for bad, msg in [([["cxr", "ecg"]], "rotations"), ([["cxr", "ecg", "lab", "ecg"]], "rotations"),
                     ([], "at least one"), ([["cxr", "ecg", "lab"], ["cxr", "ecg", "lab"]], "listed twice"),
                     ([["cxr", "", "lab"]], "non-empty"), ("cxr,ecg,lab", "rotations")]:
        with pytest.raises(ConfigError, match=msg):
            validated_options("fusion", "mpl", {"rotations": bad}, "fusion", catalog)
    with pytest.raises(ConfigError, match="cmha=false"):
        validated_options("fusion", "mpl", {"cmha": False, "rotations": REF_ROTATIONS}, "fusion", catalog)
    with pytest.raises(ConfigError, match="only the 'official' style"):
        validated_options("fusion", "cmha", {"style": "paper", "f_dropout_masks": "per_modality"}, "fusion", catalog)
    # Every built-in takes the names (the core may pass them to any fusion); None is today's behaviour.
    for cls in (MPLFusion, CMHAFusion, CAOFusion, NoFusion):
        assert cls(D, 3, modality_names=names).modality_names == names
        assert cls(D, 3).modality_names is None


# --------------------------------------------------------------------------- dropout semantics
def _distinct_rows(x: torch.Tensor) -> int:
    return torch.unique(x.reshape(x.shape[0], -1).round(decimals=4), dim=0).shape[0]


@pytest.mark.parametrize("k", [1, 3])
def test_attention_dropout_is_independent_per_rotation(catalog, k):
    # One head, p=0.5, the same sample repeated: the attention-weight dropout of each rotation is
    # its own draw, so the K=1 output takes 2^3 values (2 would mean one mask shared by the three
    # rotations); the reference's three separate calls, re-stated, give the same set of values.
    torch.manual_seed(0)
    fus = build(catalog, "cmha", 3, style="paper", num_heads=1, dropout=0.5,
                rotations=REF_ROTATIONS, modality_names=("ecg", "cxr", "lab"))
    randomize(fus)
    fus.train()
    n = 600
    one = torch.randn(1, 3, k, D)
    z = one.expand(n, -1, -1, -1).contiguous()
    f_ours = fus(z, torch.ones(n, 3, dtype=torch.bool)).tokens[:, 0] - z[:, 0]  # paper: M_i = Z_i + F
    by_name = {nm: z[:, i] for i, nm in enumerate(("ecg", "cxr", "lab"))}
    f_ref = ref_cmha(fus, by_name)["ecg"] - by_name["ecg"]
    if k == 1:
        # The 8 possible F by hand: out_proj(mean_r m_r * W_v v_r), m_r in {0, 2}.
        _, _, wv = fus.attn.in_proj_weight.chunk(3)
        _, _, bv = fus.attn.in_proj_bias.chunk(3)
        vals = [by_name[v][0, 0] @ wv.T + bv for _, _, v in REF_ROTATIONS]
        cand = torch.stack([sum(mr * v for mr, v in zip(ms, vals)) / 3 @ fus.attn.out_proj.weight.T
                            + fus.attn.out_proj.bias
                            for ms in torch.cartesian_prod(*[torch.tensor([0.0, 2.0])] * 3)])
        for f in (f_ours, f_ref):
            d = (f[:, 0, None] - cand[None]).abs().amax(-1)  # [n, 8]
            assert (d.amin(1) < 1e-4).all()  # every draw is one of the 8
            counts = torch.bincount(d.argmin(1), minlength=8)
            assert (counts > n / 8 * 0.5).all(), counts  # each about 1/8 of the draws
    else:
        assert _distinct_rows(f_ours) > 100 and _distinct_rows(f_ref) > 100
    fus.eval()
    torch.testing.assert_close(fus(z[:1], torch.ones(1, 3, dtype=torch.bool)).tokens[0, 0] - z[0, 0],
                               ref_cmha(fus, {nm: v[:1] for nm, v in by_name.items()})["ecg"][0] - z[0, 0],
                               rtol=1e-5, atol=1e-5)


def _f_dropout_pattern(fus: MPLFusion, b: int, m: int, k: int) -> torch.Tensor:
    """Dropped positions of F per modality ``[B, M, K, D]``: with Z = 0, LN(s * dropout(F)) maps every
    dropped element of a row to the same value (that of a zero), the kept ones to distinct values."""
    with torch.no_grad():
        fus.norm.weight.fill_(1.0)
        fus.norm.bias.zero_()
    f = torch.randn(b, k, D) + 3.0  # no zeros in F
    out = fus.combine(torch.zeros(b, m, k, D), f)
    zero_value = out.mode(dim=-1, keepdim=True).values
    return (out - zero_value).abs() < 1e-6


@pytest.mark.parametrize("k", [1, 3])
def test_f_dropout_masks(catalog, k):
    torch.manual_seed(0)
    b, m, p = 200, 3, 0.5
    shared = build(catalog, "mpl", m, dropout=p).train()
    per = build(catalog, "mpl", m, dropout=p, f_dropout_masks="per_modality").train()
    drop_s, drop_p = _f_dropout_pattern(shared, b, m, k), _f_dropout_pattern(per, b, m, k)
    for drop in (drop_s, drop_p):
        assert abs(drop.float().mean().item() - p) < 0.02  # the dropout rate
    # shared: every modality sees the same mask; per_modality (the reference): independent masks,
    # so two modalities agree on about p^2 + (1-p)^2 = 1/2 of the positions.
    assert torch.equal(drop_s, drop_s[:, :1].expand_as(drop_s))
    for i, j in ((0, 1), (0, 2), (1, 2)):
        agree = (drop_p[:, i] == drop_p[:, j]).float().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.02, (i, j, agree)
    # Within one modality the mask is elementwise, not per token or per sample.
    assert drop_p[:, 0].float().mean(-1).std() > 0


def test_f_dropout_masks_in_the_full_forward(catalog):
    # Identical tokens in every modality, F dropout per modality: the three M_i differ in train mode
    # (shared: all equal), and all coincide in eval mode.
    torch.manual_seed(0)
    z = torch.randn(4, 1, 3, D).expand(-1, 3, -1, -1).contiguous()
    mask = torch.ones(4, 3, dtype=torch.bool)
    for masks, equal in (("shared", True), ("per_modality", False)):
        fus = build(catalog, "cmha", 3, dropout=0.5, residual_scale=1.0, f_dropout_masks=masks,
                    rotations=REF_ROTATIONS, modality_names=("ecg", "cxr", "lab"))
        out = fus.train()(z, mask).tokens
        assert torch.allclose(out[:, 0], out[:, 1]) == equal and torch.allclose(out[:, 0], out[:, 2]) == equal
        out = fus.eval()(z, mask).tokens
        torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=0)


def test_reference_dropout_rule_matches_in_distribution(catalog):
    # K=1, F dropout per modality: the reference re-stated (three calls, dropout once per output
    # modality) and ours give the same mean and spread of M_i over many draws.
    torch.manual_seed(0)
    order = ("ecg", "cxr", "lab")
    fus = build(catalog, "cmha", 3, dropout=0.3, residual_scale=1.0, f_dropout_masks="per_modality",
                rotations=REF_ROTATIONS, modality_names=order)
    randomize(fus)
    fus.train()
    n = 4000
    z = torch.randn(1, 3, 1, D).expand(n, -1, -1, -1).contiguous()
    with torch.no_grad():
        ours = fus(z, torch.ones(n, 3, dtype=torch.bool)).tokens
        ref = ref_cmha(fus, {nm: z[:, i] for i, nm in enumerate(order)})
        ref = torch.stack([ref[nm] for nm in order], dim=1)
    torch.testing.assert_close(ours.mean(0), ref.mean(0), rtol=0, atol=0.05)
    torch.testing.assert_close(ours.std(0), ref.std(0), rtol=0, atol=0.05)
    # Per-modality masks: the residual M_i - M_j is not identically zero (it would be with one mask).
    assert (ours[:, 0] - ours[:, 1]).abs().amax() > 1e-3


def test_gate_input_norm_keeps_the_gates_out_of_saturation():
    """Large tokens (the paper style adds F without a LayerNorm) push sigmoid(Linear(.)) to 0 or 1 for
    every sample; normalising each modality's mean token first makes the gates scale-free and
    per-sample again, and a masked modality still gets exactly 0."""
    torch.manual_seed(0)
    plain = MPLFusion(D, 3, style="paper", dropout=0.0)
    normed = MPLFusion(D, 3, style="paper", dropout=0.0, gate_input_norm=True)
    normed.load_state_dict(plain.state_dict())
    tokens = torch.randn(64, 3, 1, D)
    mask = torch.ones(64, 3, dtype=torch.bool)
    mask[0, 1] = False
    with torch.no_grad():
        w_plain = plain(tokens * 100, mask).weights
        w_small, w_big = normed(tokens, mask).weights, normed(tokens * 100, mask).weights
    present = mask
    assert ((w_plain[present] < 0.01) | (w_plain[present] > 0.99)).float().mean() > 0.9  # saturated
    torch.testing.assert_close(w_small, w_big, atol=1e-5, rtol=1e-5)  # scale-free
    assert ((w_big[present] > 0.05) & (w_big[present] < 0.95)).float().mean() > 0.9  # in the sigmoid's range
    assert w_big[present].std() > 0.02  # and they differ between samples
    assert w_big[0, 1] == 0 and w_plain[0, 1] == 0
