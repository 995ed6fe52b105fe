"""PT/SFT checkpoints: which one a resume starts from, and what it accepts."""

import json

import pytest
import safetensors.torch
import torch

from medtvt_core.errors import CheckpointError
from medtvt_core.model.serialization import CONFIG_NAME, WEIGHTS_NAME as WEIGHTS
from medtvt_core.training.supervised import TRAINER_STATE, last_complete_checkpoint


def _checkpoint(d, step, *, state: str | None = '{"global_step": 1}', weights=True):
    c = d / f"checkpoint-{step}"
    c.mkdir(parents=True)
    if weights:
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(c / WEIGHTS))
        (c / CONFIG_NAME).write_text("{}")
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


def test_trainer_checkpoints_are_models_and_resume_is_strict(tmp_path):
    """Trainer saves a checkpoint with the model's save_pretrained; resume refuses a partial one."""
    from transformers import TrainingArguments

    from helpers import _StubPlugin, make_model
    from medtvt_core.model.stages import configure_trainable
    from medtvt_core.plugins import build_catalog
    from medtvt_core.training.supervised import MedTVTTrainer
    import medtvt_plugins.fusion.builtin as fusion
    import medtvt_plugins.llms.llama_lora as llama_lora

    cat = build_catalog(plugins=[_StubPlugin(), fusion, llama_lora], autoload=False)
    model, proc = make_model(("ecg", "lab"), {"ecg": {"name": "stub-ecg"}, "lab": {"name": "stub-lab"}}, cat)
    configure_trainable(model, "pt")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = MedTVTTrainer(model=model, args=args, processing_class=proc)
    ck = tmp_path / "checkpoint-1"
    trainer._save(str(ck))
    assert {"config.json", WEIGHTS, "processor_config.json"} <= {p.name for p in ck.iterdir()}
    saved = safetensors.torch.load_file(str(ck / WEIGHTS))
    key = next(k for k in saved if k.startswith("projectors."))
    bumped = {k: v + 1 if k == key else v for k, v in saved.items()}
    safetensors.torch.save_file(bumped, str(ck / WEIGHTS))
    trainer._load_from_checkpoint(str(ck))
    assert torch.equal(model.state_dict()[key], saved[key] + 1)
    safetensors.torch.save_file({k: v for k, v in saved.items() if k != key}, str(ck / WEIGHTS))
    with pytest.raises(CheckpointError, match=rf"missing keys: {key}"):
        trainer._load_from_checkpoint(str(ck))
    safetensors.torch.save_file({**saved, "projectors.bogus": torch.zeros(1)}, str(ck / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"unexpected keys: projectors\.bogus"):
        trainer._load_from_checkpoint(str(ck))
