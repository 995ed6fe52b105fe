"""The main job end to end through the real ``medtvt`` console script, on a tiny configuration.

Every command runs in a subprocess (``CUDA_VISIBLE_DEVICES=""``, offline hub), as a user runs it:
``medtvt run`` (PT -> SFT -> RFT -> eval), ``eval``, ``diagnose``, ``ablate``, the one-line errors
of bad input, and ``--resume`` after a real ``SIGKILL`` compared tensor by tensor with an
uninterrupted run of the same seed.

One synthetic cohort (24 patients) and one feature cache are shared by every run (the cache is
keyed by file content and encoder identity, so sharing it changes no result, only the time).
The uninterrupted run of ``full_run`` is reused: by the structure test, by ``eval``/``diagnose``
and as the reference of the resume test (the run directory is not part of any result).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

MEDTVT = Path(sys.executable).with_name("medtvt")
STAGES = ("pt", "sft", "rft")

# The tiny configuration (on top of the demo preset): seconds per stage on 2 CPU cores.
TINY_SETS = [
    "data.synth.n_patients=24",
    "data.rft_holdout=0.3",  # pinned (the preset's is tuned): ~13 SFT records, ~5 RFT prompts
    "encoders.lab.options.variant=tiny",  # the demo's full-width labs MLP is not needed to test the plumbing
    # batch sizes pinned (the demo preset's are being tuned): SFT has 2 batches per epoch, so its 3 steps
    # cross an epoch boundary (a resume must replay the next epoch's shuffle too)
    "pt.epochs=1", "pt.max_steps=3", "pt.save_steps=1", "pt.logging_steps=1", "pt.batch_size=8", "pt.max_length=256",
    "sft.max_steps=3", "sft.save_steps=1", "sft.logging_steps=1", "sft.batch_size=10", "sft.max_length=256",
    "rft.max_steps=2", "rft.num_generations=2", "rft.batch_size=2", "rft.max_completion_length=16",
    "rft.save_steps=1", "rft.logging_steps=1",
    "eval.max_new_tokens=16", "eval.limit=4", "eval.metrics=[bleu,rouge]",
    "llm.options.pretrain_steps=5",
    "rft.eval_steps=0", "rft.metric_for_best_model=null",  # the demo's validation: tested in test_validation.py
    "validation.source=train",  # the demo's rft_prompts would leave ~1 of the ~5 RFT prompts to validate
]


# --------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1",
               # one intra-op thread: the tiny models gain nothing from more, and on shared cores OpenMP's
               # spinning threads made a run 2x slower (every process uses the same count, so results
               # stay comparable bit for bit)
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _show(r: subprocess.CompletedProcess) -> str:
    return (f"\n$ {' '.join(map(str, r.args))}\nrc={r.returncode}\n--- stdout (tail)\n{r.stdout[-3000:]}"
            f"\n--- stderr (tail)\n{r.stderr[-6000:]}")


def medtvt(*args: object, timeout: float = 480) -> subprocess.CompletedProcess:
    """Run the installed console script; ``timeout`` guards against a hang, not a slow machine."""
    return subprocess.run([str(MEDTVT), *map(str, args)], capture_output=True, text=True, env=_env(), timeout=timeout)


def medtvt_all(*commands: tuple[object, ...], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Independent short commands at once (each spends most of its time importing torch)."""
    procs = [subprocess.Popen([str(MEDTVT), *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for c in commands]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, _show(r)
    assert "Traceback" not in r.stderr, _show(r)
    return r


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and exactly one non-empty stderr line ``error: ...`` holding every needle."""
    assert r.returncode == 2, _show(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), _show(r)
    assert "Traceback" not in r.stdout + r.stderr, _show(r)
    for n in needles:
        assert n in lines[0], f"{n!r} not in the error line{_show(r)}"
    return lines[0]


def safetensors_of(d: Path) -> dict[str, Path]:
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*.safetensors"))}


def assert_same_tensors(a: Path, b: Path) -> int:
    """Every safetensors file under ``a`` exists under ``b`` with bit-identical tensors; returns the count."""
    import torch
    from safetensors.torch import load_file

    fa, fb = safetensors_of(a), safetensors_of(b)
    assert fa and sorted(fa) == sorted(fb), (sorted(fa), sorted(fb))
    n = 0
    for rel in fa:
        ta, tb = load_file(str(fa[rel])), load_file(str(fb[rel]))
        assert sorted(ta) == sorted(tb), rel
        diff = [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
        assert not diff, (f"{rel}: {len(diff)}/{len(ta)} tensors differ, e.g. {diff[:3]} (max |diff| "
                          f"{max(float((ta[k].float() - tb[k].float()).abs().max()) for k in diff[:3] if ta[k].shape == tb[k].shape) if diff else 0})")
        n += len(ta)
    return n


def run_then_kill(out: Path, config: Path, marker: str, *extra: str, timeout: float = 420) -> None:
    """Start ``medtvt run`` and SIGKILL it the moment ``out/marker`` exists (for a Trainer checkpoint
    directory that is while it is being written)."""
    log_path = out.parent / f"{out.name}-{marker.replace('/', '_')}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(MEDTVT), "run", "--config", str(config), "--out", str(out), "--quiet", *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=_env())
        t0 = time.monotonic()
        try:
            while not (out / marker).exists() and proc.poll() is None and time.monotonic() - t0 < timeout:
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
    tail = log_path.read_text()[-6000:]
    assert (out / marker).exists(), f"{marker} did not appear (rc={proc.returncode}):\n{tail}"
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (rc={proc.returncode}):\n{tail}"


def ecg_cxr_lab_of(root: Path, split_file: str, index: int = 0) -> tuple[str, str, str, dict]:
    rec = json.loads((root / split_file).read_text())[index]
    return str(root / rec["ECG"][0]), str(root / rec["image"][0]), str(rec["lab"][0]), rec


# --------------------------------------------------------------------------- fixtures
@dataclass
class FinishedRun:
    out: Path
    result: subprocess.CompletedProcess
    metrics: dict  # metrics.json as the run wrote it (tests below rewrite parts of the file)
    predictions: dict  # stage -> eval/<stage>.jsonl text as the run wrote it
    seconds: float


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_config) -> FinishedRun:
    out = tmp_path_factory.mktemp("full") / "run"
    t0 = time.perf_counter()
    r = ok(medtvt("run", "--config", tiny_config, "--out", out, "--quiet"))
    secs = time.perf_counter() - t0
    return FinishedRun(out, r, json.loads((out / "metrics.json").read_text()),
                       {s: (out / "eval" / f"{s}.jsonl").read_text() for s in STAGES}, secs)


# --------------------------------------------------------------------------- medtvt run
def test_run_completes_pt_sft_rft_eval(full_run, tiny_config):
    out, r = full_run.out, full_run.result
    # progress lines of every stage, in order
    log = r.stdout
    pos = [log.index(f"[{s}] training") for s in STAGES] + [log.index("done: ")]
    assert pos == sorted(pos), log[-3000:]
    for s in STAGES:
        assert f"[{s}] F1 " in log

    # the resolved configuration, exactly what --config gave (plus the run directory)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    given = yaml.safe_load(tiny_config.read_text())
    assert saved == {**given, "output_dir": str(out)}

    # per-stage results: a complete saved model + processor; Trainer/GRPO checkpoints beside them
    for s in STAGES:
        final = out / s / "final"
        meta = json.loads((final / "config.json").read_text())
        assert meta["model_type"] == "medtvt" and meta["stage"] == s and meta["weight_references"] == []
        assert (final / "model.safetensors").stat().st_size > 0
        assert json.loads((final / "processor_config.json").read_text())["readers"]["lab"]["stats"]
        assert (final / "tokenizer.json").is_file()
        assert any(p.name.startswith("checkpoint-") for p in (out / s).iterdir()), f"{s}: no checkpoint"
        assert not [p.name for p in (out / s).iterdir() if p.name.startswith(".final")]  # no partial final/
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 1 and env["packages"]["torch"] and "medtvt" in env["plugin_distributions"]
    assert env["deterministic_algorithms"] is False and env["torch_threads"] >= 1
    from safetensors.torch import load_file

    # each stage trained something: the saved weights differ between consecutive stages
    w = {s: load_file(str(out / s / "final" / "model.safetensors")) for s in STAGES}
    for a, b in (("pt", "sft"), ("sft", "rft")):
        common = set(w[a]) & set(w[b])
        assert common and any(not w[a][k].equal(w[b][k]) for k in common), f"{b} did not change {a}'s weights"

    # metrics.json: per stage ce (precision, recall, f1, auc) + nlg (the metrics asked for), and a baseline
    m = json.loads((out / "metrics.json").read_text())
    assert m["seed"] == 0 and m["world_size"] == 1 and list(m["stages"]) == list(STAGES)
    for s in STAGES:
        st = m["stages"][s]
        assert st["n"] == 4  # eval.limit
        for k in ("precision", "recall", "f1"):
            assert 0.0 <= st["ce"][k] <= 1.0, (s, k, st["ce"][k])
        assert st["ce"]["auc"] is not None and 0.0 <= st["ce"]["auc"] <= 1.0
        assert set(st["ce"]["per_category"]) >= {"Hypertension", "Atrial Fibrillation"}
        assert 0.0 <= st["nlg"]["bleu"] <= 1.0 and 0.0 <= st["nlg"]["rouge"] <= 1.0
        assert "meteor" not in st["nlg"] and "bertscore" not in st["nlg"]  # only eval.metrics
        assert set(st["reward"]) == {"format", "jaccard", "total"}
    base = m["baseline"]
    assert base["strategy"] in ("per_category", "most_frequent_set") and base["prediction"]
    assert 0.0 < base["f1"] <= 1.0  # the majority answer of this cohort is right for some test patients
    assert set(m["timings_s"]) >= {"pt", "sft", "rft", "eval_rft", "total"}

    # history.json: loss curves of PT/SFT, reward curve of RFT
    hist = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in hist["pt"] if "loss" in h] == [1, 2, 3]
    assert [h["step"] for h in hist["rft"] if "reward" in h] == [1, 2]

    # report.md: the table and plots, every referenced image exists
    rep = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", rep)
    assert {"loss.png", "rewards.png"} <= set(images), images
    for img in images:
        assert (out / img).stat().st_size > 1000, img
    for s in STAGES:
        assert f"| {s.upper()} | " in rep
    assert "majority baseline" in rep

    # eval/<stage>.jsonl: one generated report per evaluated test record
    test_ids = [r["id"] for r in json.loads((Path(saved["data"]["root"]) / "qa/disease_test.json").read_text())]
    for s in STAGES:
        rows = [json.loads(x) for x in (out / "eval" / f"{s}.jsonl").read_text().splitlines()]
        assert [x["id"] for x in rows] == test_ids[:4]
        for x in rows:
            assert "<answer>" in x["reference"] and isinstance(x["prediction"], str)
            # PT runs without the fusion (no modality weights); SFT/RFT weigh every present modality
            assert (x["weights"] is None) if s == "pt" else (set(x["weights"]) == {"ecg", "cxr", "lab"})


# --------------------------------------------------------------------------- run directory guards
def test_existing_run_dir_needs_resume_and_the_same_config(full_run, tiny_config):
    out = full_run.out
    before = {p: p.stat().st_mtime_ns for p in (out / "config.yaml", out / "metrics.json")}

    again, other = medtvt_all(("run", "--config", tiny_config, "--out", out, "--quiet"),
                              ("run", "--config", tiny_config, "--out", out, "--quiet", "--resume", "--set", "rft.beta=0.1"))
    one_line_error(again, "already holds a run", "--resume")
    one_line_error(other, "--resume", "configuration differs")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # neither touched the run


# --------------------------------------------------------------------------- eval and diagnose
def test_eval_rewrites_the_metrics_of_one_stage(full_run):
    out = full_run.out
    path = out / "metrics.json"
    stale = json.loads(path.read_text())
    stale["stages"]["sft"] = {"ce": {"precision": -1, "recall": -1, "f1": -1, "auc": -1}, "stale": True}
    path.write_text(json.dumps(stale))
    (out / "eval" / "sft.jsonl").unlink()

    r = ok(medtvt("eval", "--run", out, "--stage", "sft", "--quiet"))
    printed = json.loads(r.stdout)  # stdout is the JSON summary alone (model-build logs go to stderr)
    new = json.loads(path.read_text())
    want = full_run.metrics["stages"]["sft"]
    # the SFT checkpoint evaluated again gives what the run measured; the other stages are left alone
    assert "stale" not in new["stages"]["sft"]
    assert new["stages"]["sft"]["ce"] == want["ce"] and new["stages"]["sft"]["nlg"] == want["nlg"]
    for s in ("pt", "rft"):
        assert new["stages"][s] == full_run.metrics["stages"][s]
    assert new["baseline"] == full_run.metrics["baseline"]
    assert (out / "eval" / "sft.jsonl").read_text() == full_run.predictions["sft"]
    assert printed["stage"] == "sft" and printed["f1"] == want["ce"]["f1"]
    assert printed["baseline_f1"] == full_run.metrics["baseline"]["f1"]


def test_diagnose_one_patient_without_labs(full_run, cohort):
    ecg, cxr, _, _ = ecg_cxr_lab_of(cohort, "qa/disease_test.json")
    text, js = medtvt_all(("diagnose", "--run", full_run.out, "--ecg", ecg, "--cxr", cxr, "--samples", "2"),
                          ("diagnose", "--run", full_run.out, "--ecg", ecg, "--cxr", cxr, "--json", "--samples", "0"))
    ok(text)
    ok(js)
    res = json.loads(js.stdout)  # stdout is the JSON alone: nothing the model load logs mixes into it
    assert set(res) >= {"report", "diseases", "modality_weights", "modalities_given", "model"}
    assert res["modalities_given"] == ["ecg", "cxr"] and res["model"].endswith("rft/final")
    assert sorted(res["modality_weights"]) == ["cxr", "ecg"]  # the absent lab is masked, not imputed
    assert all(0.0 <= w <= 1.0 for w in res["modality_weights"].values())
    assert "(lab not available)" in res["question"]
    assert text.stdout.startswith(res["report"]) and "modality weights (CAO gates): " in text.stdout


def test_eval_by_available_modalities_matches_a_split_with_the_modalities_removed(full_run, cohort, tmp_path):
    """``eval.modality_subsets=all-singles`` writes the table (metrics.json, report.md, plot); its ``ecg``
    row equals ``eval --modalities ecg,lab`` of a copy of the test split in which the radiograph and
    the labs are removed the way the product removes them (field dropped, placeholder replaced by
    ``(<m> not available)``): an independent path to the same reports."""
    # the demo preset trains with modality dropout, and the model says so in its config
    meta = json.loads((full_run.out / "rft" / "final" / "config.json").read_text())
    assert set(meta["modality_dropout"]) == {"sft", "rft"} and meta["modality_dropout"]["sft"]["lab"] > 0
    a, c, k = tmp_path / "a", tmp_path / "c", tmp_path / "k"
    for d in (a, c, k):
        shutil.copytree(full_run.out, d, ignore=shutil.ignore_patterns("checkpoint-*"))
    # run c reads a copy of the cohort whose test split lacks CXR and labs (other files linked, not copied)
    root = tmp_path / "data"
    root.mkdir()
    for p in cohort.iterdir():
        if p.name != "qa":
            (root / p.name).symlink_to(p)
    (root / "qa").mkdir()
    for p in (cohort / "qa").iterdir():
        (root / "qa" / p.name).symlink_to(p)
    (root / "qa" / "disease_test.json").unlink()
    recs = json.loads((cohort / "qa" / "disease_test.json").read_text())
    for r in recs:
        del r["image"], r["lab"]
        for ph, name in (("<cxr>", "cxr"), ("<lab>", "lab")):
            assert r["messages"][0]["content"].count(ph) == 1
            r["messages"][0]["content"] = r["messages"][0]["content"].replace(ph, f"({name} not available)")
    (root / "qa" / "disease_test.json").write_text(json.dumps(recs))
    cfg = yaml.safe_load((c / "config.yaml").read_text())
    cfg["data"]["root"] = str(root)
    (c / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    ra, rc, rk = medtvt_all(("eval", "--run", a, "--quiet", "--set", "eval.modality_subsets=all-singles",
                             "--set", "eval.attribution=false"),
                            ("eval", "--run", c, "--quiet", "--modalities", "ecg,lab", "--set", "eval.attribution=false"),
                            ("eval", "--run", k, "--quiet", "--set", "eval.constrained_decoding=true",
                             "--set", "eval.attribution=false"))
    sa, sc = json.loads(ok(ra).stdout), json.loads(ok(rc).stdout)
    # decoded as diagnose decodes (the report grammar): kept apart from the run's own numbers and reports
    ok(rk)
    mk = json.loads((k / "metrics.json").read_text())
    assert mk["stages"]["rft"] == full_run.metrics["stages"]["rft"]
    assert mk["constrained_decoding"]["all"]["rft"]["constrained_decoding"] is True
    assert (k / "eval" / "rft.jsonl").read_text() == (full_run.out / "eval" / "rft.jsonl").read_text()
    assert len((k / "eval" / "rft-constrained.jsonl").read_text().splitlines()) == mk["constrained_decoding"]["all"]["rft"]["n"]
    table = json.loads((a / "metrics.json").read_text())["stages"]["rft"]["subsets"]
    assert table["subsets"] == ["all", "ecg", "cxr", "lab"] and sa["subsets"]["ecg"]["f1"] == table["rows"]["ecg"]["f1"]
    # the full-input row is the run's own evaluation
    assert table["rows"]["all"]["f1"] == full_run.metrics["stages"]["rft"]["ce"]["f1"] == sa["f1"]
    row = table["rows"]["ecg"]
    assert sc["modalities"] == ["ecg", "lab"]  # masked to ECG + labs; the copy has no labs: the ECG alone
    assert row["f1"] == pytest.approx(sc["f1"], abs=1e-12)
    assert row["reward"] == pytest.approx(sc["reward"], abs=1e-12)
    # kept apart from the run's numbers: metrics.json by_modalities and its own predictions file
    mc = json.loads((c / "metrics.json").read_text())
    assert mc["stages"]["rft"] == full_run.metrics["stages"]["rft"] and mc["by_modalities"]["ecg+lab"]["rft"]["n"] == 4
    assert (c / "eval" / "rft-ecg+lab.jsonl").is_file()
    # per disease: F1 with only its evidence modalities (the cohort's manifest) against all of them
    assert table["evidence_source"] == "medtvt_dataset.json evidence"
    assert table["per_disease"]["Atrial Fibrillation"]["evidence"] == ["ecg"]
    assert table["per_disease"]["Atrial Fibrillation"]["f1_evidence_only"] == row["per_disease_f1"]["Atrial Fibrillation"]
    assert table["per_disease"]["Sepsis"]["f1_evidence_only"] is None  # ecg+lab was not asked for
    assert row["evidence_diseases"] == ["Coronary Artery Disease", "Atrial Fibrillation"]
    rep = (a / "report.md").read_text()
    assert "## Evaluation by available modalities" in rep and "| ecg | " in rep
    assert (a / "modality_subsets.png").stat().st_size > 1000


# --------------------------------------------------------------------------- bad input
def test_bad_plugin_names_are_one_line_errors(tmp_path, tiny_config):
    out = tmp_path / "never"
    fusion, modality, split = medtvt_all(
        ("run", "--config", tiny_config, "--fusion", "nope", "--out", out),
        ("run", "--config", tiny_config, "--modalities", "ecg,xray", "--out", out),
        # the variants' data settings differ (another synthetic cohort): no common test split
        ("ablate", "--config", tiny_config, "--grid", "data.synth.seed=0,1", "--out", tmp_path / "abl"))
    one_line_error(fusion, "'nope'", "mpl", "cao")  # names the choices
    one_line_error(modality, "xray")
    one_line_error(split, "--grid", "do not share one test split")
    assert not out.exists() and not list((tmp_path / "abl").glob("*/metrics.json"))


def test_broken_qa_record_is_a_one_line_error(tmp_path, cohort, tiny_config):
    root = tmp_path / "data"
    shutil.copytree(cohort, root)
    qa = root / "qa" / "disease_train.json"
    recs = json.loads(qa.read_text())
    del recs[3]["messages"]
    qa.write_text(json.dumps(recs))
    one_line_error(medtvt("run", "--config", tiny_config, "--out", tmp_path / "run", "--set", f"data.root={root}"),
                   "qa/disease_train.json", "record 3", "messages")
    assert not (tmp_path / "run" / "pt").exists()  # nothing trained


def test_missing_ecg_is_skipped_and_counted(tmp_path, cohort, tiny_config):
    """``data.on_bad_sample=skip``: the record with a missing ECG file is left out, the run completes and
    says how many samples it skipped.  The run (ECG + CXR only) also serves the diagnose check of a
    modality it did not use."""
    root = tmp_path / "data"
    shutil.copytree(cohort, root)
    ecg, _, _, rec = ecg_cxr_lab_of(root, "qa/disease_train.json", index=2)
    Path(ecg + ".dat").unlink()
    out = tmp_path / "run"
    r = ok(medtvt("run", "--config", tiny_config, "--out", out, "--quiet", "--stages", "sft", "--modalities", "ecg,cxr",
                  "--set", f"data.root={root}", "--on-bad-sample", "skip"))
    skipped = [ln for ln in r.stdout.splitlines() if re.match(r"\w+: skipped \d+ bad sample", ln)]
    assert len(skipped) == 1 and skipped[0].startswith("train: skipped 1 bad sample(s): "), _show(r)
    assert rec["id"] in skipped[0] and "does not exist" in skipped[0]
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["stages"]) == ["sft"] and m["stages"]["sft"]["n"] == 4
    assert (out / "sft" / "final" / "model.safetensors").is_file()

    lab_csv = cohort / "labs.csv"
    one_line_error(medtvt("diagnose", "--run", out, "--lab", lab_csv), "--lab", "the model has no lab modality")


# --------------------------------------------------------------------------- ablate
def test_ablate_reuses_the_shared_pt_stage(tmp_path, tiny_config):
    out = tmp_path / "abl"
    r = ok(medtvt("ablate", "--config", tiny_config, "--grid", "fusion=mpl,cao", "--stages", "pt,sft",
                  "--out", out, "--quiet", "--no-bootstrap"))
    store = sorted(p.name.split("-")[0] for p in (out / "stages").iterdir())
    assert store == ["pt", "sft", "sft"], store  # PT trained once, one SFT per fusion
    first, second = r.stdout.split("== variant fusion-cao")
    assert "== variant fusion-mpl" in first and "[pt] training" in first and "[sft] training" in first
    assert "[pt] completed earlier" in second and "[pt] training" not in second
    assert "[sft] training" in second

    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [x["fusion"] for x in rows] == ["mpl", "cao"]
    for x in rows:
        assert 0.0 <= float(x["f1_mean"]) <= 1.0 and 0.0 <= float(x["recall_mean"]) <= 1.0
        assert x["meteor_mean"] == ""  # not computed: an empty cell, never a made-up value
        m = json.loads((out / x["variant"] / "metrics.json").read_text())
        assert list(m["stages"]) == ["pt", "sft"]
        assert abs(float(x["f1_mean"]) - m["stages"]["sft"]["ce"]["f1"]) < 1e-12
    md = (out / "ablation.md").read_text()
    assert "fusion-mpl" in md and "fusion-cao" in md, md
    # eval/diagnose --run on a variant find its models in the shared store (they are not in the variant dir)
    from medtvt_core.run.diagnose import model_dir_of_run

    found = {model_dir_of_run(out / f"fusion-{f}").parent.name for f in ("mpl", "cao")}
    assert len(found) == 2 and all(n.startswith("sft-") for n in found), found
    assert model_dir_of_run(out / "fusion-cao", "pt").parent.parent == (out / "stages").resolve()
    report = (out / "report.md").read_text()
    assert "Table 3" in report and "## What the last stage added" in report
    for f in ("mpl", "cao"):  # without the bootstrap, each variant's line still gives SFT minus PT
        line = next(ln for ln in report.splitlines() if ln.startswith(f"- `fusion-{f}`: "))
        m = json.loads((out / f"fusion-{f}" / "metrics.json").read_text())["stages"]
        want = m["sft"]["ce"]["f1"] - m["pt"]["ce"]["f1"]
        assert "`sft` minus `pt`" in line and f"f1 {want:+.4f}" in line, line
    # stages.md: per variant, the last stage (SFT) against the one before it (PT), each row the
    # stage's own F1 as its metrics.json has it
    stages_md = (out / "stages.md").read_text()
    for f in ("mpl", "cao"):
        m = json.loads((out / f"fusion-{f}" / "metrics.json").read_text())["stages"]
        section = stages_md.split(f"# Stages of `fusion-{f}`")[1].split("# Stages of")[0]
        rows = {ln.split(" | ")[0].strip("| "): ln for ln in section.splitlines() if ln.startswith("| pt") or ln.startswith("| sft")}
        assert set(rows) == {"pt", "sft"}, section
        for st in ("pt", "sft"):
            assert rows[st].split(" | ")[1] == f"{m[st]['ce']['f1']:.4f}", (st, rows[st])


# --------------------------------------------------------------------------- --resume after kill -9
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, full_run, tiny_config):
    """Kill -9 mid-SFT (when checkpoint-2 appears, i.e. while it is being written), resume; kill -9 again
    when RFT's first checkpoint appears, resume to the end.  Same seed, other directory: the result
    must be bit-identical to the uninterrupted ``full_run`` (every tensor of every stage's final/) and
    so must the evaluation."""
    out = tmp_path / "run"
    run_then_kill(out, tiny_config, "sft/checkpoint-2")
    assert (out / "pt" / "final" / "config.json").is_file() and not (out / "sft" / "final").exists()

    run_then_kill(out, tiny_config, "rft/checkpoint-1", "--resume")
    assert (out / "sft" / "final" / "config.json").is_file() and not (out / "rft" / "final").exists()

    r = ok(medtvt("run", "--config", tiny_config, "--out", out, "--quiet", "--resume"))
    assert "[pt] completed earlier" in r.stdout and "[sft] completed earlier" in r.stdout
    assert "[rft] training" in r.stdout

    ref = full_run.out
    n = 0
    for s in STAGES:
        n += assert_same_tensors(ref / s / "final", out / s / "final")
    assert n > 0
    got = json.loads((out / "metrics.json").read_text())
    for s in STAGES:
        assert got["stages"][s]["ce"] == full_run.metrics["stages"][s]["ce"], s
        assert got["stages"][s]["nlg"] == full_run.metrics["stages"][s]["nlg"], s
    for s in STAGES:
        assert (out / "eval" / f"{s}.jsonl").read_text() == full_run.predictions[s]


# --------------------------------------------------------------------------- installing a plugin changes nothing
def test_installing_a_plugin_changes_no_run_that_does_not_use_it(full_run, tiny_config, tmp_path):
    """``full_run`` was trained with the medtvt-notes plugin installed. The same configuration without
    it (its entry point left out) gives bit-identical models and the same vocabulary; and that run,
    made without the plugin, evaluates to its own numbers with the plugin installed again."""
    from medtvt_plugins import BUILTIN_PLUGINS

    env = {**_env(), "MEDTVT_PLUGINS": ",".join(name for name, _ in BUILTIN_PLUGINS)}
    out = tmp_path / "without-notes"
    r = subprocess.run([str(MEDTVT), "run", "--config", str(tiny_config), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=480)
    ok(r)
    listed = json.loads((out / "environment.json").read_text())["plugin_distributions"]
    assert "medtvt-notes" not in listed and "medtvt-notes" in json.loads(
        (full_run.out / "environment.json").read_text())["plugin_distributions"]
    for s in STAGES:
        assert_same_tensors(full_run.out / s / "final", out / s / "final")
        assert (out / s / "final" / "tokenizer.json").read_text() == (full_run.out / s / "final" / "tokenizer.json").read_text()
    mine = json.loads((out / "metrics.json").read_text())
    res = ok(medtvt("eval", "--run", out, "--stage", "sft", "--quiet"))  # the plugin is installed here
    assert json.loads(res.stdout)["f1"] == mine["stages"]["sft"]["ce"]["f1"]


def test_a_grid_may_vary_what_leaves_the_test_split_alone():
    """``ablate --grid`` compares variants on one test split: fields that only divide the training records
    (data.rft_holdout) or name the validation split (data.val_file) may vary, the others may not."""
    from medtvt_core.config import resolve_config
    from medtvt_core.errors import ConfigError
    from medtvt_core.run.ablation import check_one_test_split

    def cfgs(*variants: str) -> list:
        return [resolve_config(preset="demo", sets=[v] if v else []) for v in variants]

    check_one_test_split(cfgs("", "data.rft_holdout=0.3", "data.val_file=qa/other_val.json"))
    for other in ("data.test_file=qa/other_test.json", "data.train_file=qa/other.json", "data.synth.seed=1",
                  "data.synth.val_patients=12"):
        with pytest.raises(ConfigError, match="do not share one test split"):
            check_one_test_split(cfgs("", other))
