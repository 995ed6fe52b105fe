"""``ecgfm-ked``: the ECGFM-KED ECG encoder (1-D xresnet101) with the MedTVT-R1 pooling head.

Backbone: a pure-PyTorch rebuild of the fastai-v2-style ``xresnet1d101`` of ECGFM-KED whose
``state_dict`` matches the released checkpoint (``{"ecg_model": state_dict}``) key for key, so
it loads with ``strict=True``.  ``[B, 12, 1000] -> [B, 768, 32]``; :meth:`encode` returns the
steps first, ``[B, 32, 768]``.

Head (trainable): L2-normalise each step's features (``normalize_steps``, on by default), a
one-layer RNN ``768 -> 1024``, then attention pooling over the steps with ``K`` query heads
(``Linear 1024 -> K``, softmax over steps); ``K = 1`` is the reference.  :meth:`pool` gives
``[B, K, 1024]``.  This is where the reference normalises the ECG (``forward_ecg`` in
``llama/Cardio_llama.py``): per step, before the RNN; the pooled vector reaches the projector
unnormalised (docs/method.md, "Encoders").
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.checkpoints import load_into, load_state_file, select_state, strip_common_prefix
from medtvt_core.contracts import Encoder, PluginConfig, saved_weights_follow
from medtvt_core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

NUM_LEADS = 12
NUM_SAMPLES = 1000  # 10 s at 100 Hz, what the data layer produces
CHECKPOINT_ENTRY = "ecg_model"


@dataclass(frozen=True)
class _Arch:
    stem: tuple[int, ...]
    widths: tuple[int, ...]
    layers: tuple[int, ...]
    rnn_hidden: int
    expansion: int = 4
    kernel_size: int = 5
    strides: tuple[int, ...] = (1, 2, 2, 2)


ARCHS = {
    "full": _Arch(stem=(32, 32, 64), widths=(64, 128, 128, 192), layers=(3, 4, 23, 3), rnn_hidden=1024),
    # Same code, tiny widths: for tests and the demo.  Same strides, so still 32 steps.
    "tiny": _Arch(stem=(8, 8, 16), widths=(8, 16, 16, 24), layers=(1, 1, 1, 1), rnn_hidden=64),
}


class EcgfmKedConfig(PluginConfig):
    """Options of the ``ecgfm-ked`` encoder."""

    variant: Literal["full", "tiny"] = Field(
        "full", description="'full': xresnet1d101 of ECGFM-KED (768 features, RNN 1024); 'tiny': same code, small widths")
    num_tokens: int = Field(1, ge=1, description="K attention-pooling query heads = tokens per ECG (1 in the paper)")
    normalize_steps: bool = Field(
        True, description="L2-normalise each of the 32 steps' features before the RNN (the reference's ECG "
                          "normalisation; the pooled vector is normalised only if projector.normalize_input lists ecg)")
    weights: Path | None = Field(
        None, description="local ECGFM-KED checkpoint ({'ecg_model': state_dict} or a plain state dict, .pt/.pth/.safetensors); "
                          "None = random init (tests and demo only)")
    trust_checkpoint: bool = Field(
        False, description="allow full unpickling of a checkpoint the safe loader refuses (can run code from the file)")


# --------------------------------------------------------------------------- backbone
def _conv_layer(ni: int, nf: int, ks: int, *, stride: int = 1, act: bool = True, zero_bn: bool = False) -> nn.Sequential:
    """fastai ``ConvLayer``: Conv1d (no bias) -> BatchNorm1d [-> ReLU]."""
    conv = nn.Conv1d(ni, nf, ks, stride=stride, padding=(ks - 1) // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight)
    bn = nn.BatchNorm1d(nf)
    # fastai's init: the last BN of a residual branch starts at zero so each block starts as identity.
    nn.init.constant_(bn.weight, 0.0 if zero_bn else 1.0)
    nn.init.constant_(bn.bias, 1e-3)
    layers: list[nn.Module] = [conv, bn]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock1d(nn.Module):
    """fastai v2 bottleneck ``ResBlock`` (1-D): ``act(convpath(x) + idpath(x))``."""

    def __init__(self, expansion: int, ni: int, nf: int, *, stride: int = 1, kernel_size: int = 5):
        super().__init__()
        nh, ni, nf = nf, ni * expansion, nf * expansion
        self.convs = nn.Sequential(
            _conv_layer(ni, nh, 1),
            _conv_layer(nh, nh, kernel_size, stride=stride),
            _conv_layer(nh, nf, 1, act=False, zero_bn=True),
        )
        # fastai wraps ``convs`` in ``convpath``: the same module under two names, so the released
        # state_dict holds both ``convs.*`` and ``convpath.0.*``; keep both for a strict load.
        self.convpath = nn.Sequential(self.convs)
        idpath: list[nn.Module] = []
        if ni != nf:
            idpath.append(_conv_layer(ni, nf, 1, act=False))
        if stride != 1:
            idpath.insert(0, nn.AvgPool1d(2, ceil_mode=True))
        self.idpath = nn.Sequential(*idpath)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convpath(x) + self.idpath(x))


class XResNet1d(nn.Sequential):
    """fastai-style 1-D xresnet without head: stem (3 convs), max-pool, 4 stages of ResBlocks.

    Module indices 0-2 stem, 3 max-pool, 4-7 stages, as in the ECGFM-KED checkpoint.
    """

    def __init__(self, in_channels: int, stem: Sequence[int], widths: Sequence[int], layers: Sequence[int], *,
                 expansion: int = 4, kernel_size: int = 5, strides: Sequence[int] = (1, 2, 2, 2)):
        sizes = [in_channels, *stem]
        mods: list[nn.Module] = [
            _conv_layer(sizes[i], sizes[i + 1], kernel_size, stride=2 if i == 0 else 1) for i in range(len(stem))
        ]
        mods.append(nn.MaxPool1d(kernel_size=3, stride=2, padding=1))
        if stem[-1] % expansion:
            raise ConfigError(f"xresnet1d: stem width {stem[-1]} must be a multiple of the expansion {expansion}")
        block_in = [stem[-1] // expansion, *widths]
        for i, (n, stride) in enumerate(zip(layers, strides)):
            mods.append(nn.Sequential(*[
                ResBlock1d(expansion, block_in[i] if j == 0 else block_in[i + 1], block_in[i + 1],
                           stride=stride if j == 0 else 1, kernel_size=kernel_size)
                for j in range(n)
            ]))
        super().__init__(*mods)
        self.out_channels = widths[-1] * expansion
        self._kernel_size = kernel_size
        self._strides = tuple(strides)
        self._num_stem = len(stem)

    def output_length(self, length: int) -> int:
        """Number of output steps for an input of ``length`` samples."""
        k, p = self._kernel_size, (self._kernel_size - 1) // 2
        length = (length + 2 * p - k) // 2 + 1  # first stem conv, stride 2
        length = (length + 2 - 3) // 2 + 1  # max-pool 3, stride 2, padding 1
        for s in self._strides:
            if s != 1:
                length = (length + 2 * p - k) // s + 1
        return length


# --------------------------------------------------------------------------- head
class RnnAttentionPool(nn.Module):
    """[L2-normalise each step ->] one-layer RNN -> attention pooling over steps with ``num_tokens`` heads."""

    def __init__(self, in_dim: int, hidden: int, num_tokens: int, normalize_steps: bool = True):
        super().__init__()
        self.normalize_steps = normalize_steps
        self.rnn = nn.RNN(in_dim, hidden, num_layers=1, batch_first=True)
        self.attn = nn.Linear(hidden, num_tokens)

    def forward(self, feats: torch.Tensor, return_weights: bool = False) -> Any:
        h, _ = self.rnn(F.normalize(feats, dim=-1) if self.normalize_steps else feats)  # [B, N, H]
        w = self.attn(h).softmax(dim=1)  # [B, N, K]: one distribution over steps per head
        pooled = torch.einsum("bnk,bnh->bkh", w, h)
        return (pooled, w) if return_weights else pooled


# --------------------------------------------------------------------------- encoder
class EcgfmKedEncoder(Encoder):
    """ECGFM-KED xresnet1d101 (frozen) + RNN attention pooling head -> [B, K, 1024]."""

    modality = "ecg"
    config_class = EcgfmKedConfig
    contract_options: ClassVar[dict[str, Any]] = {"variant": "tiny"}

    def __init__(self, *, variant: str = "full", num_tokens: int = 1, normalize_steps: bool = True,
                 weights: str | Path | None = None, trust_checkpoint: bool = False):
        super().__init__()
        self.config = EcgfmKedConfig(variant=variant, num_tokens=num_tokens, normalize_steps=normalize_steps,
                                     weights=weights, trust_checkpoint=trust_checkpoint)
        arch = ARCHS[self.config.variant]
        self.backbone = XResNet1d(NUM_LEADS, arch.stem, arch.widths, arch.layers, expansion=arch.expansion,
                                  kernel_size=arch.kernel_size, strides=arch.strides)
        self.head = RnnAttentionPool(self.backbone.out_channels, arch.rnn_hidden, self.config.num_tokens,
                                     normalize_steps=self.config.normalize_steps)
        self.input_shape = (NUM_LEADS, NUM_SAMPLES)
        self.feature_shape = (self.backbone.output_length(NUM_SAMPLES), self.backbone.out_channels)
        self.pooled_dim = arch.rnn_hidden
        self.num_tokens = self.config.num_tokens
        if self.config.weights is not None:
            self.load_backbone(self.config.weights, trust=self.config.trust_checkpoint)
        else:
            log = logger.warning if self.config.variant == "full" and not saved_weights_follow() else logger.info
            log("ecgfm-ked (%s): no weights given, backbone randomly initialised (tests/demo only)", self.config.variant)
        self.freeze_backbone()
        self.backbone.eval()

    def load_backbone(self, path: str | Path, *, trust: bool = False) -> None:
        """Load an ECGFM-KED checkpoint (``{"ecg_model": state_dict}`` or a plain state dict), strictly."""
        obj = load_state_file(path, trust=trust)
        state = select_state(obj, entry=CHECKPOINT_ENTRY, where=f"ECG checkpoint {path}")
        state = strip_common_prefix(state, "module.")  # saved from DataParallel
        load_into(self.backbone, state, strict=True, where=f"ECG checkpoint {path}")

    def backbone_eval(self) -> None:
        self.backbone.eval()

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 12, 1000] -> [B, 32, 768]`` (steps x features), no grad."""
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"ecgfm-ked: input of shape {tuple(x.shape)}, expected [B, {', '.join(map(str, self.input_shape))}]")
        p = next(self.backbone.parameters())
        y = self.backbone(x.to(device=p.device, dtype=p.dtype))
        return y.transpose(1, 2).float()

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, 32, 768] -> [B, K, 1024]``."""
        p = next(self.head.parameters())
        return self.head(features.to(device=p.device, dtype=p.dtype))

    def attention_weights(self, features: torch.Tensor) -> torch.Tensor:
        """Attention of each pooling head over the steps: ``[B, N, K]`` (sums to 1 over N)."""
        p = next(self.head.parameters())
        return self.head(features.to(device=p.device, dtype=p.dtype), return_weights=True)[1]


# --------------------------------------------------------------------------- test helpers
def read_manifest(path: str | Path) -> dict[str, list[int]]:
    """Key -> shape layout of a state dict, from a JSON file ``{"keys": {key: shape}}``."""
    data = json.loads(Path(path).read_text())
    return {k: list(v) for k, v in data.get("keys", data).items()}


def checkpoint_from_manifest(manifest: dict[str, Sequence[int]], *, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A fake released checkpoint ``{"ecg_model": state}`` with random tensors of the manifest's shapes.

    ``convpath.0.*`` copies the value of its ``convs.*`` twin, as in a real checkpoint (one module
    saved under two names).
    """
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in manifest.items():
        twin = key.replace(".convpath.0.", ".convs.")
        if twin != key and twin in state:
            state[key] = state[twin].clone()
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(*shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(*shape, generator=g) / math.sqrt(max(1, math.prod(shape[1:])))
    return {CHECKPOINT_ENTRY: state}


@hookimpl
def medtvt_register_encoders(register):
    register("ecgfm-ked", EcgfmKedEncoder, config=EcgfmKedConfig)
