"""The user's journey on the demo preset at its real settings: ``medtvt run --preset demo``, then
``eval``, ``diagnose``, ``export`` on what it wrote, a model copied away from its run, ``AutoModel``;
and the demo learns as README promises (SFT F1 well above the majority baseline, RFT's held-out
reward at least SFT's).

Nothing the demo preset sets is changed (240 patients, 30 PT epochs, 20 SFT epochs, 240 RFT steps,
300 base pretraining steps, evaluation on all 60 test records with 8 sampled reports each): one
training run, the longest of the suite, shared by every test here (its file starts first, see
conftest). The run is trained without the medtvt-notes plugin (its entry point left out) and used
with it installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_orchestrator import MEDTVT, _env, medtvt, ok, one_line_error

# The real demo trains in the first test's setup: above the suite's 600 s per test (pyproject) on CI's cores.
pytestmark = pytest.mark.timeout(1800)

@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    import subprocess

    from medtvt_plugins import BUILTIN_PLUGINS

    out = tmp_path_factory.mktemp("journey") / "demo"
    env = {**_env(), "MEDTVT_PLUGINS": ",".join(n for n, _ in BUILTIN_PLUGINS)}  # no medtvt-notes while training
    r = subprocess.run([str(MEDTVT), "run", "--preset", "demo", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=1800)
    ok(r)
    return out


def test_the_demo_learns_as_the_readme_promises(demo):
    """SFT F1 (strict protocol, 60 test records) at least the stronger majority-class baseline + 0.15,
    and RFT's greedy reward on the held-out test records at least SFT's (docs/results.md: +0.013 to
    +0.059 over seeds 0, 1, 2; seed 0 here)."""
    # Measured once (one thread, seed 0, this code): baseline 0.4306, SFT F1 0.5773 (bar 0.5806: short
    # by 0.003), RFT F1 0.6538; greedy reward SFT 1.4669 -> RFT 1.5381. The bar is the issue's; the
    # demo preset, not this test, has to meet it.
    m = json.loads((demo / "metrics.json").read_text())
    sft, rft, base = m["stages"]["sft"], m["stages"]["rft"], m["baseline"]
    assert sft["protocol"] == "strict" and sft["n"] == 60
    assert sft["ce"]["f1"] >= base["f1"] + 0.15, (sft["ce"]["f1"], base)
    assert rft["reward"]["total"] >= sft["reward"]["total"], (sft["reward"], rft["reward"])
    # the held-out records are the test split, never trained on (RFT's prompts are training records)
    train = {r["id"] for r in json.loads((demo / "data" / "qa" / "disease_train.json").read_text())}
    tested = {json.loads(line)["id"] for line in (demo / "eval" / "rft.jsonl").read_text().splitlines()}
    assert len(tested) == 60 and not tested & train


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


def test_diagnose_one_patient_with_every_modality(demo):
    res = json.loads(ok(medtvt("diagnose", "--run", demo, *_patient(demo), "--json", "--samples", "2")).stdout)
    report = res["report"]
    assert "<answer>" in report
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
             "Diabetes Mellitus", "Sepsis"}  # SPEC's disease list, restated
    assert set(att["p_named"]) <= seven, att["p_named"]
    assert isinstance(att["other_names"], int) and 0 <= att["other_names"] <= 2 * 4
    text = ok(medtvt("diagnose", "--run", demo, *_patient(demo), "--samples", "0")).stdout
    assert text.startswith(res["report"]) and "diseases: " in text and "modality weights (CAO gates): " in text


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
