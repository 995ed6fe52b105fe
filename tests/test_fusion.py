"""Built-in fusion plugins (mpl, cmha, cao, none): shapes, masking, SPEC formulas, gradients."""

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


def build(catalog, name: str, m: int, **opts) -> Fusion:
    spec = catalog.fusion.spec(name)
    return spec.obj(D, m, **spec.config.model_validate(opts).model_dump())


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
    """The SPEC formulas with explicit loops over samples and rotations (eval mode)."""
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
    assert set(MPLConfig.model_fields) == {"style", "num_heads", "dropout", "residual_scale", "cmha", "cao"}
    assert MPLConfig().model_dump() == {"style": "official", "num_heads": 4, "dropout": 0.1,
                                        "residual_scale": 0.01, "cmha": True, "cao": True}


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
    # K=1: every softmax is over one key, so it is 1 and W_q, W_k weigh nothing (SPEC's remark).
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
