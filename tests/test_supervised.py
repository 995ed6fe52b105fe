"""PT/SFT checkpoints: which one a resume starts from, and what it accepts."""

import json

import pytest
import safetensors.torch
import torch

from medtvt_core.errors import CheckpointError
from medtvt_core.training.supervised import TRAINER_STATE, WEIGHTS, last_complete_checkpoint, trainable_state


def _checkpoint(d, step, *, state: str | None = '{"global_step": 1}', weights=True):
    c = d / f"checkpoint-{step}"
    c.mkdir(parents=True)
    if weights:
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(c / WEIGHTS))
    if state is not None:
        (c / TRAINER_STATE).write_text(state)
    return c


def test_resume_skips_and_removes_checkpoints_cut_short(tmp_path):
    good = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)  # a step-order comparison, not a string one: 10 > 2
    _checkpoint(tmp_path, 11, state=None)  # killed before trainer_state.json
    _checkpoint(tmp_path, 12, state='{"global_st')  # killed while writing it
    _checkpoint(tmp_path, 13, weights=False)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2"]
    assert json.loads((good / TRAINER_STATE).read_text()) == {"global_step": 1}


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert last_complete_checkpoint(tmp_path / "absent") is None
    _checkpoint(tmp_path, 1, state=None)
    assert last_complete_checkpoint(tmp_path) is None and not any(tmp_path.iterdir())


def test_trainer_resume_loads_exactly_the_trainable_parameters(tmp_path):
    from transformers import TrainingArguments

    from medtvt_core.training.supervised import MedTVTTrainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = MedTVTTrainer(model=model, args=args)
    saved = trainable_state(model)
    assert sorted(saved) == ["1.bias", "1.weight"]  # the frozen layer is not checkpointed

    ck = tmp_path / "checkpoint-1"
    ck.mkdir()
    safetensors.torch.save_file({k: v + 1 for k, v in saved.items()}, str(ck / WEIGHTS))
    frozen = model[0].weight.detach().clone()
    trainer._load_from_checkpoint(str(ck))
    assert torch.equal(model[1].weight, saved["1.weight"] + 1) and torch.equal(model[0].weight, frozen)

    safetensors.torch.save_file({"1.weight": saved["1.weight"]}, str(ck / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"missing keys: 1\.bias"):
        trainer._load_from_checkpoint(str(ck))
    safetensors.torch.save_file({**saved, "0.weight": frozen}, str(ck / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"unexpected keys: 0\.weight"):
        trainer._load_from_checkpoint(str(ck))
