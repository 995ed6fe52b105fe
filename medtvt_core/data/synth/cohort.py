"""Writing a cohort: patients rendered in parallel, the labs CSV, the QA files, the manifest."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ...io import atomic_dir
from ..formats import SYMILE_CHEXPERT, SYMILE_LABS, mimic_cxr_path, mimic_ecg_path
from ..labels import DISEASES
from ..manifest import MANIFEST_NAME, read_manifest, write_manifest
from ..schema import write_qa_file
from .cxr import cxr_answer, cxr_findings, render_cxr, write_cxr
from .ecg import ecg_answer, ecg_findings, render_ecg, write_ecg
from .labs import lab_answer, sample_labs
from .options import synth_options
from .patients import (
    _LAB_PARAMS,
    _SIGNS,
    CXR_DIR,
    ECG_DIR,
    LAB_IDS,
    LABS_CSV,
    PT_FILES,
    SYNTH_VERSION,
    TEST_FILE,
    TRAIN_FILE,
    VAL_FILE,
    Patient,
    _signs_of,
    assign_decoys,
    evidence_table,
    make_patients,
    make_val_patients,
)
from .reports import _Q_CXR, _Q_DISEASE, _Q_ECG, _Q_LAB, _qa, disease_answer


# --------------------------------------------------------------------------- cohort
@dataclass
class SynthSummary:
    root: Path
    n_patients: int
    n_train: int
    n_test: int
    prevalence: dict[str, int]
    seconds: float
    joint_diseases: tuple[str, ...] = ()
    decoys: dict[str, dict[str, int]] = field(default_factory=dict)  # joint disease -> modality -> decoy patients
    n_val: int = 0


def _render_patient(job: tuple[Path, int, Patient, float]) -> Patient:
    """Findings, ECG record, radiograph and labs of one patient (seeded by (seed, patient index))."""
    root, seed, p, evidence = job
    rng = np.random.default_rng([seed, 1, p.index])
    p.ecg = ecg_findings(p, rng, evidence)
    sig, measured = render_ecg(p.ecg, rng)
    p.ecg["measured"] = measured
    write_ecg(root / p.ecg_ref, sig)
    p.cxr = cxr_findings(p, rng, evidence)
    write_cxr(root / p.cxr_ref, render_cxr(p.cxr, rng))
    p.labs = sample_labs(p, rng, evidence)
    return p


def generator_options(**options: Any) -> dict[str, Any]:
    """The ``generator`` block of the manifest for these options (validated by :class:`SynthConfig`;
    a bad one raises :class:`DataError`)."""
    o = synth_options(**options)
    gen = {"version": SYNTH_VERSION, "n_patients": o.n_patients, "seed": o.seed, "test_fraction": o.test_fraction,
           "evidence": o.evidence, "joint_diseases": list(o.joint_diseases), "decoy_rate": o.decoy_rate}
    if o.val_patients:  # only then: a cohort without a validation split keeps its manifest byte for byte
        gen["val_patients"] = o.val_patients
    return gen


def synthesize(out: str | Path, *, overwrite: bool = False, workers: int = 0, **options: Any) -> SynthSummary:
    """Write the synthetic cohort into ``out`` (see the module docstring); deterministic per seed.

    ``workers``: processes writing patients (0: up to 8, by CPU count); the output does not depend on it.
    ``options``: :class:`~medtvt_core.data.synth.options.SynthConfig`'s fields (``n_patients``, ``seed``,
    ``test_fraction``, ``evidence``, ``joint_diseases`` as names, a comma string or ``"all"``,
    ``decoy_rate``, ``val_patients``); their defaults write the original cohort.  Validation patients
    come after the others from streams of their own: every other file, QA record and lab percentile
    is the same with or without them (percentiles are fitted on the training split only).

    The cohort is written to a temporary sibling directory and renamed into place, so ``out``
    never holds a half-written cohort.  An existing non-empty ``out`` is replaced only with
    ``overwrite`` and only when it is a medtvt synthetic cohort.
    """
    gen = generator_options(**options)
    n_patients, seed, test_fraction = gen["n_patients"], gen["seed"], gen["test_fraction"]
    evidence, joint, decoy_rate = gen["evidence"], tuple(gen["joint_diseases"]), gen["decoy_rate"]
    default_cohort = evidence == 1.0 and not joint
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DataError(f"{out} exists and is not empty; pass --overwrite to replace a synthetic cohort there")
        if not (out / MANIFEST_NAME).is_file():
            raise DataError(f"{out} is not a medtvt dataset (no {MANIFEST_NAME}); refusing to delete it")
    with atomic_dir(out) as tmp:
        patients = make_patients(n_patients, seed, test_fraction)
        patients += make_val_patients(gen.get("val_patients", 0), seed, patients)
        if joint:
            for p in patients:
                assign_decoys(p, seed, joint, decoy_rate)
        jobs = [(tmp, seed, p, evidence) for p in patients]
        # Auto: no pool for small cohorts (process start-up would cost more than it saves).
        workers = min(workers, n_patients) if workers > 0 else max(1, min(os.cpu_count() or 1, 8, n_patients // 32))
        if workers == 1:
            patients = [_render_patient(j) for j in jobs]
        else:
            # wfdb.wrsamp costs tens of ms per record (pandas lookups): write records in parallel.
            # Each patient has its own seed, so the files do not depend on the worker count.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                patients = list(pool.map(_render_patient, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
        _measure_every_lab(patients, seed)
        _write_labs_csv(tmp / LABS_CSV, patients)
        _write_qa(tmp, patients, seed, check_signs=not default_cohort)
        train = [p for p in patients if p.split == "train"]
        test = [p for p in patients if p.split == "test"]
        val = [p for p in patients if p.split == "val"]
        prevalence = {d: sum(d in p.diseases for p in patients) for d in DISEASES}
        decoys = {d: {_SIGNS[k][1]: sum(k in p.decoys for p in patients) for k in _signs_of(d)} for d in joint}
        write_manifest(tmp, {
            "name": "medtvt-synthetic",
            "generator": gen,
            "qa": {"pt": list(PT_FILES), "train": TRAIN_FILE, "test": TEST_FILE, **({"val": VAL_FILE} if val else {})},
            "files": {"labs_csv": LABS_CSV, "ecg_dir": ECG_DIR, "cxr_dir": CXR_DIR},
            "splits": {"train": [p.subject_id for p in train], "test": [p.subject_id for p in test],
                       **({"val": [p.subject_id for p in val]} if val else {})},
            "prevalence": {"all": prevalence,
                           **{k: {d: sum(d in p.diseases for p in ps) for d in DISEASES}
                              for k, ps in (("train", train), ("test", test), ("val", val)) if ps}},
            "evidence": evidence_table(joint),
            "decoys": decoys,
        })
        # The readers' training statistics (lab mean percentiles) are fitted by prepare_stats when a run
        # first opens the splits, and stored in this manifest then.
    secs = time.perf_counter() - t0
    return SynthSummary(out, n_patients, len(train), len(test), prevalence, secs, joint, decoys, len(val))


def ensure_synthetic(out: str | Path, *, workers: int = 0, **options: Any) -> Path:
    """Reuse the cohort in ``out`` when its manifest records exactly these generator options, else
    (re)generate it (a cohort from before the options existed is regenerated once: same files)."""
    out = Path(out)
    want = generator_options(**options)
    try:
        man = read_manifest(out)
    except DataError:
        man = None
    if man is not None and man.get("generator") == want:
        return out
    synthesize(out, overwrite=True, workers=workers, **options)
    return out


def _measure_every_lab(patients: list[Patient], seed: int) -> None:
    """Give each lab at least one measured training value (rare labs can miss in small cohorts),
    so that its training percentiles and mean exist."""
    rng = np.random.default_rng([seed, 3])
    train = [p for p in patients if p.split == "train"]
    for item in LAB_IDS:
        if not any(item in p.labs for p in train):
            _, c, s, lognormal, dec, _ = _LAB_PARAMS[item]
            x = c * math.exp(rng.normal(0, s)) if lognormal else c + rng.normal(0, s)
            train[0].labs[item] = round(x, dec)


def _write_labs_csv(path: Path, patients: list[Patient]) -> None:
    import pandas as pd

    train = [p for p in patients if p.split == "train"]
    rows = []
    for p in patients:
        op, ctr = p.cxr["opacity"], p.cxr["ctr"]
        row: dict[str, Any] = {"subject_id": p.subject_id, "hadm_id": p.hadm_id,
                               "cxr_path": mimic_cxr_path(p.subject_id, p.cxr_study, p.dicom_id),
                               "ecg_path": mimic_ecg_path(p.subject_id, p.ecg_study)}
        chex = {"Atelectasis": np.nan, "Cardiomegaly": 1.0 if ctr > 0.5 else 0.0, "Edema": np.nan,
                "Lung Opacity": 1.0 if op else np.nan, "No Finding": 1.0 if (ctr <= 0.5 and not op) else np.nan,
                "Pleural Effusion": 0.0}
        row.update({k: chex[k] for k in SYMILE_CHEXPERT})
        for item in SYMILE_LABS:
            row[item] = p.labs.get(item, np.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    # Percentile = empirical CDF of the training split's measured values (Symile-MIMIC's definition).
    for item in SYMILE_LABS:
        ref = np.sort(np.asarray([p.labs[item] for p in train if item in p.labs], dtype=np.float64))
        x = df[item].to_numpy(dtype=np.float64)
        pct = np.full_like(x, np.nan)
        ok = ~np.isnan(x)
        pct[ok] = np.searchsorted(ref, x[ok], side="right") / ref.size  # ref is never empty: _measure_every_lab
        df[f"{item}_percentile"] = np.round(pct, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)


def _write_qa(root: Path, patients: list[Patient], seed: int, *, check_signs: bool = False) -> None:
    rng = np.random.default_rng([seed, 2])
    pt_ecg, pt_cxr, pt_lab = [], [], []
    dis: dict[str, list[dict[str, Any]]] = {"train": [], "test": [], "val": []}
    for p in patients:
        lab_ref = str(p.hadm_id)
        q = _Q_DISEASE[int(rng.integers(len(_Q_DISEASE)))]
        rec = _qa(f"{p.subject_id}-disease", q, disease_answer(p, check_signs=check_signs), ECG=p.ecg_ref, image=p.cxr_ref, lab=lab_ref)
        dis[p.split].append(rec)
        if p.split != "train":
            continue  # physiological QA only for training patients: test and validation patients stay unseen
        pt_ecg.append(_qa(f"{p.subject_id}-ecg", _Q_ECG[int(rng.integers(3))], ecg_answer(p.ecg, p.ecg["measured"], p.decoys), ECG=p.ecg_ref))
        pt_cxr.append(_qa(f"{p.subject_id}-cxr", _Q_CXR[int(rng.integers(3))], cxr_answer(p.cxr, p.decoys), image=p.cxr_ref))
        pt_lab.append(_qa(f"{p.subject_id}-lab", _Q_LAB[int(rng.integers(3))], lab_answer(p.labs, causes=p.decoys), lab=lab_ref))
    for name, recs in zip((*PT_FILES, TRAIN_FILE, TEST_FILE), (pt_ecg, pt_cxr, pt_lab, dis["train"], dis["test"])):
        write_qa_file(root / name, recs)
    if dis["val"]:
        write_qa_file(root / VAL_FILE, dis["val"])
