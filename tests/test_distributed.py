"""Several processes: PT -> SFT -> RFT on 2 CPU processes (gloo) equal a 1-process run with the same
global batch, launched the way README says (``torchrun``, ``accelerate launch``); the shipped
accelerate configurations pass accelerate's own validation.

The 1-process run accumulates gradients over 2 micro-batches where the 2-process run takes one per
process, so both see the same samples per optimiser step (accelerate shards the data loader by
batches; the RFT sampler gives each process its slice of a window; rollouts are seeded per prompt).
Dropout is off in both (a dropout mask depends on which process draws it).  The RFT reward comes
from a plugin "installed" here as a dist-info folder on PYTHONPATH, found through the ``medtvt``
entry points like any third-party plugin: the built-in rewards are all zero for an untrained model,
which would make every advantage, and so the RFT update, zero.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_orchestrator import _env, _show

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("pt", "sft", "rft")
SETS = [
    # 40 patients: 30 training records, of which rft_holdout 0.3 keeps ~9 for RFT (8 prompts over 2
    # steps) and ~21 for SFT (16 in its 2 steps, all within the first epoch); pinned, not the preset's
    "data.synth.n_patients=40", "data.rft_holdout=0.3", "encoders.lab.options.variant=tiny", "llm.options.pretrain_steps=5",
    "llm.options.lora_dropout=0", "fusion.options.dropout=0",
    # within the first epoch: an uneven last batch is padded differently by 1 and 2 processes
    "pt.epochs=1", "pt.max_steps=3", "pt.batch_size=4", "sft.max_steps=2", "sft.batch_size=4",
    "rft.max_steps=2", "rft.batch_size=2", "rft.num_generations=2", "rft.max_completion_length=8",
    "pt.logging_steps=1", "sft.logging_steps=1", "rft.logging_steps=1",
    "eval.max_new_tokens=8", "eval.limit=4", "eval.metrics=[bleu]", "eval.attribution=false",
    "rewards=[{name: length-test}]",
    "rft.eval_steps=0", "rft.metric_for_best_model=null",  # a validation split would leave RFT too few prompts
]
# Tolerances: PT agrees bit for bit here (same batches, same order of accumulation); SFT/RFT sum two
# micro-batch gradients in another order (all-reduce vs accumulation), a float32 rounding difference.
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4

REWARD_PLUGIN = '''
from medtvt_core import hookimpl


def length_reward(prompts, completions, **kwargs):
    """Characters of the completion / 40: varies within a group, so the advantages are not zero."""
    return [len(c) / 40.0 for c in completions]


@hookimpl
def medtvt_register_rewards(register):
    register("length-test", length_reward, range=(0, None))  # unbounded above: a length, not a score in [0, 1]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("site")
    (site / "medtvt_length_test.py").write_text(REWARD_PLUGIN)
    info = site / "medtvt_length_test-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: medtvt-length-test\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[medtvt]\nlength-test = medtvt_length_test\n")
    e = _env()
    e["PYTHONPATH"] = os.pathsep.join([str(site), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("ddp")
    sets = [a for s in SETS for a in ("--set", s)]
    ga = {1: 2, 2: 1}
    procs = {}
    for n in (1, 2):
        out = base / f"run{n}"
        acc = [a for s in STAGES for a in ("--set", f"{s}.grad_accum={ga[n]}")]
        args = ["run", "--preset", "demo", "--out", str(out), "--quiet", *sets, *acc]
        cmd = ([str(BIN / "medtvt"), *args] if n == 1 else
               [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                "-m", "medtvt_cli.main", *args])
        procs[n] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for n, (out, p) in procs.items():
        so, se = p.communicate(timeout=600)
        r = subprocess.CompletedProcess(p.args, p.returncode, so, se)
        assert p.returncode == 0, _show(r)
    return {n: out for n, (out, _) in procs.items()}


def _losses(run: Path, stage: str) -> list[float]:
    return [h["loss"] for h in json.loads((run / stage / "history.json").read_text())
            if "loss" in h and "train_loss" not in h]


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    one, two = runs[1], runs[2]
    for s in STAGES:
        a, b = _losses(one, s), _losses(two, s)
        assert len(a) == len(b) == {"pt": 3, "sft": 2, "rft": 2}[s], (s, a, b)
        assert max(abs(x - y) for x, y in zip(a, b)) <= LOSS_TOL, (s, a, b)
        wa, wb = load_file(str(one / s / "final" / "model.safetensors")), load_file(str(two / s / "final" / "model.safetensors"))
        assert sorted(wa) == sorted(wb)
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        print(f"{s}: max |loss 1 proc - loss 2 procs| {max(abs(x - y) for x, y in zip(a, b)):.3g}, "
              f"max |weight difference| {diff:.3g}")  # shown with pytest -s (the numbers in the notes)
        assert diff <= WEIGHT_TOL, (s, diff)
    rft = [h for h in json.loads((two / "rft" / "history.json").read_text()) if "reward" in h]
    assert rft and rft[0]["reward_std"] > 0  # the RFT step had advantages to follow
    w_sft, w_rft = load_file(str(two / "sft" / "final" / "model.safetensors")), load_file(str(two / "rft" / "final" / "model.safetensors"))
    assert any(not torch.equal(w_sft[k], w_rft[k]) for k in w_sft if "lora_" in k)  # ... and moved the weights
    for n, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        assert m["world_size"] == n and list(m["stages"]) == list(STAGES)
        assert json.loads((run / "environment.json").read_text())["world_size"] == n
    # the main process alone wrote: one report, no leftovers of a second writer
    assert not list(two.rglob("*.tmp")) and len(list(two.glob("report.md"))) == 1
    # sharded evaluation gathers every record once, in order
    ids_one = [json.loads(x)["id"] for x in (one / "eval" / "rft.jsonl").read_text().splitlines()]
    ids_two = [json.loads(x)["id"] for x in (two / "eval" / "rft.jsonl").read_text().splitlines()]
    assert ids_one == ids_two and len(ids_two) == 4


def test_rft_layout_is_refused_before_training(tmp_path, env):
    """More prompts per step than the training split holds: one line, exit 2, before PT."""
    out = tmp_path / "bad"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "medtvt_cli.main",
           "run", "--preset", "demo", "--out", str(out), "--quiet", *[a for s in SETS for a in ("--set", s)],
           "--set", "rft.batch_size=8", "--set", "rft.grad_accum=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0, _show(r)
    errors = {ln for ln in r.stderr.splitlines() if ln.startswith("error: ")}
    assert errors == {"error: rft: 2 process(es) x rft.batch_size=8 x rft.grad_accum=2 = 32 prompts per step, but "
                      "RFT has 9 training record(s); lower rft.batch_size or rft.grad_accum, use fewer processes, "
                      "or raise data.rft_holdout"}, _show(r)
    assert not (out / "pt").exists()


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_shipped_accelerate_configs_pass_accelerate_validation(name, tmp_path):
    """Dry check: accelerate's launcher parses each shipped config into a launch plan (no process starts)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "examples" / "accelerate" / name
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "medtvt_cli.main", "run", "--preset",
                                              "paper"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    kind = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP"}.get(name, "DEEPSPEED")
    assert str(cfg.distributed_type).endswith(kind)
    if kind == "FSDP":
        from transformers.models.llama import modeling_llama

        assert hasattr(modeling_llama, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])  # the LLaMA layer class
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] in (2, 3)


def test_accelerate_launch_with_the_shipped_ddp_config(tmp_path, env):
    """README's accelerate command; on a machine without GPUs the DDP config starts gloo processes
    (overridden here: 2 processes instead of 8, no bf16)."""
    out = tmp_path / "acc"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "medtvt_cli.main", "run", "--preset", "demo", "--out", str(out), "--quiet", "--stages", "sft",
           *[a for s in SETS for a in ("--set", s)]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, _show(r)
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and list(m["stages"]) == ["sft"]
