"""``vit``: a timm ViT-B/16 (224 px) chest X-ray encoder with the MedTVT-R1 token-pooling head.

:meth:`encode` returns all 197 tokens of ``forward_features`` (class token + 14 x 14 patches,
after the final norm), ``[B, 197, 768]``.  The trainable head is a 1x1 ``Conv1d`` over the
tokens, ``197 -> K`` (``K = 1`` in the reference): :meth:`pool` gives ``[B, K, 768]``.

Weights come only from a local file or directory (``weights``): safetensors, a timm checkpoint
(``.pth``/``.bin``, possibly under ``"state_dict"``/``"model"``) or a Hugging Face
``transformers`` ViT checkpoint (converted to timm names).  Nothing is ever fetched from a hub;
``weights=None`` gives random weights (tests and the demo only).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.checkpoints import load_into, load_state_file, select_state, strip_common_prefix
from medtvt_core.contracts import Encoder, PluginConfig, saved_weights_follow
from medtvt_core.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

IMG_SIZE = 224
PATCH = 16
NUM_TOKENS_OUT = (IMG_SIZE // PATCH) ** 2 + 1  # 196 patches + class token
# File names tried, in order, when ``weights`` is a directory (timm / transformers hub layout).
DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")

VARIANTS: dict[str, dict[str, int]] = {
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "tiny": dict(embed_dim=32, depth=2, num_heads=2),  # same code, for tests and the demo
}


class VitConfig(PluginConfig):
    """Options of the ``vit`` encoder."""

    variant: Literal["base", "tiny"] = Field(
        "base", description="'base': ViT-B/16 at 224 px (768 wide, 12 blocks); 'tiny': 32 wide, 2 blocks (tests, demo)")
    num_tokens: int = Field(1, ge=1, le=NUM_TOKENS_OUT,
                            description="K tokens per image from the Conv1d over the 197 ViT tokens (1 in the paper)")
    weights: Path | None = Field(
        None, description="local weights: .safetensors/.pth/.bin file or a directory with model.safetensors "
                          "(timm or transformers ViT layout); None = random init (tests and demo only)")
    trust_checkpoint: bool = Field(
        False, description="allow full unpickling of a checkpoint the safe loader refuses (can run code from the file)")


# --------------------------------------------------------------------------- weight files
# transformers ViT names -> timm names.  Files on disk use the 4.x names (``encoder.layer.N``);
# transformers 5 names its modules ``layers.N.attention.q_proj`` ..., accepted too.
_HF_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"(?:encoder\.layer\.(\d+)\.attention\.attention\.query|layers\.(\d+)\.attention\.q_proj)\.(weight|bias)", "qkv:q"),
    (r"(?:encoder\.layer\.(\d+)\.attention\.attention\.key|layers\.(\d+)\.attention\.k_proj)\.(weight|bias)", "qkv:k"),
    (r"(?:encoder\.layer\.(\d+)\.attention\.attention\.value|layers\.(\d+)\.attention\.v_proj)\.(weight|bias)", "qkv:v"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:attention\.output\.dense|attention\.o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_HF_DROP = re.compile(r"(pooler|classifier)\.")  # not part of the token encoder


def is_transformers_vit(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def transformers_to_timm(state: dict[str, torch.Tensor], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a transformers ``ViTModel`` state dict to timm ``VisionTransformer`` names.

    Separate query/key/value projections are concatenated into timm's fused ``qkv``.
    """
    # ViTForImageClassification nests the encoder under ``vit.``
    state = {k[4:] if k.startswith("vit.") else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in state.items():
        if _HF_DROP.match(k):
            continue
        for pattern, repl in _HF_RULES:
            m = re.fullmatch(pattern, k)
            if not m:
                continue
            if repl.startswith("qkv:"):
                block = m.group(1) or m.group(2)
                qkv.setdefault((block, m.group(3)), {})[repl[4:]] = v
            else:
                out[m.expand(repl)] = v
            break
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{where}: transformers ViT keys with no timm equivalent: {', '.join(unknown[:5])}")
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{where}: block {block} {kind} lacks {', '.join(sorted({'q', 'k', 'v'} - set(parts)))}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def resolve_weights(path: str | Path) -> Path:
    """The weight file named by ``path`` (a file, or a directory holding one of :data:`DIR_FILES`)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in DIR_FILES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"ViT weights directory {p} holds none of {', '.join(DIR_FILES)}")
    if not p.exists():
        raise CheckpointError(f"ViT weights file {p} does not exist (weights are never downloaded; give a local file)")
    return p


def read_vit_state(path: str | Path, model: nn.Module, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a local ViT checkpoint and return it in ``model``'s (timm) key layout."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    file = resolve_weights(path)
    where = f"ViT weights {file}"
    state = select_state(load_state_file(file, trust=trust), entry=("state_dict", "model"), where=where)
    state = strip_common_prefix(state, "module.")
    if is_transformers_vit(state):
        state = transformers_to_timm(state, where)
    # timm's own filter: conv patch-embed from old linear layout, position-embedding resampling.
    state = checkpoint_filter_fn(state, model)
    # num_classes=0: the classifier is not part of the token encoder.
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def build_vit(variant: str) -> nn.Module:
    """A randomly initialised timm ViT (no hub access: ``pretrained=False``)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if variant == "base":
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    return VisionTransformer(img_size=IMG_SIZE, patch_size=PATCH, num_classes=0, **VARIANTS[variant])


# --------------------------------------------------------------------------- encoder
class VitEncoder(Encoder):
    """timm ViT-B/16 (frozen) + Conv1d over its 197 tokens -> [B, K, 768]."""

    modality = "cxr"
    config_class = VitConfig
    contract_options: ClassVar[dict[str, Any]] = {"variant": "tiny"}

    def __init__(self, *, variant: str = "base", num_tokens: int = 1, weights: str | Path | None = None,
                 trust_checkpoint: bool = False):
        super().__init__()
        self.config = VitConfig(variant=variant, num_tokens=num_tokens, weights=weights,
                                    trust_checkpoint=trust_checkpoint)
        self.vit = build_vit(self.config.variant)
        width = VARIANTS[self.config.variant]["embed_dim"]
        self.head = nn.Conv1d(NUM_TOKENS_OUT, self.config.num_tokens, kernel_size=1)
        self.input_shape = (3, IMG_SIZE, IMG_SIZE)
        self.feature_shape = (NUM_TOKENS_OUT, width)
        self.pooled_dim = width
        self.num_tokens = self.config.num_tokens
        if self.config.weights is not None:
            self.load_backbone(self.config.weights, trust=self.config.trust_checkpoint)
        else:
            log = logger.warning if self.config.variant == "base" and not saved_weights_follow() else logger.info
            log("vit (%s): no weights given, ViT randomly initialised (tests/demo only)", self.config.variant)
        self.freeze_backbone()
        self.vit.eval()

    @classmethod
    def declared_weight_files(cls, options: dict[str, Any]) -> list[Path]:
        """The file ``weights`` names: itself, or the weights file inside a model directory."""
        w = options.get("weights")
        if w in (None, ""):
            return []
        p = Path(w).expanduser()
        return [resolve_weights(p)] if p.is_dir() else [p]

    def load_backbone(self, path: str | Path, *, trust: bool = False) -> None:
        """Load local ViT weights (see :func:`read_vit_state`) strictly into the backbone."""
        state = read_vit_state(path, self.vit, trust=trust)
        load_into(self.vit, state, strict=True, where=f"ViT weights {path}")

    def backbone_eval(self) -> None:
        self.vit.eval()  # frozen: no dropout / drop-path either

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224] -> [B, 197, 768]`` (all tokens after the final norm), no grad."""
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"vit: input of shape {tuple(x.shape)}, expected [B, {', '.join(map(str, self.input_shape))}]")
        p = next(self.vit.parameters())
        return self.vit.forward_features(x.to(device=p.device, dtype=p.dtype)).float()

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, 197, 768] -> [B, K, 768]`` (tokens are the Conv1d channels)."""
        p = self.head.weight
        return self.head(features.to(device=p.device, dtype=p.dtype))


@hookimpl
def medtvt_register_encoders(register):
    register("vit", VitEncoder, config=VitConfig)
