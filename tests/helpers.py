"""Shared test helpers: stand-in encoders and a tiny model built the way ``new_model`` builds one."""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.contracts import Encoder, PluginConfig
from medtvt_core.model import MedTVTConfig, MedTVTForConditionalGeneration, MedTVTProcessor

CORPUS = [
    "<think> sinus rhythm, rate 80, normal axis </think><answer> Hypertension; Sepsis </answer>",
    "The ECG shows atrial fibrillation. The chest x-ray shows consolidation.",
    "Labs: creatinine raised, white cells raised, lactate normal.",
    "no acute cardiopulmonary disease; heart size normal; lungs clear",
] * 20
QUESTIONS = {
    # modality subsets per sample: the prompt holds the placeholders of present modalities only
    (True, True, True): "ECG <ecg> then image <cxr> and labs <lab>. Which diseases?",
    (False, True, True): "Image <cxr> and labs <lab> (ecg not available). Which diseases?",
    (True, False, True): "Labs <lab> first, ECG <ecg> second (cxr not available).",
    (True, True, False): "ECG <ecg> and image <cxr>, lab not available; diagnose.",
}
ANSWERS = ["<think> irregular rhythm </think><answer> Atrial Fibrillation </answer>",
           "<think> consolidation </think><answer> Pneumonia; Sepsis </answer>",
           "<answer> Hypertension </answer>",
           "<think> x </think><answer> Coronary Artery Disease; Diabetes Mellitus </answer>"]
PLACEHOLDERS = {"ecg": "<ecg>", "cxr": "<cxr>", "lab": "<lab>"}


# --------------------------------------------------------------------------- stand-ins
class StubEncoderConfig(PluginConfig):
    num_tokens: int = Field(1, ge=1, description="K tokens")
    weights: str | None = Field(None, description="backbone weights file (safetensors of the backbone)")


class _StubEncoder(Encoder):
    """Frozen Linear + BatchNorm backbone [B, 6] -> [B, 4, 8]; head Linear 8->12 + adaptive pooling to K."""

    config_class = StubEncoderConfig

    def __init__(self, *, num_tokens: int = 1, weights: str | None = None):
        super().__init__()
        self.config = StubEncoderConfig(num_tokens=num_tokens, weights=weights)
        self.backbone = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32))
        if weights:  # a real plugin reads its pretrained backbone here
            self.backbone.load_state_dict(load_file(weights))
        self.head = nn.Linear(8, 12)
        self.input_shape, self.feature_shape, self.pooled_dim, self.num_tokens = (6,), (4, 8), 12, num_tokens

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).view(-1, 4, 8)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(self.head(features).transpose(1, 2), self.num_tokens).transpose(1, 2)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


class StubEcg(_StubEncoder):
    modality = "ecg"


class StubCxr(_StubEncoder):
    modality = "cxr"


class StubLab(_StubEncoder):
    """One token only, like the real lab encoder: the model repeats it K times."""

    modality = "lab"

    def __init__(self, *, num_tokens: int = 1, weights: str | None = None):
        super().__init__(num_tokens=1, weights=weights)


class _StubPlugin:
    @hookimpl
    def medtvt_register_encoders(self, register):
        register("stub-ecg", StubEcg, config=StubEncoderConfig)
        register("stub-cxr", StubCxr, config=StubEncoderConfig)
        register("stub-lab", StubLab, config=StubEncoderConfig)


_TOKENIZERS: dict[str, object] = {}


def make_model(modalities, encoders, catalog, *, k=1, fusion=None, llm=None, seed=0):
    """A fresh model and processor, built the way :func:`medtvt_core.build.new_model` builds one."""
    from medtvt_core.build import build_llm_plugin

    llm = llm or {"name": "llama-lora", "options": {"variant": "tiny", "tokenizer_vocab_size": 400}}
    llm_plugin = build_llm_plugin(llm, catalog)
    key = json.dumps(llm, sort_keys=True)
    if key not in _TOKENIZERS:  # training the tokenizer is the slow part of a tiny build
        _TOKENIZERS[key] = llm_plugin.load_tokenizer(lambda: CORPUS)
    tok = copy.deepcopy(_TOKENIZERS[key])
    ph = {m: PLACEHOLDERS[m] for m in modalities}
    tok.add_special_tokens({"extra_special_tokens": list(ph.values())}, replace_extra_special_tokens=False)
    cfg = MedTVTConfig(modalities=list(modalities), encoders=encoders,
                       projector={"tokens_per_modality": k, "blocks": 1}, fusion=fusion or {"name": "mpl",
                                                                                          "options": {"num_heads": 2}},
                       llm=llm, text_config=llm_plugin.text_config(tok), placeholders=ph,
                       placeholder_token_ids={m: tok.convert_tokens_to_ids(p) for m, p in ph.items()})
    torch.manual_seed(seed)
    model = MedTVTForConditionalGeneration(cfg, catalog=catalog, seed=seed)
    return model, MedTVTProcessor(tok, ph, k)
