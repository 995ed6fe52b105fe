"""The benchmark scripts run (``--smoke``: tiny shapes, seconds) and print their tables; the
reference-style no-cache decoding gives ``model.generate``'s tokens.  No timing is asserted (a
shared machine): the scripts print ratios, these tests only check that they run and what they print."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def bench(monkeypatch):
    """Import a benchmark script as a module (they import their sibling ``benchlib``)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


@pytest.fixture(scope="module")
def tiny_generation_model():
    sys.path.insert(0, str(BENCH))
    try:
        kvc = importlib.import_module("generation_kv_cache")
        model, processor = kvc.build("tiny", "cpu", "float32")
    finally:
        sys.path.remove(str(BENCH))
    return kvc, model, processor


def test_recompute_decoding_matches_generate(tiny_generation_model):
    kvc, model, processor = tiny_generation_model
    batch = kvc.make_batch(model, processor, 2, "cpu")
    assert (batch["attention_mask"] == 0).any(), "the two prompts differ in length: one is left-padded"
    kw = dict(num_return_sequences=2, max_new_tokens=12, **kvc.stop_ids(processor))
    cached = model.generate(**batch, **kw)
    recomputed = kvc.generate_recompute(model, **batch, **kw)
    assert recomputed.shape == cached.shape and cached.shape[0] == 4
    assert torch.equal(recomputed, cached)
    # Sampling with a forced length: the same processors and the same random draws give the same tokens.
    samp = dict(kw, min_new_tokens=12, do_sample=True, temperature=0.6, top_p=0.9, top_k=5)
    torch.manual_seed(0)
    a = model.generate(**batch, **samp)
    torch.manual_seed(0)
    assert torch.equal(kvc.generate_recompute(model, **batch, **samp), a)


def test_recompute_decoding_stops_like_generate(tiny_generation_model):
    """Rows that produce a stop token are padded after it, and the loop ends once every row has."""
    kvc, model, processor = tiny_generation_model
    batch = kvc.make_batch(model, processor, 1, "cpu")
    first = model.generate(**batch, max_new_tokens=1, pad_token_id=processor.pad_token_id)[0, 0].item()
    # Declare the greedy first token a stop token: generation ends after one step in both methods.
    kw = dict(num_return_sequences=2, max_new_tokens=10, eos_token_id=[first], pad_token_id=processor.pad_token_id)
    out = kvc.generate_recompute(model, **batch, **kw)
    assert out.tolist() == [[first], [first]]
    assert torch.equal(out, model.generate(**batch, **kw))


def test_gpu_check_smoke_prints_one_table(bench, tmp_path, capsys):
    gpu_check = bench("gpu_check")
    rc = gpu_check.main(["--smoke", "--out", str(tmp_path / "gpu_check.md")])
    out = capsys.readouterr().out
    assert rc == 0, out
    table = (tmp_path / "gpu_check.md").read_text()
    for part in ("PT", "SFT", "RFT", "KV"):
        assert re.search(rf"^\| {part} +\| wall time", table, re.M), part
    for metric in ("tokens/s", "MFU \\(approx.\\)", "peak memory", "rollout tokens/s", "speed-up @8"):
        assert re.search(metric, table), metric
    assert "| KV   | greedy identity (float32) | identical" in table
    assert "error" not in table and "timed out" not in table
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(raw["parts"]) == {"pt", "sft", "rft", "kv"}
    assert raw["parts"]["rft"]["rollout_tokens_per_s"] > 0 and raw["parts"]["pt"]["tokens_per_s"] > 0
    assert out.rstrip().endswith(table.rstrip().splitlines()[-1])  # the final table is printed too


@pytest.mark.parametrize("script, header", [
    ("generation_kv_cache", "| new tokens | cache tok/s | recompute tok/s | speed-up"),
    ("train_throughput", "| stage | s/step | samples/s | tokens/s"),
    ("data_pipeline", "| arm "),
])
def test_benchmark_smoke_runs_and_prints_its_table(bench, capsys, script, header):
    bench(script).main(["--smoke"])
    out = capsys.readouterr().out
    assert header in out, out


