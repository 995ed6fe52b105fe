"""``vit`` encoder: local weights only (safetensors, timm, transformers), shapes, no hub access."""

from __future__ import annotations

import socket

import pytest
import torch

from medtvt_core.checkpoints import save_safetensors
from medtvt_core.errors import CheckpointError, ConfigError
from medtvt_plugins.encoders.vit import VitEncoder

X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def tiny(**kw) -> VitEncoder:
    torch.manual_seed(0)
    return VitEncoder(variant="tiny", **kw)


def perturbed(enc: VitEncoder) -> dict[str, torch.Tensor]:
    """The encoder's ViT weights, changed so that a load from them is visible."""
    with torch.no_grad():
        for p in enc.vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return enc.vit.state_dict()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach a hub or open a socket fails the test."""

    def refuse(*a, **kw):
        raise AssertionError(f"network access attempted: {a[:2]}")

    import huggingface_hub
    import timm.models._builder as builder
    import timm.models._hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # do not rely on the offline switch
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(hub, "hf_hub_download", refuse)
    monkeypatch.setattr(hub, "download_url_to_file", refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("k", [1, 5])
def test_tiny_shapes(k):
    enc = tiny(num_tokens=k)
    feats = enc.encode(X)
    assert feats.shape == (2, 197, 32) == (2, *enc.feature_shape) and not feats.requires_grad
    out = enc.pool(feats)
    assert out.shape == (2, k, 32) == (2, enc.num_tokens, enc.pooled_dim)
    # the reference head: a 1x1 Conv1d with the 197 tokens as channels
    ref = torch.einsum("kn,bnc->bkc", enc.head.weight[:, :, 0], feats) + enc.head.bias[None, :, None]
    assert torch.allclose(out, ref, atol=1e-5)


def test_base_is_built_without_network(no_network, caplog):
    with caplog.at_level("WARNING"):
        enc = VitEncoder(variant="base")
    assert "randomly initialised" in caplog.text
    assert enc.feature_shape == (197, 768) and enc.pooled_dim == 768
    assert sum(p.numel() for p in enc.vit.parameters()) == 85_798_656  # ViT-B/16 without classifier
    assert enc.vit.patch_embed.proj.kernel_size == (16, 16) and len(enc.vit.blocks) == 12


def test_safetensors_roundtrip(tmp_path, no_network):
    src = tiny()
    path = save_safetensors(perturbed(src), tmp_path / "vit.safetensors")
    dst = VitEncoder(variant="tiny", weights=path)
    assert torch.equal(src.encode(X), dst.encode(X))
    # a directory in the hub layout works too
    (tmp_path / "hubdir").mkdir()
    path.rename(tmp_path / "hubdir" / "model.safetensors")
    assert torch.equal(VitEncoder(variant="tiny", weights=tmp_path / "hubdir").encode(X), src.encode(X))


def test_timm_checkpoint_with_wrapper_prefix_and_head(tmp_path, no_network):
    src = tiny()
    state = {f"module.{k}": v for k, v in perturbed(src).items()}
    state["module.head.weight"] = torch.zeros(10, 32)  # classifier of a fine-tuned model: not used
    state["module.head.bias"] = torch.zeros(10)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": state, "epoch": 7, "arch": "vit_tiny"}, path)
    assert torch.equal(VitEncoder(variant="tiny", weights=path).encode(X), src.encode(X))


def test_transformers_checkpoint(tmp_path, no_network):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    image_size=224, patch_size=16, layer_norm_eps=1e-6)
    hf = ViTModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    enc = VitEncoder(variant="tiny", weights=tmp_path / "hf")
    with torch.no_grad():
        ref = hf(pixel_values=X).last_hidden_state
    assert torch.allclose(enc.encode(X), ref, atol=1e-5)


def test_wrong_shape_is_named(tmp_path):
    state = tiny().vit.state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    path = save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight expected \(128, 32\) found \(64, 32\)"):
        VitEncoder(variant="tiny", weights=path)


def test_wrong_model_is_named(tmp_path):
    state = tiny().vit.state_dict()
    del state["blocks.1.norm2.bias"]
    state["blocks.2.norm1.weight"] = torch.ones(32)
    path = save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: blocks.1.norm2.bias; unexpected keys: blocks.2.norm1.weight"):
        VitEncoder(variant="tiny", weights=path)


def test_missing_weights(tmp_path, no_network):
    with pytest.raises(CheckpointError, match="does not exist.*never downloaded"):
        VitEncoder(variant="tiny", weights=tmp_path / "vit_base.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds none of model.safetensors"):
        VitEncoder(variant="tiny", weights=tmp_path / "empty")


def test_backbone_frozen_head_trains():
    enc = tiny(num_tokens=3)
    enc.train()
    assert not enc.vit.training
    enc(X).pow(2).mean().backward()
    assert all(p.grad is not None for p in enc.head_parameters())
    assert all(p.grad is None and not p.requires_grad for p in enc.backbone_parameters())


def test_bad_options():
    from pydantic import ValidationError

    from medtvt_core.build import validated_options

    with pytest.raises(ConfigError, match=r"encoders.cxr.options \(vit\): num_tokens"):
        validated_options("encoders", "vit", {"variant": "tiny", "num_tokens": 198}, "encoders.cxr")
    with pytest.raises(ValidationError, match="variant"):
        VitEncoder(variant="large")
