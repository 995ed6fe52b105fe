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
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from medtvt_cli.data import data_group
from medtvt_core.data import DISEASES, parse_answer, read_manifest, read_qa_file
from medtvt_core.data.formats import MIMIC_IV_ECG_LEADS, SYMILE_CHEXPERT, SYMILE_LABS
from medtvt_core.data.synth import LAB_IDS, PT_FILES, TEST_FILE, TRAIN_FILE, ensure_synthetic, make_patients, synthesize
from medtvt_plugins.readers.cxr import CxrModality
from medtvt_plugins.readers.ecg import EcgModality
from medtvt_plugins.readers.lab import LabModality

MODS = [EcgModality, CxrModality, LabModality]
FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# ---------------------------------------------------------------------------- generator options
# Digest of the WFDB, CSV and QA files of the `small` cohort as written by the generator before the
# evidence/joint/decoy options existed (JPEG bytes and the manifest left out: the encoder's bytes may
# vary across Pillow builds, and the manifest gained the option and evidence blocks).
DEFAULT_COHORT_DIGEST = "ac247887e7a73e57fc5512d44496920fc0acf2b56f3d34e14a1521d4c1ce3f50"


def data_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix != ".jpg" and p.name != "medtvt_dataset.json":
            h.update(str(p.relative_to(root)).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def test_default_options_write_the_original_cohort(small, tmp_path):
    assert data_digest(small) == DEFAULT_COHORT_DIGEST
    synthesize(tmp_path / "x", n_patients=8, seed=1, test_fraction=0.25, workers=1, evidence=1.0, joint_diseases="none")
    assert digest(tmp_path / "x") == digest(small)
    man = read_manifest(small)
    assert man["generator"] == {"version": 2, "n_patients": 8, "seed": 1, "test_fraction": 0.25, "evidence": 1.0,
                                "joint_diseases": [], "decoy_rate": 0.3}
    ev = man["evidence"]
    assert {d: ev[d]["modalities"] for d in DISEASES} == {
        "Coronary Artery Disease": ["ecg"], "Acute Renal Failure": ["lab"], "Hypertension": ["ecg", "cxr"],
        "Atrial Fibrillation": ["ecg"], "Pneumonia": ["cxr", "lab"], "Diabetes Mellitus": ["lab"], "Sepsis": ["ecg", "lab"]}
    assert not any(ev[d]["joint"] for d in DISEASES) and man["decoys"] == {}
    assert all(set(ev[d]["signs"]) == set(ev[d]["modalities"]) for d in DISEASES)


def measured_signs(root: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list]:
    """One hand-measured feature per sign, read back through the real readers (no generator internals)."""
    train = read_qa_file(root / TRAIN_FILE, MODS)[0]
    recs = train + read_qa_file(root / TEST_FILE, MODS)[0]
    y = {d: np.array([d in parse_answer(r.answer) for r in recs]) for d in DISEASES}
    lab = LabModality()
    lab.fit([r.ref("lab") for r in train], root)
    labs = torch.stack([lab.load(r.ref("lab"), root=root) for r in recs]).numpy()
    n = len(LAB_IDS)

    def pct(item: str) -> np.ndarray:  # percentile where measured, 0 where not (the vector's flag half)
        j = LAB_IDS.index(item)
        return np.where(labs[:, n + j] > 0, labs[:, j], 0.0)

    ecg, cxr = EcgModality(), CxrModality()
    hr, sokolow, heart, opacity = [], [], [], []
    for r in recs:
        x = ecg.load(r.ref("ECG"), root=root).numpy()  # [12, 1000] at 100 Hz
        v5, v1 = x[10], x[6]
        peaks, _ = find_peaks(v5, height=0.5 * v5.max(), distance=30)
        hr.append(6000.0 / np.diff(peaks).mean())  # beats per minute from the R-R intervals
        sokolow.append(v5.max() - v1.min())  # R in V5 + |S| in V1
        img = cxr.load(r.ref("image"), root=root)[0].numpy()  # [224, 224], normalised
        heart.append(float((img[170:192].mean(0) > -0.3).sum()))  # width of the bright shadow across the heart
        opacity.append(max(img[v - 10:v + 10, u - 10:u + 10].mean()  # brightest of six lung windows
                           for v in (39, 82, 121) for u in (44, 180)))
    feats = {"hr": np.array(hr), "lactate": pct("50813"), "sokolow": np.array(sokolow), "heart": np.array(heart),
             "opacity": np.array(opacity), "wbc": pct("51301")}
    return feats, y, recs


SIGN_PAIRS = {"Sepsis": ("hr", "lactate"), "Hypertension": ("sokolow", "heart"), "Pneumonia": ("opacity", "wbc")}


def test_joint_diseases_need_both_modalities(tmp_path):
    """Joint cohort (150 patients, seed 5, decoy rate 0.3): for each joint disease, even the best ranking
    by one modality's sign (the raw feature's AUC, no fitting) stays below 0.95 and at least 0.05 under a
    cross-validated logistic regression (with the interaction term) on both signs, which reaches 0.97.
    Measured: Sepsis hr 0.63 / lactate 0.91 / both 0.995; Hypertension 0.82 / 0.82 / 1.0;
    Pneumonia opacity 0.90 / white cells 0.75 / 1.0 (seeds 0-11: best single 0.82-0.94, both >= 0.986)."""
    root = tmp_path / "joint"
    s = synthesize(root, n_patients=150, seed=5, joint_diseases="all", workers=1)
    feats, y, recs = measured_signs(root)
    auc = {}
    for d, (a, b) in SIGN_PAIRS.items():
        model = make_pipeline(StandardScaler(), PolynomialFeatures(2, interaction_only=True),
                              LogisticRegression(max_iter=5000))
        x = np.stack([feats[a], feats[b]], axis=1)
        p = cross_val_predict(model, x, y[d], cv=StratifiedKFold(4, shuffle=True, random_state=0), method="predict_proba")
        auc[d] = {a: roc_auc_score(y[d], feats[a]), b: roc_auc_score(y[d], feats[b]), "both": roc_auc_score(y[d], p[:, 1])}
    for r in auc.values():
        best_single = max(v for k, v in r.items() if k != "both")
        assert r["both"] >= 0.97 and best_single <= 0.95 and best_single <= r["both"] - 0.05, auc

    man = read_manifest(root)
    assert man["generator"]["joint_diseases"] == ["Hypertension", "Pneumonia", "Sepsis"]
    assert {d for d in DISEASES if man["evidence"][d]["joint"]} == set(SIGN_PAIRS)
    assert man["decoys"] == s.decoys and all(n >= 10 for by in s.decoys.values() for n in by.values()), s.decoys
    # Disease sets (so prevalences) do not depend on the options: those the seed draws for every cohort.
    drawn = make_patients(150, 5, 0.2)
    assert man["prevalence"]["all"] == {d: sum(d in p.diseases for p in drawn) for d in DISEASES}
    # The reasoning stays truthful: a sign that "does not mean" a disease never comes with that disease.
    for r in recs:
        labels = set(parse_answer(r.answer))
        for d in SIGN_PAIRS:
            if f"does not mean {d.lower()}" in r.answer or f"do not mean {d.lower()}" in r.answer:
                assert d not in labels, r.answer
    said = sum(f"not mean {d.lower()}" in r.answer for r in recs for d in SIGN_PAIRS)
    assert said >= 0.8 * sum(s.decoys[d][m] for d in SIGN_PAIRS for m in s.decoys[d])
    for f in PT_FILES:  # the decoys' other causes are in the physiological reports
        assert any("The history attributes" in r.answer for r in read_qa_file(root / f, MODS)[0])


def test_evidence_strength_scales_the_signs(tmp_path):
    weak, strong = tmp_path / "weak", tmp_path / "strong"
    synthesize(weak, n_patients=30, seed=4, evidence=0.4, workers=1)
    synthesize(strong, n_patients=30, seed=4, evidence=2.0, workers=1)
    fw, yw, rw = measured_signs(weak)
    fs, ys, _ = measured_signs(strong)
    assert all((yw[d] == ys[d]).all() for d in DISEASES)  # same patients, same diseases
    htn = yw["Hypertension"]
    base = np.median(fw["sokolow"][~htn])
    assert np.median(fs["sokolow"][htn]) - base > 3 * (np.median(fw["sokolow"][htn]) - base) > 0
    assert np.median(fs["heart"][htn]) > np.median(fw["heart"][htn]) > np.median(fw["heart"][~htn])
    assert any("weak signs (" in r.answer for r in rw)  # what falls below threshold is reasoned about as weak
    assert all(FORMAT.match(r.answer) for r in rw)
    assert read_manifest(weak)["generator"]["evidence"] == 0.4


def test_ensure_synthetic_reuses_only_a_cohort_with_the_same_options(tmp_path):
    root = tmp_path / "c"
    ensure_synthetic(root, n_patients=8, seed=2, workers=1, joint_diseases=("Sepsis",))
    stamp = (root / "labs.csv").stat().st_mtime_ns
    ensure_synthetic(root, n_patients=8, seed=2, workers=1, joint_diseases="sepsis")
    assert (root / "labs.csv").stat().st_mtime_ns == stamp  # same options (spelled differently): reused
    ensure_synthetic(root, n_patients=8, seed=2, workers=1, joint_diseases=("Sepsis",), decoy_rate=0.4)
    assert read_manifest(root)["generator"]["decoy_rate"] == 0.4
    # A cohort written before the options existed (its manifest lacks them) is regenerated: same files.
    ensure_synthetic(root, n_patients=8, seed=2, workers=1)
    before = digest(root)
    man = json.loads((root / "medtvt_dataset.json").read_text())
    for k in ("evidence", "joint_diseases", "decoy_rate"):
        man["generator"].pop(k)
    (root / "medtvt_dataset.json").write_text(json.dumps(man))
    ensure_synthetic(root, n_patients=8, seed=2, workers=1)
    assert digest(root) == before
    with pytest.raises(Exception, match="joint disease 'Diabetes Mellitus'"):
        ensure_synthetic(root, n_patients=8, seed=2, joint_diseases=("Diabetes Mellitus",))
    with pytest.raises(Exception, match="evidence 0"):
        synthesize(tmp_path / "e", n_patients=8, evidence=0)


def test_synth_command_options(tmp_path):
    run = CliRunner().invoke(data_group, ["synth", "--out", str(tmp_path / "j"), "--n-patients", "12", "--seed", "3",
                                          "--joint-diseases", "htn,Sepsis", "--decoy-rate", "0.5", "--evidence", "1.5"])
    assert run.exit_code == 0, run.output
    assert "joint diseases with decoy signs: Hypertension (ecg " in run.output
    gen = read_manifest(tmp_path / "j")["generator"]
    assert (gen["joint_diseases"], gen["decoy_rate"], gen["evidence"]) == (["Hypertension", "Sepsis"], 0.5, 1.5)
    for bad, words in ((["--evidence", "0"], "--evidence"), (["--evidence", "2.5"], "--evidence"),
                       (["--decoy-rate", "0.6"], "--decoy-rate"), (["--joint-diseases", "Diabetes"], "joint disease 'Diabetes'")):
        r = CliRunner().invoke(data_group, ["synth", "--out", str(tmp_path / "bad"), "--n-patients", "6", *bad])
        assert r.exit_code == 2 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "bad").exists()
    from medtvt_core.data import synth

    opts = {p.name: p for p in data_group.commands["synth"].params}
    assert (opts["evidence"].type.max, opts["decoy_rate"].default) == (synth.MAX_EVIDENCE, synth.DEFAULT_DECOY_RATE)


