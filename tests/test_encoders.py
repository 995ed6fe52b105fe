"""The three built-in encoders: registration and cheap import (tests/test_contract_kit.py runs the contract)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medtvt_core.plugins import build_catalog

ENCODERS = {"ecgfm-ked": "ecg", "vit": "cxr", "symile": "lab"}


@pytest.fixture(scope="module")
def catalog():
    return build_catalog(allow=list(ENCODERS))  # through the entry points, like any plugin


def test_registered_through_entry_points(catalog):
    assert not catalog.failures
    for name, modality in ENCODERS.items():
        spec = catalog.encoders.spec(name)
        assert spec.dist == "medtvt" and spec.obj.modality == modality
        assert spec.config is spec.obj.config_class
        fields = set(spec.config.model_fields)
        assert {"variant", "num_tokens", "weights", "trust_checkpoint"} <= fields


def test_import_builds_nothing():
    code = (
        "import sys, torch\n"
        "made = []\n"
        "orig = torch.nn.Module.__init__\n"
        "torch.nn.Module.__init__ = lambda self, *a, **k: (made.append(type(self).__name__), orig(self, *a, **k))[1]\n"
        "import medtvt_plugins.encoders.ecgfm_ked, medtvt_plugins.encoders.vit, medtvt_plugins.encoders.symile\n"
        "assert not made, made\n"
        "assert 'timm' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
