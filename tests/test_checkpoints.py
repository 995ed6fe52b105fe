"""Safe checkpoint reading/writing (medtvt_core.checkpoints)."""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
from pathlib import Path

import pytest
import torch
from torch import nn

from medtvt_core import checkpoints as ck
from medtvt_core.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
MARKER: list[str] = []


def _side_effect(tag: str) -> str:
    MARKER.append(tag)
    return tag


class Payload:
    """Unpickling this runs ``_side_effect``: stands in for a malicious checkpoint."""

    def __reduce__(self):
        return (_side_effect, ("code ran",))


class Twice(nn.Module):
    """One submodule under two names, like fastai's ``convs`` / ``convpath``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Sequential(self.a)


# ----------------------------------------------------------------------------- load_state_file
def test_pt_is_read_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(3.0), "meta": {"epoch": 2, "name": "x"}}, path)
    seen = {}
    real = torch.load

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    obj = ck.load_state_file(path)
    assert seen["weights_only"] is True and seen["map_location"] == "cpu"
    assert torch.equal(obj["w"], torch.arange(3.0)) and obj["meta"]["epoch"] == 2


def test_pickle_needing_code_is_refused_without_trust(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload()}, path)
    MARKER.clear()
    with pytest.raises(CheckpointError) as err:
        ck.load_state_file(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "arbitrary code" in msg and "trust_checkpoint=True" in msg and "--trust-checkpoint" in msg
    assert "_side_effect" in msg  # names what the file would call
    assert MARKER == []  # nothing from the file ran
    obj = ck.load_state_file(path, trust=True)
    assert MARKER == ["code ran"] and obj["extra"] == "code ran"


def test_inert_hyperparameters_load_without_trust(tmp_path):
    path = tmp_path / "hp.ckpt"
    hp = argparse.Namespace(lr=1e-3, data_dir=pathlib.Path("/data/symile"))
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"args": hp}}, path)
    before = list(torch.serialization.get_safe_globals())
    obj = ck.load_state_file(path)
    assert obj["hyper_parameters"]["args"].data_dir == pathlib.Path("/data/symile")
    # nothing the loader allowed is left allowed globally (torch itself may register more of its own
    # classes lazily, so compare what the loader adds, not the whole list)
    after = torch.serialization.get_safe_globals()
    assert [g for g in ck._INERT_GLOBALS if g in after and g not in before] == []
    assert [g for g in before if g not in after] == []  # and nothing the user had allowed was removed


def test_legacy_pickle_format(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(ck.load_state_file(path)["w"], torch.ones(2))


@pytest.mark.parametrize("name,content,fragment", [
    ("garbage.pt", b"this is not a checkpoint", "cannot read checkpoint"),
    ("garbage.safetensors", b"\x00\x01broken", "cannot read safetensors"),
    ("weights.npz", b"x", "unsupported file type '.npz'"),
])
def test_unreadable_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="^.*" + fragment) as err:
        ck.load_state_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_state_file(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        ck.load_state_file(tmp_path)


# ----------------------------------------------------------------------------- save_safetensors
def test_save_safetensors_roundtrip_with_shared_tensors(tmp_path):
    torch.manual_seed(0)
    src, dst = Twice(), Twice()
    path = ck.save_safetensors(src.state_dict(), tmp_path / "sub" / "m.safetensors", metadata={"format": "pt"})
    state = ck.load_state_file(path)
    assert set(state) == {"a.weight", "a.bias", "b.0.weight", "b.0.bias"}
    ck.load_into(dst, state, strict=True)
    assert torch.equal(dst.a.weight, src.a.weight)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary left


def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    ck.save_safetensors({"w": torch.ones(2)}, path)
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError):
        ck.save_safetensors({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(ck.load_state_file(path)["w"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    with pytest.raises(CheckpointError, match="entry 'x' is a int"):
        ck.save_safetensors({"x": 3}, path)


# ----------------------------------------------------------------------------- load_into / select_state
def test_load_into_names_wrong_keys_and_shapes():
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    good = m.state_dict()
    renamed = dict(good)
    renamed["0.wieght"] = renamed.pop("0.weight")
    with pytest.raises(CheckpointError) as err:
        ck.load_into(m, renamed, where="ckpt.pt")
    msg = str(err.value)
    assert "ckpt.pt" in msg and "missing keys: 0.weight" in msg and "unexpected keys: 0.wieght" in msg

    wrong = dict(good)
    wrong["1.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"1\.bias expected \(3,\) found \(5,\)"):
        ck.load_into(m, wrong)
    with pytest.raises(CheckpointError, match="shape mismatch"):  # shapes are checked even when not strict
        ck.load_into(m, wrong, strict=False)

    partial = {k: v for k, v in good.items() if k != "1.bias"}
    res = ck.load_into(m, partial, strict=False)
    assert res.missing_keys == ["1.bias"]


def test_load_into_checks_aliased_keys_agree():
    m = Twice()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["b.0.bias"] += 1
    with pytest.raises(CheckpointError, match="a.bias and b.0.bias are one shared tensor"):
        ck.load_into(m, state)


def test_select_state():
    sd = {"labs_encoder.fc1.weight": torch.ones(1), "ecg_encoder.x": torch.ones(1)}
    obj = {"epoch": 3, "state_dict": sd}
    assert list(ck.select_state(obj, entry="state_dict", prefix="labs_encoder.")) == ["fc1.weight"]
    assert ck.select_state(sd, entry="state_dict") == sd  # a plain state dict is accepted as is
    with pytest.raises(CheckpointError, match="no 'ecg_model' entry.*top-level keys: epoch, state_dict"):
        ck.select_state(obj, entry="ecg_model", where="f.pt")
    with pytest.raises(CheckpointError, match="no key starts with 'cxr.'"):
        ck.select_state(obj, entry="state_dict", prefix="cxr.")
    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        ck.select_state({"w": torch.ones(1), "epoch": 1})


# ----------------------------------------------------------------------------- code policy
def _torch_load_calls():
    for root in ("medtvt_core", "plugins", "cli", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    kw = {k.arg: k.value for k in node.keywords}
                    value = kw["weights_only"].value if isinstance(kw.get("weights_only"), ast.Constant) else None
                    yield f"{path.relative_to(REPO)}:{node.lineno}", value


def test_every_torch_load_is_weights_only():
    calls = list(_torch_load_calls())
    unsafe = [where for where, value in calls if value is not True]
    # The single trusted path of the safe loader, reached only with trust=True.
    assert len(unsafe) == 1 and unsafe[0].startswith(os.path.join("medtvt_core", "checkpoints.py")), calls
