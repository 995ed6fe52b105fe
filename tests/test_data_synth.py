"""Synthetic cohort: real formats, determinism, learnable signal; ``medtvt data synth|check``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb
from click.testing import CliRunner
from PIL import Image
from scipy.signal import find_peaks
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medtvt_cli.data import data_group
from medtvt_core.data import DISEASES, parse_answer, read_manifest, read_qa_file
from medtvt_core.data.formats import MIMIC_IV_ECG_LEADS, SYMILE_CHEXPERT, SYMILE_LABS
from medtvt_core.data.synth import PT_FILES, TEST_FILE, TRAIN_FILE, synthesize
from medtvt_plugins.readers.cxr import CxrModality
from medtvt_plugins.readers.ecg import EcgModality
from medtvt_plugins.readers.lab import LabModality

MODS = [EcgModality, CxrModality, LabModality]
FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "a"
    synthesize(root, n_patients=8, seed=1, test_fraction=0.25, workers=1)
    return root


def test_deterministic_per_seed_whatever_the_worker_count(small, tmp_path):
    synthesize(tmp_path / "b", n_patients=8, seed=1, test_fraction=0.25, workers=2)
    synthesize(tmp_path / "c", n_patients=8, seed=2, test_fraction=0.25, workers=1)
    a, b, c = digest(small), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b
    assert a != c and len(a) == len(c) == 8 * 3 + 1 + 5 + 1  # ecg .hea+.dat, jpg; csv; 5 QA; manifest


def test_files_are_in_the_real_formats(small):
    recs, problems = read_qa_file(small / TRAIN_FILE, MODS)
    assert not problems and len(recs) == 6
    for r in recs:
        ecg, img = r.ref("ECG"), r.ref("image")
        assert re.fullmatch(r"mimic-iv-ecg/files/p\d{4}/p\d{8}/s4\d{7}/4\d{7}", ecg)
        assert re.fullmatch(r"mimic-cxr-jpg/files/p\d{2}/p\d{8}/s5\d{7}/[0-9a-f]{8}(-[0-9a-f]{8}){4}\.jpg", img)
        h = wfdb.rdheader(str(small / ecg))
        assert (h.fs, h.sig_len, h.sig_name, h.units[0], h.fmt[0]) == (500, 5000, list(MIMIC_IV_ECG_LEADS), "mV", "16")
        with Image.open(small / img) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "L", (416, 448))
        assert FORMAT.match(r.answer)
        labels = parse_answer(r.answer)
        assert labels and set(labels) <= set(DISEASES)
        assert all(ph in r.question for ph in ("<ecg>", "<cxr>", "<lab>"))
    df = pd.read_csv(small / "labs.csv")
    assert list(df.columns[:4]) == ["subject_id", "hadm_id", "cxr_path", "ecg_path"]
    assert set(SYMILE_CHEXPERT) <= set(df.columns)
    assert {c for c in df.columns if c[0].isdigit()} == set(SYMILE_LABS) | {f"{k}_percentile" for k in SYMILE_LABS}
    assert df["cxr_path"].str.match(r"files/p\d{2}/p\d{8}/s\d{8}/.+\.jpg").all()


def test_splits_and_pt_files(small):
    man = read_manifest(small)
    train, test = set(man["splits"]["train"]), set(man["splits"]["test"])
    assert len(train) == 6 and len(test) == 2 and not train & test
    assert man["qa"] == {"pt": list(PT_FILES), "train": TRAIN_FILE, "test": TEST_FILE}
    subject = lambda r: int(r.id.split("-")[0])  # noqa: E731
    assert {subject(r) for r in read_qa_file(small / TEST_FILE, MODS)[0]} == test
    for f, field, words in zip(PT_FILES, ("ECG", "image", "lab"), (("bpm", "axis", "RR"), ("cardiothoracic",), ("measured",))):
        recs = read_qa_file(small / f, MODS)[0]
        assert {subject(r) for r in recs} == train
        assert all(r.ref(field) and sum(r.ref(x) is not None for x in ("ECG", "image", "lab")) == 1 for r in recs)
        assert all(w in r.answer for r in recs for w in words) and all("<answer>" not in r.answer for r in recs)
    assert "stats" not in man  # reader statistics are fitted (and stored here) when a run opens the splits


def test_synth_command(tmp_path):
    run = CliRunner().invoke(data_group, ["synth", "--out", str(tmp_path / "d"), "--n-patients", "6", "--seed", "3"])
    assert run.exit_code == 0, run.output
    assert "wrote 6 patients" in run.output and "prevalence:" in run.output
    again = CliRunner().invoke(data_group, ["synth", "--out", str(tmp_path / "d"), "--n-patients", "6"])
    assert again.exit_code == 2 and "exists and is not empty; pass --overwrite" in again.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refuse = CliRunner().invoke(data_group, ["synth", "--out", str(tmp_path / "mine"), "--n-patients", "6", "--overwrite"])
    assert refuse.exit_code == 2 and "refusing to delete" in refuse.output and (tmp_path / "mine" / "notes.txt").exists()


def test_check_command(small, tmp_path):
    ok = CliRunner().invoke(data_group, ["check", "--root", str(small)])
    assert ok.exit_code == 0 and "checked 5 QA file(s), 26 record(s), 24 input(s)" in ok.output and "OK" in ok.output
    root = tmp_path / "bad"
    shutil.copytree(small, root)
    recs = json.loads((root / TRAIN_FILE).read_text())
    recs[0]["messages"][1]["content"] = recs[0]["messages"][1]["content"].replace("</answer>", "; Influenza </answer>")
    recs[1]["image"] = ["mimic-cxr-jpg/files/p00/none.jpg"]
    jpg = root / recs[2]["image"][0]
    jpg.write_bytes(jpg.read_bytes()[:3000])
    rec = root / recs[3]["ECG"][0]
    sig, fields = wfdb.rdsamp(str(rec))
    sig[50:60, 2] = np.nan
    wfdb.wrsamp(rec.name, fs=500, units=["mV"] * 12, sig_name=fields["sig_name"], p_signal=sig, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(rec.parent))
    (root / TRAIN_FILE).write_text(json.dumps(recs))
    bad = CliRunner().invoke(data_group, ["check", "--root", str(root)])
    lines = [ln for ln in bad.output.splitlines() if ln.startswith("BAD ")]
    assert bad.exit_code == 2 and len(lines) == 4, bad.output
    text = "\n".join(lines)
    assert "unknown disease label(s) 'Influenza'" in text and "does not exist" in text
    assert "unreadable image" in text and "10 NaN sample(s) in lead(s) III" in text
    assert "4 problem(s)" in bad.output.splitlines()[-1]
    fixed = CliRunner().invoke(data_group, ["check", "--root", str(root), "--qa", PT_FILES[0], "--option", "ecg.nan_policy=interpolate"])
    assert fixed.exit_code == 0, fixed.output
    wrong = CliRunner().invoke(data_group, ["check", "--root", str(root), "--option", "ecg.nan_policy"])
    assert wrong.exit_code == 2 and "expected MODALITY.KEY=VALUE" in wrong.output


# ---------------------------------------------------------------------------- learnable signal
def cv_auc(x: np.ndarray, y: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    p = cross_val_predict(model, x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    return roc_auc_score(y, p)


def ecg_features(x: np.ndarray) -> list[float]:
    """RR irregularity (V5 R peaks), QRS voltage (R V5 - S V1), ST level after the R peak in V5."""
    v5, v1 = x[10], x[6]
    peaks, _ = find_peaks(v5, height=0.5 * v5.max(), distance=30)
    rr = np.diff(peaks)
    st = np.mean([v5[p + 8:p + 18].mean() - v5[p - 8:p - 4].mean() for p in peaks if 8 < p < 980])
    return [rr.std() / rr.mean(), v5.max() - v1.min(), -st]


def test_signal_is_learnable_and_modality_specific(tmp_path):
    root = tmp_path / "cohort"
    synthesize(root, n_patients=80, seed=11)
    recs = read_qa_file(root / TRAIN_FILE, MODS)[0] + read_qa_file(root / TEST_FILE, MODS)[0]
    y = {d: np.array([d in parse_answer(r.answer) for r in recs]) for d in DISEASES}
    lab = LabModality()
    lab.fit([r.ref("lab") for r in read_qa_file(root / TRAIN_FILE, MODS)[0]], root)
    labs = torch.stack([lab.load(r.ref("lab"), root=root) for r in recs]).numpy()
    ecg = np.array([ecg_features(EcgModality().load(r.ref("ECG"), root=root).numpy()) for r in recs])
    cxr = torch.stack([CxrModality().load(r.ref("image"), root=root) for r in recs])
    pixels = torch.nn.functional.adaptive_avg_pool2d(cxr[:, :1], 16).flatten(1).numpy()

    auc = {f"lab:{d}": cv_auc(labs, y[d]) for d in ("Diabetes Mellitus", "Acute Renal Failure", "Sepsis")}
    auc.update({f"ecg:{d}": roc_auc_score(y[d], ecg[:, j])
                for j, d in enumerate(("Atrial Fibrillation", "Hypertension", "Coronary Artery Disease"))})
    auc.update({f"cxr:{d}": cv_auc(pixels, y[d]) for d in ("Pneumonia", "Hypertension")})
    assert all(v >= 0.85 for v in auc.values()), auc
    # Atrial fibrillation leaves nothing in the labs, diabetes nothing in ECG or image beyond co-occurrence.
    assert cv_auc(labs, y["Atrial Fibrillation"]) < 0.8
    assert cv_auc(np.concatenate([ecg, pixels], axis=1), y["Diabetes Mellitus"]) < 0.8
    assert all(any(r) for r in zip(*y.values()))  # every patient has at least one category
