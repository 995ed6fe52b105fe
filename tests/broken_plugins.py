"""Deliberately broken plugins for the contract-kit tests."""

import torch
from torch import nn

from medtvt_core import hookimpl
from medtvt_core.contracts import Encoder, Fusion, FusionOutput, PluginConfig


class _Cfg(PluginConfig):
    pass


class WrongShapeEncoder(Encoder):
    """Claims feature_shape (4, 8) but returns (3, 8)."""

    modality = "ecg"
    config_class = _Cfg

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(5, 8)
        self.head = nn.Linear(8, 8)
        self.input_shape, self.feature_shape, self.pooled_dim, self.num_tokens = (5,), (4, 8), 8, 1

    def encode(self, x):
        with torch.no_grad():
            return self.backbone(x).unsqueeze(1).expand(-1, 3, -1)

    def pool(self, f):
        return self.head(f.mean(1, keepdim=True))

    def head_parameters(self):
        return list(self.head.parameters())


class LeakyFusion(Fusion):
    """Mixes every modality, masked or not: violates the mask contract."""

    config_class = _Cfg

    def __init__(self, dim, num_modalities):
        super().__init__(dim, num_modalities)
        self.lin = nn.Linear(dim, dim)

    def forward(self, tokens, mask):
        mixed = tokens.mean(1, keepdim=True).expand_as(tokens)
        return FusionOutput(tokens=self.lin(mixed), weights=None)


def no_kwargs_reward(prompts, completions):
    return [0.0 for _ in completions]


class _Broken:
    @staticmethod
    @hookimpl
    def medtvt_register_encoders(register):
        register("wrong-shape", WrongShapeEncoder, config=_Cfg)

    @staticmethod
    @hookimpl
    def medtvt_register_fusion(register):
        register("leaky", LeakyFusion, config=_Cfg)

    @staticmethod
    @hookimpl
    def medtvt_register_rewards(register):
        register("no-kwargs", no_kwargs_reward)


