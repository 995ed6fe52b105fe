"""The user's journey on the demo preset: ``medtvt run --preset demo``, then ``eval``,
``diagnose``, ``export`` on what it wrote, a model copied away from its run, ``AutoModel``.

Everything the demo preset sets is kept except the lengths of training and the sampled reports per
record (SHORT), so that it fits in CI: the real demo took 6-7 min alone on 2 idle cores, more than
CI's budget leaves beside the rest of the suite. The run is trained without the medtvt-notes plugin
(its entry point left out) and used with it installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_orchestrator import MEDTVT, _env, medtvt, ok, one_line_error

# Training lengths, and 2 sampled reports per record for the sampled reward instead of 8 (the
# evaluation of three stages was half of this file's time, the longest in CI).
# SFT: 6 epochs over the 90 records the preset's rft_holdout 0.5 leaves it, 36 optimizer steps (4 epochs
# gave 24, and left the first test patient's report without an <answer> block).
SHORT = ["pt.epochs=3", "sft.epochs=6", "rft.max_steps=4", "llm.options.pretrain_steps=150",
         "eval.sampled_reward_samples=2"]  # the preset's validation stays on: steps 0 and 4 of RFT


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    import subprocess

    from medtvt_plugins import BUILTIN_PLUGINS

    out = tmp_path_factory.mktemp("journey") / "demo"
    env = {**_env(), "MEDTVT_PLUGINS": ",".join(n for n, _ in BUILTIN_PLUGINS)}  # no medtvt-notes while training
    r = subprocess.run([str(MEDTVT), "run", "--preset", "demo", "--out", str(out), "--quiet",
                        *[a for s in SHORT for a in ("--set", s)]], capture_output=True, text=True, env=env, timeout=1500)
    ok(r)
    return out


def _patient(run: Path, index: int = 0) -> list[str]:
    rec = json.loads((run / "data" / "qa" / "disease_test.json").read_text())[index]
    return ["--ecg", str(run / "data" / rec["ECG"][0]), "--cxr", str(run / "data" / rec["image"][0]),
            "--lab", str(run / "data" / "labs.csv"), "--lab-id", str(rec["lab"][0])]


def test_eval_reproduces_the_runs_numbers(demo):
    saved = json.loads((demo / "metrics.json").read_text())
    before = (demo / "eval" / "sft.jsonl").read_text()
    res = json.loads(ok(medtvt("eval", "--run", demo, "--stage", "sft", "--quiet")).stdout)  # medtvt-notes installed now
    want = saved["stages"]["sft"]
    assert res["f1"] == want["ce"]["f1"] and res["precision"] == want["ce"]["precision"]
    assert res["nlg"] == want["nlg"] and res["reward"] == want["reward"] and res["n"] == 60
    assert (demo / "eval" / "sft.jsonl").read_text() == before
    again = json.loads((demo / "metrics.json").read_text())["stages"]["sft"]
    assert again["by_protocol"]["reference"] == want["by_protocol"]["reference"]


def test_the_demo_validates_rft_on_the_cohorts_validation_patients(demo):
    """The preset's validation (docs: README "Watching a stage"): the cohort's own validation split,
    validated at the stage's first and last step, the curve in report.md, the step kept and its F1 in
    metrics.json; no stage trains on a validation patient."""
    m = json.loads((demo / "metrics.json").read_text())["validation"]["rft"]
    hist = json.loads((demo / "history.json").read_text())["rft"]
    vals = [h for h in hist if "val_f1" in h]
    assert m["steps"] == [h["step"] for h in vals] == [0, 4]
    assert m["chosen"] == {"step": 4, "val_f1": vals[-1]["val_f1"],
                           "why": "no metric_for_best_model: the last step's model is kept"}
    assert m["split"]["source"] == "file" and m["split"]["file"] == "qa/disease_val.json"
    qa = demo / "data" / "qa"
    val = [r["id"] for r in json.loads((qa / "disease_val.json").read_text())]
    assert m["split"]["n_records"] == vals[0]["val_n"] == len(val) == 24
    subjects = {r["id"].split("-")[0] for f in qa.glob("*.json") if f.name != "disease_val.json"
                for r in json.loads(f.read_text())}
    assert len(subjects) == 240 and not subjects & {i.split("-")[0] for i in val}
    assert m["alarm"]["raised"] is not True
    report = (demo / "report.md").read_text()
    assert "## Validation during RFT" in report and "![validation rft](validation_rft.png)" in report
    assert (demo / "validation_rft.png").stat().st_size > 10_000
    assert "`rft/final` is the model of step 4" in report and not (demo / "rft" / "last").exists()


def test_diagnose_one_patient_with_every_modality(demo):
    res = json.loads(ok(medtvt("diagnose", "--run", demo, *_patient(demo), "--json", "--samples", "2")).stdout)
    report = res["report"]
    assert "<answer>" in report and res["constrained"] is True  # the report grammar by default
    # The strict rule restated: a disease set exactly when the report has one <answer>...</answer> block
    # (a malformed report must give null, never a guessed set).
    one_block = report.count("<answer>") == 1 and report.count("</answer>") == 1 \
        and report.index("<answer>") < report.index("</answer>")
    assert (res["diseases"] is not None) == one_block, report
    if one_block:
        inner = report[report.index("<answer>") + 8:report.index("</answer>")].lower()
        assert all(d.lower() in inner for d in res["diseases"]), (report, res["diseases"])
    assert set(res["modality_weights"]) == {"ecg", "cxr", "lab"}
    att = res["attribution"]
    assert set(att["p_named_without"]) == {"ecg", "cxr", "lab"}
    assert all(0.0 <= p <= 1.0 for p in att["p_named"].values())
    # Only the cohort's diseases are attributed; anything else a sampled report names is counted.
    seven = {"Coronary Artery Disease", "Acute Renal Failure", "Hypertension", "Atrial Fibrillation", "Pneumonia",
             "Diabetes Mellitus", "Sepsis"}  # docs/method.md's disease list ("Diseases"), restated
    assert set(att["p_named"]) <= seven, att["p_named"]
    assert isinstance(att["other_names"], int) and 0 <= att["other_names"] <= 2 * 4
    text = ok(medtvt("diagnose", "--run", demo, *_patient(demo), "--samples", "0")).stdout
    assert text.startswith(res["report"]) and "diseases: " in text and "modality weights (CAO gates): " in text


def test_constrained_decoding_makes_partial_patients_reports_well_formed_and_changes_no_well_formed_one(
        demo, one_torch_thread):
    """``diagnose``'s report grammar (model.generation.REPORT_GRAMMAR) on the trained model, 24 test patients
    with ECG + labs only (the radiograph absent as diagnose presents it): every constrained greedy report
    obeys the rule (restated) unless it used every new token, and every report the model writes
    well-formed unconstrained comes out token for token the same."""
    import re

    from medtvt_core.data.dataset import open_splits
    from medtvt_core.model.generation import generate_reports
    from medtvt_core.run.diagnose import load_model_dir

    # the grammar's rule restated: grpo_train.py's format regex after up to 4 whitespace characters, each
    # block free of the four tags (a '<' in a block not before '/', 't', 'a' or '<')
    block = r"(?:[^<]|<[^/ta<])*"
    rule = re.compile(rf"[ \t\r\n]{{0,4}}<think>{block}</think>[ \t\r\n]{{0,4}}<answer>{block}</answer>", re.S)
    model, proc = load_model_dir(demo / "rft" / "final")
    test = open_splits(demo / "data", modalities=proc.readers, test_file="qa/disease_test.json", fit_stats=False,
                       persist_stats=False)["test"].masked(withheld=["cxr"])
    batch = test.collator()([test[i] for i in range(24)])
    assert not batch["modality_mask"][:, model.modalities.index("cxr")].any()
    assert all("(cxr not available)" in p for p in batch["prompts"])
    free = generate_reports(model, proc, batch, max_new_tokens=192)
    held = generate_reports(model, proc, batch, max_new_tokens=192, constrain=True)
    stops = set(proc.stop_token_ids)

    def tokens(row: torch.Tensor) -> list[int]:  # up to and including the first stop token
        ids = row.tolist()
        return ids[:next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))]

    malformed = 0
    for i, (a, b) in enumerate(zip(free.texts, held.texts)):
        if rule.fullmatch(a):
            assert b == a and tokens(free.completion_ids[i]) == tokens(held.completion_ids[i]), (a, b)
        else:
            malformed += 1
        assert rule.fullmatch(b) or len(tokens(held.completion_ids[i])) == 192, b
    assert sum(bool(rule.fullmatch(b)) for b in held.texts) >= 20, (malformed, held.texts)


def test_a_model_copied_away_from_its_deleted_run_still_works(demo, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(demo / "rft" / "final", copy)
    args = _patient(demo, 1)
    inputs = tmp_path / "inputs"  # the patient's files, copied out before the run goes away
    inputs.mkdir()
    moved = []
    for flag in ("--ecg", "--cxr", "--lab"):
        src = Path(args[args.index(flag) + 1])
        for f in src.parent.glob(src.name + "*") if flag == "--ecg" else [src]:
            shutil.copy(f, inputs / f.name)
        moved.append((flag, str(inputs / src.name)))
    away = demo.with_name("demo-deleted")
    demo.rename(away)  # the run directory is gone
    try:
        new = [x for flag, path in moved for x in (flag, path)] + ["--lab-id", args[args.index("--lab-id") + 1]]
        res = json.loads(ok(medtvt("diagnose", "--model", copy, *new, "--json", "--samples", "0")).stdout)
        assert "<answer>" in res["report"] and res["model"] == str(copy)
    finally:
        away.rename(demo)


def test_export_with_merged_lora_gives_the_same_greedy_reports(demo, tmp_path):
    from medtvt_core.run.diagnose import load_model_dir

    plain, merged = tmp_path / "plain", tmp_path / "merged"
    ok(medtvt("export", "--run", demo, "--stage", "rft", "--out", plain))
    ok(medtvt("export", "--run", demo, "--stage", "rft", "--out", merged, "--merge-lora"))
    card = (merged / "README.md").read_text()
    assert "not a medical device" in card and "synthetic" in card and "F1" in card and "LoRA merged" in card
    m = json.loads((demo / "metrics.json").read_text())["stages"]["rft"]["ce"]["f1"]
    assert f"{m:.4f}" in card
    one_line_error(medtvt("export", "--run", demo, "--stage", "rft", "--out", merged), "--out", "not empty")

    a, pa = load_model_dir(plain)
    b, _ = load_model_dir(merged)
    assert json.loads((merged / "config.json").read_text())["lora_merged"]
    assert not any("lora_" in n for n, _ in b.named_parameters()) and any("lora_" in n for n, _ in a.named_parameters())
    from medtvt_core.data.dataset import open_splits

    test = open_splits(demo / "data", modalities=pa.readers, test_file="qa/disease_test.json", fit_stats=False,
                       persist_stats=False)["test"]
    batch = test.collator()([test[i] for i in range(8)])
    feats = pa.generation_features(batch["prompts"])
    kw = dict(modality_mask=batch["modality_mask"], modality_inputs=batch["modality_inputs"],
              modality_features=batch["modality_features"], max_new_tokens=192,
              eos_token_id=pa.stop_token_ids, pad_token_id=pa.pad_token_id)
    with torch.no_grad():
        ga = a.generate(feats["input_ids"], feats["attention_mask"], **kw)
        gb = b.generate(feats["input_ids"], feats["attention_mask"], **kw)
    assert torch.equal(ga, gb)
    assert sum("<answer>" in t for t in pa.decode(ga)) >= 4  # a trained model: the comparison means something


def test_the_readmes_python_gives_diagnoses_report(demo, one_torch_thread):
    """README's Python block, run as written (its run directory and image swapped for this run's): the
    report it prints is ``medtvt diagnose``'s for the same radiograph."""
    import contextlib
    import io
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "read_patient" in b)
    image = str(demo / "data" / json.loads((demo / "data" / "qa" / "disease_test.json").read_text())[0]["image"][0])
    code = code.replace('"runs/demo/', f'"{demo}/').replace('"image.jpg"', repr(image))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    cli = json.loads(ok(medtvt("diagnose", "--model", demo / "rft" / "final", "--cxr", image, "--samples", "0",
                               "--json")).stdout)
    assert printed.getvalue() == cli["report"] + "\n" and cli["modalities_given"] == ["cxr"]