def test_rft_vs_trl_smoke_prints_both_trainers_and_the_ratio(bench, capsys):
    """Both GRPO trainers run (ours on the demo MedTVT model with cohort modality inputs, TRL's on the
    same LLM with text prompts), generate the same forced number of tokens, and the table is printed."""
    res = bench("rft_vs_trl").main(["--smoke"])
    out = capsys.readouterr().out
    assert "| trainer " in out and "| rollout tok/s |" in out, out
    for row in ("medtvt MedTVTGRPOTrainer", "TRL GRPOTrainer", "ratio medtvt / TRL"):
        assert re.search(rf"^\| {row} +\| [0-9.]+x? +\|", out, re.M), row
    assert "ABBA" in out
    assert res["medtvt"]["tokens"] == res["trl"]["tokens"] == 2 * 2 * 4  # prompts x G x forced length
    assert res["medtvt"]["prompt_tokens"] == res["trl"]["prompt_tokens"]
    assert res["settings"]["beta"] > 0


def test_shell_scripts_parse_and_wheels_are_pinned_once():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    for name in ("gpu_check.sh", "fetch_gpu_wheels.sh"):
        subprocess.run([bash, "-n", str(BENCH / name)], check=True)
    text = (BENCH / "fetch_gpu_wheels.sh").read_text()
    pins = re.findall(r"^\s+([A-Za-z0-9_.-]+)==([0-9][^\s)]*)", text, re.M)
    names = [n.lower().replace("_", "-") for n, _ in pins]
    assert len(names) == len(set(names)), "two versions of one package stop the install on the machine"
    assert {"pydantic", "pydantic-core", "trl", "datasets"} <= set(names)


def test_paper_shape_smoke_prints_every_stage_dtype_and_checkpointing(bench, capsys):
    """The paper-shape CPU benchmark runs PT, SFT and RFT for each dtype x checkpointing setting and
    prints one row each; its restated LLaMA-3.2-1B config is the plugin's (checked before it runs)."""
    ps = bench("paper_shape")
    rows = ps.main(["--smoke", "--dtypes", "float32,bfloat16", "--checkpointing", "off,on"])
    out = capsys.readouterr().out
    assert re.search(r"^\| stage +\| LLM dtype \| grad\. ckpt \| s/step +\| tokens/s +\| peak RSS +\|", out, re.M), out
    assert "SMOKE: tiny LLM and encoders, not the paper shape" in out
    for stage in ("PT", "SFT", "RFT"):
        for dtype in ("float32", "bfloat16"):
            for ckpt in ("off", "on"):
                assert re.search(rf"^\| {stage} +\| {dtype} +\| {ckpt} +\| [0-9.]+ +\| [0-9.]+", out, re.M), \
                    (stage, dtype, ckpt)
    assert len(rows) == 12 and all(r["peak_rss_bytes"] > 0 and r["s_per_step"] > 0 for r in rows)
    assert {r["num_generations"] for r in rows if r["stage"] == "rft"} == {2}


def test_paper_shape_reduces_only_layers_and_vocabulary(bench):
    ps = bench("paper_shape")
    from medtvt_plugins.llms.llama_lora import llama_config

    assert ps.LLAMA_3_2_1B == {k: ps.llama_variants()["llama-3.2-1b"][k] for k in ps.LLAMA_3_2_1B}
    with ps.llm_shape(2, 32768):
        small = llama_config("llama-3.2-1b").to_dict()
    full = llama_config("llama-3.2-1b").to_dict()
    assert (small["num_hidden_layers"], small["vocab_size"]) == (2, 32768)
    assert (full["num_hidden_layers"], full["vocab_size"]) == (16, 128256)
    assert {k: v for k, v in small.items() if k not in ("num_hidden_layers", "vocab_size", "layer_types")} == \
        {k: v for k, v in full.items() if k not in ("num_hidden_layers", "vocab_size", "layer_types")}
