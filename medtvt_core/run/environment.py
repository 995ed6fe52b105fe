"""``environment.json`` of a run: what a result depends on besides the configuration.

Package versions, the installed plugin distributions (and their versions), torch's thread count,
the device, the process count and whether deterministic algorithms were on.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from ..io import write_json
from ..plugins import Catalog
from ..training.arguments import resolve_device

__all__ = ["environment", "write_environment", "set_deterministic"]

PACKAGES = ("medtvt", "torch", "torchvision", "transformers", "peft", "trl", "accelerate", "tokenizers", "timm",
            "wfdb", "numpy", "scipy", "pandas", "scikit-learn", "pillow", "nltk", "rouge-score", "sacrebleu",
            "bert-score", "safetensors", "pydantic")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def set_deterministic(on: bool) -> None:
    """Deterministic algorithms on or off (CUDA also needs ``CUBLAS_WORKSPACE_CONFIG``)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def environment(catalog: Catalog, *, device: str, world_size: int = 1) -> dict[str, Any]:
    dists = sorted({d for d in catalog.plugins.values() if d not in ("?", "<manual>")})
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "plugins": {name: dist for name, dist in sorted(catalog.plugins.items())},
        "plugin_distributions": {d: _version(d) for d in dists},
        "plugin_failures": [str(f) for f in catalog.failures],
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "world_size": world_size,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def write_environment(path: Path, cfg: Any, catalog: Catalog, *, world_size: int = 1) -> None:

    write_json(path, environment(catalog, device=str(resolve_device(cfg.device)), world_size=world_size))
