"""Every preset end to end at reduced size, then the commands a user runs on the result.

* ``paper`` on a LLaMA-3 model directory (``llama3_dir``: Meta's tokenizer, a tiny random
  ``LlamaForCausalLM`` with the full 128,256-row vocabulary) with random encoders
  (``--random-weights``), the reference prompt format and the ``reference`` protocol first: a
  random LLM writes no ``<answer>`` block, so that protocol's F1 is undefined at every stage and
  must read ``n/a`` with its reason in the log, ``report.md``, ``medtvt eval`` and the model card.
* ``study`` at the tiny sizes of test_orchestrator.TINY_SETS.
* ``demo``: tests/test_journey.py (the preset's settings, shorter training; its learning at the real
  settings: benchmarks/demo_learns.py, outside CI).

Then ``eval``, ``diagnose``, ``export`` and ``AutoModel`` on each result.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_orchestrator import MEDTVT, TINY_SETS, _env, medtvt_all, ok, one_line_error

#: The paper preset at reduced size: tiny encoders (random), the fixture's LLM, a few steps per stage.
PAPER_SHORT = [
    "encoders.ecg.options.variant=tiny", "encoders.cxr.options.variant=tiny", "encoders.lab.options.variant=tiny",
    "pt.epochs=1", "pt.max_steps=2", "pt.batch_size=4", "sft.epochs=1", "sft.max_steps=2", "sft.batch_size=4",
    "rft.max_steps=1", "rft.max_completion_length=12", "rft.grad_accum=1",
    "eval.limit=4", "eval.max_new_tokens=12", "eval.batch_size=4", "eval.metrics=[bleu,rouge]",
    "eval.sampled_reward_samples=2",
]
pytestmark = pytest.mark.timeout(1200)  # a run trains in the setup of a module's first test
UNDEFINED = "no report and its reference both hold an <answer> block"


def _run(out: Path, preset: str, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(MEDTVT), "run", "--preset", preset, "--out", str(out), *extra,
                        *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=_env(), timeout=900)
    return ok(r)


@pytest.fixture(scope="module")
def paper(tmp_path_factory, cohort, llama3_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("paper") / "run"
    r = _run(out, "paper", [*PAPER_SHORT, f"data.root={cohort}", f"llm.options.model_path={llama3_dir}"],
             "--random-weights")
    return out, r


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "run"
    sets = [s for s in TINY_SETS if not s.startswith(("data.rft_holdout", "pt.save_steps", "sft.save_steps",
                                                      "rft.save_steps"))]
    _run(out, "study", [*sets, "data.synth.n_patients=24"], "--quiet")
    return out


def _patient(run: Path) -> list[str]:
    cfg_root = run / "data"
    if not (cfg_root / "qa").is_dir():  # a run on a given data.root
        import yaml

        cfg_root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    rec = json.loads((cfg_root / "qa" / "disease_test.json").read_text())[0]
    return ["--ecg", str(cfg_root / rec["ECG"][0]), "--cxr", str(cfg_root / rec["image"][0]),
            "--lab", str(cfg_root / "labs.csv"), "--lab-id", str(rec["lab"][0])]


def _after(run: Path, tmp: Path) -> dict:
    """eval, diagnose, export and AutoModel on ``run``; returns the eval summary of its first stage."""
    import medtvt_core  # noqa: F401  (registers the medtvt model type)
    from transformers import AutoModel

    stages = list(json.loads((run / "metrics.json").read_text())["stages"])
    assert stages == ["pt", "sft", "rft"]
    ev, dg, ex = medtvt_all(("eval", "--run", run, "--stage", stages[0], "--quiet"),
                            ("diagnose", "--run", run, *_patient(run), "--json", "--samples", "1"),
                            ("export", "--run", run, "--stage", "rft", "--out", tmp / "exported"), timeout=600)
    summary = json.loads(ok(ev).stdout)
    diag = json.loads(ok(dg).stdout)
    assert isinstance(diag["report"], str) and set(diag["modality_weights"]) == {"ecg", "cxr", "lab"}
    ok(ex)
    card = (tmp / "exported" / "README.md").read_text()
    assert "not a medical device" in card and "Protocol: `" in card
    model = AutoModel.from_pretrained(tmp / "exported")
    assert type(model).__name__ == "MedTVTForConditionalGeneration" and model.config.stage == "rft"
    return {"eval": summary, "card": card}


# --------------------------------------------------------------------------- paper
def test_paper_runs_every_stage_and_undefined_f1_reads_na_everywhere(paper, tmp_path):
    run, r = paper
    metrics = json.loads((run / "metrics.json").read_text())
    for s in ("pt", "sft", "rft"):
        m = metrics["stages"][s]
        assert m["protocol"] == "reference" and set(m["by_protocol"]) == {"reference", "strict"}
        # the reference rule restated: CE averages over reports where both texts hold an <answer> block
        preds = [json.loads(line)["prediction"] for line in (run / "eval" / f"{s}.jsonl").read_text().splitlines()]
        with_block = sum("<answer>" in p and "</answer>" in p for p in preds)
        assert m["ce"]["n_averaged"] <= with_block
        if m["ce"]["n_averaged"] == 0:
            assert m["ce"]["f1"] is None
            line = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"[{s}] F1"))
            assert line.startswith(f"[{s}] F1 n/a precision n/a recall n/a") and UNDEFINED in line, line
        assert isinstance(m["by_protocol"]["strict"]["ce"]["f1"], float)  # strict: a missing answer is the empty set
    assert metrics["stages"]["pt"]["ce"]["f1"] is None  # PT writes no <answer>: what crashed the log line before
    report = (run / "report.md").read_text()
    assert "| PT | n/a | n/a | n/a |" in report and f"- PT: f1, precision, recall, auc n/a: {UNDEFINED}" in report
    after = _after(run, tmp_path)
    ev = after["eval"]
    assert ev["f1"] is None and ev["protocol"] == "reference" and UNDEFINED in ev["undefined"]["f1"]
    if metrics["stages"]["rft"]["ce"]["f1"] is None:
        assert f"- f1: n/a ({UNDEFINED}" in after["card"]


def test_paper_run_tokenises_with_llama3_as_the_reference(paper, llama3_dir):
    """The run's saved processor: BOS once, the question as LLaMA-3 tokens around the K=1 modality
    tokens, then " " + answer + <|end_of_text|>; the decoded answer keeps its tags for the rewards."""
    quicktok = pytest.importorskip("quicktok")
    from test_llama3_tokenizer import _expected_prompt

    from medtvt_core.model.processing import MedTVTProcessor
    from medtvt_plugins.rewards.builtin import format_reward, jaccard_reward

    run, _ = paper
    enc = quicktok.get_encoding("llama3")
    proc = MedTVTProcessor.from_pretrained(run / "sft" / "final")
    assert proc.prompt_format == "reference" and proc.answer_end_token == "<|end_of_text|>"
    tok = proc.tokenizer
    assert len(tok) == 128256 + 3 and tok.bos_token_id == 128000
    import yaml

    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    rec = json.loads((root / "qa" / "disease_train.json").read_text())[0]
    q, a = rec["messages"][0]["content"], rec["messages"][1]["content"]
    row = proc.train_features([q], [a])["input_ids"][0].tolist()
    ph = {p: tok.convert_tokens_to_ids(p) for p in proc.placeholders.values()}
    assert sorted(ph.values()) == [128256, 128257, 128258]
    assert row == _expected_prompt(enc, "<|begin_of_text|>" + q, ph, 1) + enc.encode(" " + a) + [128001]
    assert row.count(128000) == 1
    answer = enc.encode(" " + a)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(enc.encode(tag)) >= 2
    text = proc.decode([answer + [128001, 9906]])[0]
    assert text == " " + a and format_reward(completions=[text]) == [1.0]
    assert jaccard_reward(completions=[text], answer=[a]) == [1.0]


def test_paper_random_weights_without_quicktok_fails_before_any_work(tmp_path):
    """Without a model directory the random 1B LLM gets LLaMA-3's tokenizer from quicktok; where
    quicktok is not installed, one line says what to pass, and nothing is written."""
    shadow = tmp_path / "site"
    (shadow / "quicktok").mkdir(parents=True)
    (shadow / "quicktok" / "__init__.py").write_text("raise ImportError('quicktok hidden by the test')\n")
    env = {**_env(), "PYTHONPATH": str(shadow)}
    r = subprocess.run([str(MEDTVT), "run", "--preset", "paper", "--random-weights", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    one_line_error(r, "llm.options", "llama-3.2-1b", "llm.options.model_path=<dir with a LLaMA-3 tokenizer>",
                   "quicktok-v1")
    assert not (tmp_path / "run").exists()


def test_paper_random_weights_1b_gets_the_llama3_tokenizer():
    quicktok = pytest.importorskip("quicktok")
    from medtvt_plugins.llms.llama_lora import LlamaLoraBackbone

    b = LlamaLoraBackbone(variant="llama-3.2-1b")
    tok = b.load_tokenizer()  # no corpus needed, nothing downloaded
    enc = quicktok.get_encoding("llama3")
    text = "<think> ECG: atrial fibrillation 147 bpm. </think><answer> Atrial Fibrillation </answer>"
    assert tok(text)["input_ids"] == [128000] + enc.encode(text)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    cfg = b.text_config(tok)
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (128256, 128000, 128001, 128004)


# --------------------------------------------------------------------------- study
def test_study_runs_end_to_end_and_the_commands_after_it(study, tmp_path):
    metrics = json.loads((study / "metrics.json").read_text())
    assert metrics["stages"]["rft"]["protocol"] == "strict"
    after = _after(study, tmp_path)
    assert isinstance(after["eval"]["f1"], float) and set(after["eval"]["undefined"]) <= {"auc"}
    assert "report.md" in {p.name for p in study.iterdir()}