def test_validation_patients_leave_the_other_splits_unchanged(small, tmp_path):
    """``val_patients`` adds a validation split (``qa/disease_val.json``) after the others: every file
    of the cohort without it is byte-identical (labs.csv: its rows, percentiles fitted on train only),
    the new patients' ids are new, and none of them has PT records."""
    root = tmp_path / "v"
    run = CliRunner().invoke(data_group, ["synth", "--out", str(root), "--n-patients", "8", "--seed", "1",
                                          "--test-fraction", "0.25", "--val-patients", "5", "--workers", "1"])
    assert run.exit_code == 0, run.output
    assert "wrote 13 patients (6 train, 2 test, 5 validation)" in run.output
    a, b = digest(small), digest(root)
    changed = {k for k in a if a[k] != b.get(k)}
    assert changed == {"labs.csv", "medtvt_dataset.json"}
    assert len(b) - len(a) == 5 * 3 + 1  # 5 ECG (.hea, .dat) and radiographs, the validation QA file
    old, new = pd.read_csv(small / "labs.csv"), pd.read_csv(root / "labs.csv")
    pd.testing.assert_frame_equal(new.iloc[:len(old)], old)
    man, man0 = read_manifest(root), read_manifest(small)
    assert man["qa"] == {**man0["qa"], "val": "qa/disease_val.json"}
    assert man["generator"] == {**man0["generator"], "val_patients": 5}
    assert {k: man["splits"][k] for k in ("train", "test")} == man0["splits"]
    val = man["splits"]["val"]
    ids = set(man0["splits"]["train"]) | set(man0["splits"]["test"])
    assert len(set(val)) == 5 and not set(val) & ids and set(new["subject_id"][len(old):]) == set(val)
    assert not set(new["hadm_id"][len(old):]) & set(old["hadm_id"])
    recs, problems = read_qa_file(root / "qa" / "disease_val.json", MODS)
    assert not problems and [int(r.id.split("-")[0]) for r in recs] == val
    assert all(FORMAT.match(r.answer) for r in recs)
    # a validation patient's lab percentiles: the training split's empirical CDF (restated), not refitted
    train_rows = new[new["subject_id"].isin(man0["splits"]["train"])]
    for item in list(SYMILE_LABS)[:10]:
        ref = np.sort(train_rows[item].dropna().to_numpy())
        for x, pct in zip(new[item][len(old):], new[f"{item}_percentile"][len(old):]):
            if not np.isnan(x):
                assert pct == pytest.approx(np.searchsorted(ref, x, side="right") / ref.size, abs=1e-4)
    check = CliRunner().invoke(data_group, ["check", "--root", str(root)])
    assert check.exit_code == 0, check.output
    assert "checked 6 QA file(s), 31 record(s)" in check.output, check.output  # 3 x 6 PT, 6 train, 2 test, 5 val