def test_automodel_and_bad_model_directories(demo, tmp_path):
    import medtvt_core  # noqa: F401  (registers the medtvt model type)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(demo / "sft" / "final")
    assert type(model).__name__ == "MedTVTForConditionalGeneration" and model.config.stage == "sft"
    one_line_error(medtvt("diagnose", "--model", tmp_path, "--cxr", "x.jpg"), "no config.json", "not a saved medtvt model")
    bad = tmp_path / "newer"
    shutil.copytree(demo / "sft" / "final", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "medtvt_format_version": 99}))
    one_line_error(medtvt("eval", "--model", bad, "--data", demo / "data"), "format version 99")
    (bad / "config.json").write_text(json.dumps({**cfg, "fusion": {"name": "not-installed", "options": {}}}))
    one_line_error(medtvt("eval", "--model", bad, "--data", demo / "data"), "unknown fusion plugin 'not-installed'")


def test_demo_learns_benchmark_reads_the_run(demo):
    """benchmarks/demo_learns.py (the learning bars at real settings, outside CI) on this run: its row
    is metrics.json's numbers and each bar is judged from them."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "demo_learns.py"), "--from", str(demo)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads((demo / "metrics.json").read_text())
    base, sft, rft = m["baseline"]["f1"], m["stages"]["sft"]["ce"]["f1"], m["stages"]["rft"]["ce"]["f1"]
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("| 0 |"))
    assert row.startswith(f"| 0 | {base:.4f} | {sft:.4f} | {rft:.4f} |"), r.stdout
    met = sft >= base + 0.15
    assert ("- SFT F1 >= baseline + 0.15: met on every seed" in r.stdout) == met, r.stdout
    assert "- no reward-hacking alarm: met on every seed" in r.stdout
