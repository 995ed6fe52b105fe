"""``ecgfm-ked`` encoder: checkpoint layout of ECGFM-KED, strict loading, shapes, frozen backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medtvt_core.checkpoints import save_safetensors
from medtvt_core.errors import CheckpointError, ConfigError, DataError
from medtvt_plugins.encoders.ecgfm_ked import (
    EcgfmKedEncoder,
    checkpoint_from_manifest,
    read_manifest,
)

DATA = Path(__file__).parent / "data"
MANIFEST = DATA / "ecgfm_ked_xresnet1d101_state_dict.json"


class NotATensor:
    """A custom object in a checkpoint: needs full unpickling."""


@pytest.fixture(scope="module")
def manifest():
    return read_manifest(MANIFEST)


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory, manifest):
    path = tmp_path_factory.mktemp("ecg") / "ecgfm_ked.pt"
    ckpt = checkpoint_from_manifest(manifest)
    torch.save(ckpt, path)
    return path, ckpt["ecg_model"]


def tiny(**kw) -> EcgfmKedEncoder:
    torch.manual_seed(0)
    return EcgfmKedEncoder(variant="tiny", **kw)


def test_full_backbone_matches_manifest(manifest):
    enc = EcgfmKedEncoder(variant="full")
    sd = enc.backbone.state_dict()
    assert len(manifest) == 1224
    assert list(sd) == list(manifest)  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == manifest
    # convs and convpath.0 are one module: 7.87 M parameters, 15.3 M numbers in the state dict.
    assert sum(p.numel() for p in enc.backbone.parameters()) == 7_865_984
    assert sum(v.numel() for v in sd.values()) == 15_275_596
    convs = [m for n, m in enc.backbone.named_modules() if isinstance(m, torch.nn.Conv1d)]
    bns = [m for n, m in enc.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert all(c.bias is None for c in convs) and all(b.affine for b in bns)
    assert enc.input_shape == (12, 1000) and enc.feature_shape == (32, 768) and enc.pooled_dim == 1024


def test_released_checkpoint_loads_strictly_and_runs(full_ckpt):
    path, state = full_ckpt
    enc = EcgfmKedEncoder(variant="full", weights=path)
    loaded = enc.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    raw = enc.backbone(torch.randn(1, 12, 1000))  # one full-size forward: keep the suite cheap
    assert raw.shape == (1, 768, 32)  # the layout ECGFM-KED documents
    feats = enc.encode(torch.zeros(0, 12, 1000))  # batch 0: shape and dtype only
    assert feats.shape == (0, 32, 768) and feats.dtype == torch.float32
    feats = raw.transpose(1, 2)
    assert enc.pool(feats).shape == (1, 1, 1024)


@pytest.mark.parametrize("k", [1, 3])
def test_tiny_shapes(k):
    enc = tiny(num_tokens=k)
    x = torch.randn(2, 12, 1000)
    feats = enc.encode(x)
    assert feats.shape == (2, 32, 96) == (2, *enc.feature_shape)
    out = enc.pool(feats)
    assert out.shape == (2, k, 64) == (2, enc.num_tokens, enc.pooled_dim)
    w = enc.attention_weights(feats)
    assert w.shape == (2, 32, k) and torch.allclose(w.sum(1), torch.ones(2, k))
    assert torch.allclose(enc(x), out)


def test_backbone_frozen_head_trains():
    enc = tiny(num_tokens=2)
    enc.train()
    assert not enc.backbone.training  # BatchNorm statistics of the frozen backbone never move
    assert all(not p.requires_grad for p in enc.backbone.parameters())
    feats = enc.encode(torch.randn(2, 12, 1000))
    assert not feats.requires_grad
    enc.pool(feats).pow(2).mean().backward()
    assert all(p.grad is not None for p in enc.head_parameters())
    assert all(p.grad is None for p in enc.backbone_parameters())
    assert {id(p) for p in enc.head_parameters()} == {id(p) for p in enc.head.parameters()}


def test_safetensors_weights_roundtrip(tmp_path):
    src = tiny()
    with torch.no_grad():
        for p in src.backbone.parameters():
            p.add_(0.01)
    path = save_safetensors(src.backbone.state_dict(), tmp_path / "ecg.safetensors")
    dst = EcgfmKedEncoder(variant="tiny", weights=path)
    x = torch.randn(1, 12, 1000)
    assert torch.equal(src.encode(x), dst.encode(x))


def _tiny_ckpt(tmp_path, mutate) -> Path:
    state = {k: v.clone() for k, v in tiny().backbone.state_dict().items()}
    mutate(state)
    path = tmp_path / "ecg.pt"
    torch.save({"ecg_model": state}, path)
    return path


def test_wrong_key_is_named(tmp_path):
    def rename(s):
        s["4.0.convs.1.0.wieght"] = s.pop("4.0.convs.1.0.weight")

    with pytest.raises(CheckpointError) as err:
        tiny(weights=_tiny_ckpt(tmp_path, rename))
    msg = str(err.value)
    assert "missing keys: 4.0.convs.1.0.weight" in msg and "unexpected keys: 4.0.convs.1.0.wieght" in msg
    assert "\n" not in msg


def test_wrong_shape_is_named(tmp_path):
    def widen(s):
        s["7.0.idpath.1.0.weight"] = torch.zeros(96, 64, 3)

    with pytest.raises(CheckpointError, match=r"7\.0\.idpath\.1\.0\.weight expected \(96, 64, 1\) found \(96, 64, 3\)"):
        tiny(weights=_tiny_ckpt(tmp_path, widen))


def test_unsafe_pickle_needs_trust(tmp_path):
    state = tiny().backbone.state_dict()
    path = tmp_path / "ecg.pt"
    torch.save({"ecg_model": state, "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="arbitrary code.*trust_checkpoint=True"):
        tiny(weights=path)
    enc = tiny(weights=path, trust_checkpoint=True)
    assert torch.equal(enc.backbone.state_dict()["0.0.weight"], state["0.0.weight"])


def test_checkpoint_without_ecg_model(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"x": torch.ones(1)}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no 'ecg_model' entry"):
        tiny(weights=path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tiny(weights=tmp_path / "missing.pt")


def test_bad_options():
    from pydantic import ValidationError

    from medtvt_core.build import validated_options

    with pytest.raises(ConfigError, match=r"encoders.ecg.options \(ecgfm-ked\): num_tokens"):
        validated_options("encoders", "ecgfm-ked", {"variant": "tiny", "num_tokens": 0}, "encoders.ecg")
    with pytest.raises(ValidationError, match="variant"):
        EcgfmKedEncoder(variant="huge")


def test_wrong_input_shape():
    with pytest.raises(DataError, match=r"ecgfm-ked: input of shape \(2, 12, 5000\), expected \[B, 12, 1000\]"):
        tiny().encode(torch.randn(2, 12, 5000))
