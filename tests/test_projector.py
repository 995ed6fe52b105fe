"""DenseProjector: shapes and the formula of docs/method.md ("Projector") on hand-set weights."""

from __future__ import annotations

import pytest
import torch

from medtvt_core.errors import ConfigError
from medtvt_core.model.projector import DenseProjector


def _set_weights(proj: DenseProjector, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _expected(proj: DenseProjector, x: torch.Tensor) -> torch.Tensor:
    """docs/method.md ("Projector") by hand: Linear, then per block x + W2(silu(W1 n) * W3 n), n = RMSNorm(x)."""
    y = x @ proj.proj.weight.T + proj.proj.bias
    for blk in proj.blocks:
        n = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + blk.norm.eps) * blk.norm.weight
        a = n @ blk.w1.weight.T
        y = y + ((a * torch.sigmoid(a)) * (n @ blk.w3.weight.T)) @ blk.w2.weight.T
    return y


@pytest.mark.parametrize("blocks", [0, 1, 3])
@pytest.mark.parametrize("k", [1, 4])
def test_shape(blocks, k):
    proj = DenseProjector(48, 32, blocks=blocks)
    assert proj(torch.randn(2, k, 48)).shape == (2, k, 32)
    assert len(proj.blocks) == blocks


def test_structure_matches_spec():
    proj = DenseProjector(48, 32, blocks=3, eps=1e-6)
    assert proj.proj.bias is not None  # the input Linear keeps its bias; block linears have none
    for blk in proj.blocks:
        assert isinstance(blk.norm, torch.nn.RMSNorm) and blk.norm.eps == 1e-6
        for lin in (blk.w1, blk.w2, blk.w3):
            assert lin.bias is None and tuple(lin.weight.shape) == (32, 32)
    n_params = sum(p.numel() for p in proj.parameters())
    assert n_params == 48 * 32 + 32 + 3 * (3 * 32 * 32 + 32)


def test_formula_on_hand_set_weights():
    torch.manual_seed(0)
    proj = DenseProjector(24, 32, blocks=3, eps=1e-6)
    _set_weights(proj, seed=1)
    x = torch.randn(3, 2, 24)
    torch.testing.assert_close(proj(x), _expected(proj, x), rtol=1e-5, atol=1e-5)


def test_zero_blocks_is_the_linear():
    proj = DenseProjector(24, 32, blocks=0)
    x = torch.randn(2, 1, 24)
    torch.testing.assert_close(proj(x), proj.proj(x))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    proj = DenseProjector(24, 32)
    proj(torch.randn(2, 3, 24)).pow(2).mean().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_errors():
    with pytest.raises(ValueError, match="in_dim=24"):
        DenseProjector(24, 32)(torch.randn(2, 1, 25))
    with pytest.raises(ConfigError, match="blocks"):
        DenseProjector(24, 32, blocks=-1)


def test_normalize_input_is_the_references_f_normalize():
    """Reference: the pooled feature is L2-normalised over its features, then the Linear to d."""
    torch.manual_seed(0)
    p = DenseProjector(5, 7, blocks=2, normalize_input=True)
    x = torch.randn(3, 2, 5) * 40
    unit = x / x.pow(2).sum(-1, keepdim=True).sqrt()  # restated: x / ||x||_2 per token
    plain = DenseProjector(5, 7, blocks=2)
    plain.load_state_dict(p.state_dict())
    torch.testing.assert_close(p(x), plain(unit))
    torch.testing.assert_close(p(x), p(x * 3.0))  # scale-free, as the reference's features are
