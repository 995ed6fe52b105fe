"""``symile`` lab encoder: Lightning checkpoint with the ``labs_encoder.`` prefix, shapes, options."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import torch
import torch.nn.functional as F

from medtvt_core.checkpoints import save_safetensors
from medtvt_core.errors import CheckpointError
from medtvt_plugins.encoders.symile import SymileEncoder

X = torch.rand(3, 100, generator=torch.Generator().manual_seed(0))


def labs_state(widths=(32, 64, 64), seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = [100, *widths]
    state = {}
    for i in range(3):
        state[f"fc{i + 1}.weight"] = torch.randn(dims[i + 1], dims[i], generator=g) * 0.1
        state[f"fc{i + 1}.bias"] = torch.randn(dims[i + 1], generator=g) * 0.1
    state["layer_norm.weight"] = torch.rand(widths[-1], generator=g) + 0.5
    state["layer_norm.bias"] = torch.randn(widths[-1], generator=g) * 0.1
    return state


def lightning_ckpt(path, labs: dict[str, torch.Tensor]) -> pathlib.Path:
    """What a Lightning ``ModelCheckpoint`` of the Symile model looks like (the parts that matter)."""
    state = {f"labs_encoder.{k}": v for k, v in labs.items()}
    state["ecg_encoder.conv.weight"] = torch.zeros(4, 1, 3)  # other encoders: ignored
    state["cxr_encoder.fc.weight"] = torch.zeros(2, 2)
    state["logit_scale"] = torch.tensor(2.0)
    torch.save({
        "epoch": 11,
        "global_step": 1234,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        "hyper_parameters": {"args": argparse.Namespace(d=1024, data_dir=pathlib.Path("/data/symile-mimic"))},
    }, path)
    return path


def reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(F.linear(x, state["fc1.weight"], state["fc1.bias"]))
    h = F.gelu(F.linear(h, state["fc2.weight"], state["fc2.bias"]))
    h = F.linear(h, state["fc3.weight"], state["fc3.bias"])
    return F.layer_norm(h, h.shape[-1:], state["layer_norm.weight"], state["layer_norm.bias"])


@pytest.mark.parametrize("variant,width", [("full", 1024), ("tiny", 64)])
def test_shapes(variant, width):
    enc = SymileEncoder(variant=variant)
    feats = enc.encode(X)
    assert feats.shape == (3, 1, width) == (3, *enc.feature_shape) and not feats.requires_grad
    assert enc.pool(feats) is feats and enc.num_tokens == 1 and enc.pooled_dim == width
    assert enc.head_parameters() == []
    assert all(not p.requires_grad for p in enc.parameters())


def test_full_layout():
    enc = SymileEncoder(variant="full")
    shapes = {k: tuple(v.shape) for k, v in enc.backbone.state_dict().items()}
    assert shapes == {
        "fc1.weight": (256, 100), "fc1.bias": (256,), "fc2.weight": (1024, 256), "fc2.bias": (1024,),
        "fc3.weight": (1024, 1024), "fc3.bias": (1024,), "layer_norm.weight": (1024,), "layer_norm.bias": (1024,),
    }


def test_lightning_checkpoint_loads(tmp_path):
    labs = labs_state()
    path = lightning_ckpt(tmp_path / "symile.ckpt", labs)
    enc = SymileEncoder(variant="tiny", weights=path)  # no trust needed: only inert objects inside
    assert torch.allclose(enc.encode(X)[:, 0], reference(labs, X), atol=1e-6)


def test_missing_encoder_key_is_named(tmp_path):
    labs = labs_state()
    del labs["fc2.bias"]
    path = lightning_ckpt(tmp_path / "symile.ckpt", labs)
    with pytest.raises(CheckpointError, match="missing keys: fc2.bias"):
        SymileEncoder(variant="tiny", weights=path)


def test_wrong_width_is_named(tmp_path):
    path = lightning_ckpt(tmp_path / "symile.ckpt", labs_state())
    with pytest.raises(CheckpointError, match=r"fc1\.weight expected \(256, 100\) found \(32, 100\)"):
        SymileEncoder(variant="full", weights=path)


def test_no_labs_encoder_in_checkpoint(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"ecg_encoder.w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="no key starts with 'labs_encoder.'"):
        SymileEncoder(variant="tiny", weights=path)


def test_plain_state_dict_without_prefix(tmp_path):
    labs = labs_state()
    path = save_safetensors(labs, tmp_path / "labs.safetensors")
    enc = SymileEncoder(variant="tiny", weights=path, state_prefix="")
    assert torch.allclose(enc.encode(X)[:, 0], reference(labs, X), atol=1e-6)


def test_one_token_only():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_tokens must be 1, got 2"):
        SymileEncoder(variant="tiny", num_tokens=2)
