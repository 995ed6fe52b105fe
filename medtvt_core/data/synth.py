"""Synthetic MedTVT cohort in the real on-disk formats, with strong, learnable evidence.

Layout of ``out``::

    medtvt_dataset.json                     manifest: generator options, QA files, splits, prevalence, evidence table
    labs.csv                                Symile-MIMIC format (subject_id, hadm_id, cxr_path, ecg_path,
                                            6 CheXpert labels, 50 x '<itemid>' + '<itemid>_percentile')
    mimic-iv-ecg/files/pXXXX/pXXXXXXXX/sXXXXXXXX/XXXXXXXX.{hea,dat}
                                            WFDB (wfdb.wrsamp), 500 Hz x 12 leads x 10 s, MIMIC-IV-ECG lead order
    mimic-cxr-jpg/files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
                                            grey JPEG (quality 85), 416 x 448 px (short side >= 400, so the
                                            reader's resize to 400 never upscales)
    qa/pt_ecg.json qa/pt_cxr.json qa/pt_lab.json        physiological QA, one modality each (train patients)
    qa/disease_train.json qa/disease_test.json          disease QA, all three modalities (patient-disjoint)

Evidence at the default strength (large on purpose: the demo's frozen encoders are randomly initialised):

* Atrial Fibrillation: irregular RR (CV ~0.2), no P waves, coarse 5-7 Hz fibrillatory waves, rate 110-160.
  ECG only.
* Coronary Artery Disease: ST depression 0.15-0.3 mV with T inversion in a lead territory. ECG only.
* Hypertension: QRS voltage x1.9-2.4 (Sokolow-Lyon > 3.5 mV, left axis deviation in half) [ECG] and
  cardiothoracic ratio 0.56-0.64 [CXR].
* Pneumonia: focal opacity in one lung zone [CXR] and raised white cells / neutrophils, lower pO2 [labs].
* Acute Renal Failure: creatinine 1.8-6 mg/dL, urea nitrogen 35-100 mg/dL, potassium up, bicarbonate down.
  Labs only.
* Diabetes Mellitus: glucose 160-380 mg/dL with low sodium/chloride, anion gap up, bicarbonate,
  magnesium and phosphate down. Labs only.
* Sepsis: tachycardia (sinus 106-130 bpm; a septic patient in atrial fibrillation keeps its fast AF rate)
  [ECG] and lactate 2.3-9 mmol/L, white cells 13-30 K/uL, acidosis, low platelets, blood gases drawn [labs].

Every patient has at least one of the 7 categories (as in the paper's cohort); disease
frequencies and co-occurrence follow the paper's code counts roughly (hypertension most common;
coronary disease and diabetes with hypertension; sepsis with pneumonia; renal failure with sepsis).
Key labs of a patient's diseases are always measured.  Disease answers put the evidence and
reasoning inside ``<think> ... </think>`` followed by ``<answer> A; B </answer>``, so the
reference answers themselves satisfy the format reward.  Everything is a function of ``seed``.

Generator options (the defaults write the cohort above, byte for byte as before these options existed):

* ``evidence`` (default 1.0, allowed (0, 2]): strength of every sign.  Each sign's deviation from
  normal is multiplied by it: heart-rate excess over 76.5 bpm (AF and septic tachycardia), AF RR
  irregularity and fibrillatory-wave amplitude, QRS voltage excess over 1x, ST depression and T
  inversion depth, cardiothoracic-ratio excess over 0.44, opacity intensity, and every lab shift of
  a disease (in log space for log-normal labs).  Below 1 the "always measured" key labs and the septic
  blood gases are also missing more often (missingness moves towards the normal rate by
  ``1 - evidence``).  P waves stay absent in AF at any strength.  Reports state what is measured:
  a sign below its reporting threshold is not called abnormal, and a disease whose signs are below
  threshold is reasoned about as "weak signs (...) suggest <disease>".
* ``joint_diseases`` (default ``()``; ``"all"`` = Hypertension, Pneumonia, Sepsis): diseases whose
  diagnosis needs two modalities together.  Only these three have evidence in two modalities, one
  pair each (Hypertension: ECG + CXR; Pneumonia: CXR + labs; Sepsis: ECG + labs).  For a joint
  disease every patient with it shows both signs, and each sign also appears *alone* ("decoy") in
  patients without it, with an identical in-modality bundle (same values, same missingness), so no
  single modality can tell a decoy from the disease; only the combination identifies it.  The decoy's
  other cause is written into that modality's physiological report:
  - high QRS voltage: a young athlete's physiological hypertrophy, or a thin chest wall;
  - large heart shadow: an AP portable film (magnification), or a pericardial effusion;
  - focal opacity: atelectasis after surgery, or an old scar;
  - raised white cells (with lower pO2): corticosteroids for a COPD exacerbation, or a urinary infection;
  - sinus tachycardia: pain, fever from a viral illness, or dehydration;
  - raised lactate (with leucocytosis and acidosis): a generalised seizure, or metformin.
  The disease answers reason from the evidence present ("raised lactate without tachycardia does not
  mean sepsis").  A decoy is placed only where it cannot complete the combination by accident: no
  septic-lactate decoy in atrial fibrillation (already fast), no pneumonia decoy where the septic
  bundle already raises the white cells.  Natural overlaps stay (AF is fast; sepsis raises white cells).
* ``decoy_rate`` (default 0.3, allowed (0, 0.5]): for each joint disease and each of its two signs,
  the probability that an eligible patient without the disease shows that sign alone (the two are
  exclusive, so up to 2 x rate of such patients carry one decoy).  With 0.3, on 150 patients, the
  best single hand-measured sign of a joint disease reaches an AUC of 0.82-0.94 and both signs
  together >= 0.986 (seeds 0-11; tests/test_data_synth.py).

Decoys, causes and their draws come from their own random stream (seed, 4, patient), so the
default cohort's files are unchanged and turning one disease joint does not move another's decoys;
disease sets (and prevalences) do not depend on the options.  The manifest's ``generator`` block
records every option (``ensure_synthetic`` reuses a cohort only when all match) and its
``evidence`` table names, per disease, the modalities carrying its evidence, its signs, and whether
it is joint in this cohort; ``decoys`` counts decoy signs per joint disease and modality.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .formats import MIMIC_IV_ECG_LEADS, SYMILE_CHEXPERT, SYMILE_LABS, mimic_cxr_path, mimic_ecg_path
from .labels import DISEASES, format_answer
from .manifest import MANIFEST_NAME, read_manifest, write_manifest
from .schema import write_qa_file

log = logging.getLogger("medtvt.data")

SYNTH_VERSION = 2
ECG_DIR = "mimic-iv-ecg"
CXR_DIR = "mimic-cxr-jpg"
LABS_CSV = "labs.csv"
ECG_FS = 500
ECG_SECONDS = 10
CXR_SIZE = (416, 448)  # width, height
PT_FILES = ("qa/pt_ecg.json", "qa/pt_cxr.json", "qa/pt_lab.json")
TRAIN_FILE = "qa/disease_train.json"
TEST_FILE = "qa/disease_test.json"

CAD, ARF, HTN, AF, PNA, DM, SEPSIS = DISEASES

# --------------------------------------------------------------------------- evidence model
#: Modalities (reader names) whose files carry each disease's evidence.
EVIDENCE_MODALITIES: dict[str, tuple[str, ...]] = {
    CAD: ("ecg",), ARF: ("lab",), HTN: ("ecg", "cxr"), AF: ("ecg",), PNA: ("cxr", "lab"), DM: ("lab",),
    SEPSIS: ("ecg", "lab"),
}
#: Diseases that can be made joint (evidence in two modalities), in the order decoys are drawn.
JOINT_CAPABLE: tuple[str, ...] = (HTN, SEPSIS, PNA)
DEFAULT_DECOY_RATE = 0.3
MAX_EVIDENCE = 2.0
_ALIASES = {"htn": HTN, "pna": PNA, "sepsis": SEPSIS}

# Sign key -> (disease, modality, what it is).  A patient's ``signs`` decide what the renderers draw.
_SIGNS: dict[str, tuple[str, str, str]] = {
    "htn_ecg": (HTN, "ecg", "high QRS voltage (Sokolow-Lyon > 3.5 mV), left axis deviation in half"),
    "htn_cxr": (HTN, "cxr", "enlarged heart shadow (cardiothoracic ratio 0.56-0.64)"),
    "sep_ecg": (SEPSIS, "ecg", "tachycardia (sinus 106-130 bpm, or the fast rate of atrial fibrillation)"),
    "sep_lab": (SEPSIS, "lab", "raised lactate and white cells, acidosis, low platelets, blood gases drawn"),
    "pna_cxr": (PNA, "cxr", "focal opacity in one lung zone"),
    "pna_lab": (PNA, "lab", "raised white cells and neutrophils, lower pO2"),
}
_OTHER_SIGNS = {
    CAD: {"ecg": "ST depression with T inversion in a lead territory"},
    ARF: {"lab": "raised creatinine and urea nitrogen, potassium up, bicarbonate down"},
    AF: {"ecg": "irregular RR, no P waves, fibrillatory waves, rate 110-160"},
    DM: {"lab": "high glucose, low sodium and chloride, anion gap up, bicarbonate, magnesium and phosphate down"},
}
# Other causes of a sign shown alone (written into the physiological report of its modality).
_DECOY_CAUSES: dict[str, tuple[str, ...]] = {
    "htn_ecg": ("a young athlete's physiological hypertrophy", "a thin chest wall"),
    "htn_cxr": ("an AP portable film, which magnifies the heart", "a pericardial effusion"),
    "sep_ecg": ("pain", "fever from a viral illness", "dehydration"),
    "sep_lab": ("a generalised seizure", "metformin"),
    "pna_cxr": ("atelectasis after surgery", "an old scar"),
    "pna_lab": ("corticosteroids for a COPD exacerbation", "a urinary tract infection"),
}
# Disease answer: why a decoy sign does not lead to the disease (true by construction of the decoys).
_DECOY_WHY = {
    "htn_ecg": "high voltage with a normal heart size does not mean hypertension",
    "htn_cxr": "a large heart with normal QRS voltage does not mean hypertension",
    "sep_ecg": "tachycardia without the septic laboratory picture does not mean sepsis",
    "sep_lab": "raised lactate without tachycardia does not mean sepsis",
    "pna_cxr": "an opacity without the infective blood picture does not mean pneumonia",
    "pna_lab": "raised white cells with clear lungs do not mean pneumonia",
}


def _signs_of(disease: str) -> tuple[str, str]:
    a, b = (k for k, v in _SIGNS.items() if v[0] == disease)
    return a, b


def parse_joint_diseases(spec: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"none"``/``""``/None -> (), ``"all"`` -> the joint-capable diseases, else a comma list (or a
    sequence) of their names (case-insensitive; aliases htn, pna, sepsis); returned in ``DISEASES`` order."""
    if spec is None:
        return ()
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else [str(x).strip() for x in spec]
    items = [x for x in items if x]
    if [x.lower() for x in items] in ([], ["none"]):
        return ()
    if [x.lower() for x in items] == ["all"]:
        return tuple(d for d in DISEASES if d in JOINT_CAPABLE)
    by_name = {d.lower(): d for d in JOINT_CAPABLE} | _ALIASES
    got = set()
    for x in items:
        if x.lower() not in by_name:
            names = ", ".join(d for d in DISEASES if d in JOINT_CAPABLE)
            raise DataError(f"joint disease {x!r}: allowed: all, none, or a comma list of {names} "
                            "(the diseases with evidence in two modalities)")
        got.add(by_name[x.lower()])
    return tuple(d for d in DISEASES if d in got)


def evidence_table(joint_diseases: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Per disease: the modalities carrying its evidence, its signs per modality, and whether it is joint."""
    table = {}
    for d in DISEASES:
        signs = {v[1]: v[2] for v in _SIGNS.values() if v[0] == d} or _OTHER_SIGNS[d]
        table[d] = {"modalities": list(EVIDENCE_MODALITIES[d]), "joint": d in joint_diseases,
                    "signs": {m: signs[m] for m in EVIDENCE_MODALITIES[d]}}
    return table


def _toward(x: float, normal: float, k: float) -> float:
    """``x`` with its deviation from ``normal`` scaled by ``k`` (exactly ``x`` at ``k == 1``)."""
    return x if k == 1.0 else normal + k * (x - normal)

# --------------------------------------------------------------------------- labs
# item id -> (unit, centre, spread, log-normal?, decimals, P(missing)).  Log-normal: centre is the
# median and spread the sd of log(value).  Reference range: centre -/+ 2 spreads.
_LAB_SPEC: dict[str, tuple[str, float, float, bool, int, float]] = {
    "50802": ("mEq/L", 0.0, 2.5, False, 0, 0.65), "50804": ("mEq/L", 25.0, 3.0, False, 0, 0.65),
    "50813": ("mmol/L", 1.3, 0.3, True, 1, 0.55), "50818": ("mm Hg", 41.0, 5.0, False, 0, 0.65),
    "50820": ("units", 7.40, 0.035, False, 2, 0.62), "50821": ("mm Hg", 90.0, 18.0, False, 0, 0.65),
    "50861": ("IU/L", 24.0, 0.45, True, 0, 0.35), "50862": ("g/dL", 3.9, 0.4, False, 1, 0.35),
    "50863": ("IU/L", 80.0, 0.3, True, 0, 0.35), "50868": ("mEq/L", 13.0, 2.0, False, 0, 0.03),
    "50878": ("IU/L", 26.0, 0.45, True, 0, 0.35), "50882": ("mEq/L", 25.0, 2.5, False, 0, 0.03),
    "50885": ("mg/dL", 0.6, 0.45, True, 1, 0.35), "50893": ("mg/dL", 9.1, 0.45, False, 1, 0.15),
    "50902": ("mEq/L", 102.0, 3.0, False, 0, 0.03), "50910": ("IU/L", 110.0, 0.55, True, 0, 0.7),
    "50912": ("mg/dL", 0.9, 0.18, True, 1, 0.02), "50931": ("mg/dL", 104.0, 13.0, False, 0, 0.02),
    "50934": ("index", 10.0, 0.5, True, 0, 0.88), "50947": ("index", 2.0, 0.5, True, 0, 0.88),
    "50960": ("mg/dL", 2.0, 0.2, False, 1, 0.15), "50970": ("mg/dL", 3.5, 0.5, False, 1, 0.15),
    "50971": ("mEq/L", 4.2, 0.35, False, 1, 0.03), "50983": ("mEq/L", 139.0, 3.0, False, 0, 0.03),
    "51006": ("mg/dL", 15.0, 0.28, True, 0, 0.02), "51133": ("K/uL", 1.8, 0.35, True, 2, 0.4),
    "51146": ("%", 0.5, 0.25, False, 1, 0.3), "51200": ("%", 2.0, 1.0, False, 1, 0.3),
    "51221": ("%", 40.0, 4.0, False, 1, 0.02), "51222": ("g/dL", 13.5, 1.4, False, 1, 0.02),
    "51237": ("", 1.05, 0.1, False, 1, 0.25), "51244": ("%", 27.0, 7.0, False, 1, 0.3),
    "51248": ("pg", 30.0, 1.6, False, 1, 0.02), "51249": ("g/dL", 33.3, 1.0, False, 1, 0.02),
    "51250": ("fL", 90.0, 4.5, False, 0, 0.02), "51254": ("%", 7.0, 2.0, False, 1, 0.3),
    "51256": ("%", 62.0, 8.0, False, 1, 0.3), "51265": ("K/uL", 250.0, 60.0, False, 0, 0.02),
    "51274": ("sec", 12.0, 1.0, False, 1, 0.25), "51275": ("sec", 30.0, 4.0, False, 1, 0.25),
    "51277": ("%", 13.5, 1.0, False, 1, 0.02), "51279": ("m/uL", 4.5, 0.45, False, 2, 0.02),
    "51301": ("K/uL", 7.5, 1.8, False, 1, 0.02), "51678": ("index", 20.0, 0.5, True, 0, 0.88),
    "52069": ("K/uL", 0.04, 0.4, True, 2, 0.4), "52073": ("K/uL", 0.15, 0.5, True, 2, 0.4),
    "52074": ("K/uL", 0.5, 0.3, True, 2, 0.4), "52075": ("K/uL", 4.5, 0.35, True, 2, 0.4),
    "52135": ("%", 0.4, 0.4, True, 1, 0.4), "52172": ("fL", 44.0, 3.5, False, 1, 0.5),
}
assert set(_LAB_SPEC) == set(SYMILE_LABS)
LAB_IDS: tuple[str, ...] = tuple(sorted(SYMILE_LABS))

GLUCOSE, CREAT, UREA, WBC, LACTATE = "50931", "50912", "51006", "51301", "50813"
# Labs whose disease (or lab sign) always gets them measured (a diabetic's glucose, a septic lactate).
_KEY_LABS = {DM: (GLUCOSE,), ARF: (CREAT, UREA), "sep_lab": (LACTATE, WBC), "pna_lab": (WBC,)}
_SHORT = {GLUCOSE: "glucose", CREAT: "creatinine", UREA: "urea nitrogen", WBC: "white cells", LACTATE: "lactate",
          "50971": "potassium", "50882": "bicarbonate", "51256": "neutrophils", "51265": "platelets", "50820": "pH"}


def lab_reference_range(item: str) -> tuple[float, float]:
    _, c, s, lognormal, _, _ = _LAB_SPEC[item]
    return (c * math.exp(-2 * s), c * math.exp(2 * s)) if lognormal else (c - 2 * s, c + 2 * s)


def _lab_name(item: str) -> str:
    return _SHORT.get(item, SYMILE_LABS[item])


# --------------------------------------------------------------------------- patient model
@dataclass
class Patient:
    """One synthetic hospital stay and the ground truth of what its files show."""

    index: int
    subject_id: int
    hadm_id: int
    ecg_study: int
    cxr_study: int
    dicom_id: str
    diseases: tuple[str, ...]
    split: str = "train"
    ecg: dict[str, Any] = field(default_factory=dict)
    cxr: dict[str, Any] = field(default_factory=dict)
    labs: dict[str, float] = field(default_factory=dict)  # measured raw values only
    signs: frozenset[str] = frozenset()  # sign keys of _SIGNS the files show (diseases' own + decoys)
    decoys: dict[str, str] = field(default_factory=dict)  # decoy sign -> the other cause named in its report

    def __post_init__(self) -> None:
        if not self.signs:
            self.signs = frozenset(k for k, v in _SIGNS.items() if v[0] in self.diseases)

    @property
    def ecg_ref(self) -> str:
        return f"{ECG_DIR}/{mimic_ecg_path(self.subject_id, self.ecg_study)}"

    @property
    def cxr_ref(self) -> str:
        return f"{CXR_DIR}/{mimic_cxr_path(self.subject_id, self.cxr_study, self.dicom_id)}"


def sample_diseases(rng: np.random.Generator) -> tuple[str, ...]:
    """Disease set with the paper's rough frequencies and co-occurrence; never empty."""
    while True:
        htn = rng.random() < 0.50
        cad = rng.random() < 0.12 + 0.22 * htn
        dm = rng.random() < 0.11 + 0.14 * htn
        af = rng.random() < 0.20 + 0.10 * cad + 0.05 * htn
        pna = rng.random() < 0.15
        sep = rng.random() < 0.05 + 0.30 * pna
        arf = rng.random() < 0.13 + 0.30 * sep + 0.08 * dm + 0.05 * htn
        got = tuple(d for d, on in zip(DISEASES, (cad, arf, htn, af, pna, dm, sep)) if on)
        if got:
            return got


def _ids(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    """``n`` distinct ids in ``[lo, hi)``."""
    return [lo + int(x) for x in rng.choice(hi - lo, size=n, replace=False)]


def make_patients(n: int, seed: int, test_fraction: float) -> list[Patient]:
    """Identities, splits and disease sets of ``n`` patients (findings are added by the renderers)."""
    rng = np.random.default_rng([seed, 0])
    subjects = _ids(rng, n, 10_000_000, 20_000_000)
    hadms = _ids(rng, n, 20_000_000, 30_000_000)
    ecgs = _ids(rng, n, 40_000_000, 50_000_000)
    cxrs = _ids(rng, n, 50_000_000, 60_000_000)
    n_test = max(1, int(round(n * test_fraction)))
    patients = []
    for i in range(n):
        dicom = "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5))
        patients.append(Patient(i, subjects[i], hadms[i], ecgs[i], cxrs[i], dicom, sample_diseases(rng),
                                split="test" if i < n_test else "train"))
    return patients


def _shows(sign: str, diseases: set[str], signs: set[str]) -> bool:
    """Whether the patient's files already show ``sign`` (its own or the same finding from another cause)."""
    return (sign in signs or (sign == "sep_ecg" and AF in diseases)  # atrial fibrillation is fast
            or (sign == "pna_lab" and "sep_lab" in signs))  # the septic bundle raises the white cells


def assign_decoys(p: Patient, seed: int, joint: tuple[str, ...], rate: float) -> None:
    """Give ``p`` decoy signs of the joint diseases it does not have (own stream: seed, 4, patient).

    The draws are made for every joint-capable disease whatever ``joint`` holds, so one disease's
    decoys do not depend on which others are joint.  A decoy goes only where neither of the
    disease's two signs is already shown, so the combination never appears without the disease.
    """
    rng = np.random.default_rng([seed, 4, p.index])
    d = set(p.diseases)
    signs = set(p.signs)
    for dis in JOINT_CAPABLE:  # sepsis before pneumonia: a septic-lab decoy raises the white cells
        u, c = rng.random(), rng.random()
        if dis not in joint or dis in d or u >= 2 * rate:
            continue
        a, b = _signs_of(dis)
        sign, other = (a, b) if u < rate else (b, a)
        if _shows(sign, d, signs) or _shows(other, d, signs):
            continue
        signs.add(sign)
        causes = _DECOY_CAUSES[sign]
        p.decoys[sign] = causes[min(int(c * len(causes)), len(causes) - 1)]
    p.signs = frozenset(signs)


# --------------------------------------------------------------------------- ECG
_FRONTAL_ANGLE = {"I": 0.0, "II": 60.0, "III": 120.0, "aVR": -150.0, "aVF": 90.0, "aVL": -30.0}
_PRECORDIAL = ("V1", "V2", "V3", "V4", "V5", "V6")
_R_PREC = np.array([0.2, 0.4, 0.7, 1.1, 1.35, 1.1])
_S_PREC = np.array([-0.9, -1.3, -0.9, -0.5, -0.25, -0.1])
_T_PREC = np.array([-0.05, 0.25, 0.35, 0.35, 0.3, 0.25])
_P_PREC = np.array([0.05, 0.08, 0.08, 0.08, 0.08, 0.07])
_TERRITORIES = {"inferolateral": ("II", "III", "aVF", "V4", "V5", "V6"),
                "lateral": ("I", "aVL", "V4", "V5", "V6"),
                "anterolateral": ("V2", "V3", "V4", "V5", "V6", "I")}


def ecg_findings(p: Patient, rng: np.random.Generator, evidence: float = 1.0) -> dict[str, Any]:
    """What the ECG will show, from the patient's diseases and signs (``evidence``: sign strength)."""
    d, s, k = set(p.diseases), p.signs, evidence
    f: dict[str, Any] = {"evidence": k}
    if AF in d:
        f["rhythm"], f["hr"] = "atrial fibrillation", _toward(rng.uniform(110, 160), 76.5, k)
    elif "sep_ecg" in s:
        f["rhythm"], f["hr"] = "sinus tachycardia", _toward(rng.uniform(106, 130), 76.5, k)
        if f["hr"] <= 100:  # a weak sign: the rate no longer meets the definition
            f["rhythm"] = "sinus rhythm"
    else:
        f["rhythm"], f["hr"] = "sinus rhythm", rng.uniform(58, 95)
    f["axis"] = float(rng.uniform(-45, 5) if ("htn_ecg" in s and rng.random() < 0.5) else rng.uniform(15, 80))
    f["voltage"] = float(_toward(rng.uniform(1.9, 2.4), 1.0, k) if "htn_ecg" in s else rng.uniform(0.85, 1.15))
    if CAD in d:
        f["territory"] = str(rng.choice(sorted(_TERRITORIES)))
        f["st_depression"] = float(rng.uniform(0.15, 0.3)) * k
        f["t_inversion"] = float(rng.uniform(0.2, 0.4)) * k
    else:
        f["territory"], f["st_depression"], f["t_inversion"] = None, 0.0, 0.0
    return f


def render_ecg(f: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Signal ``[5000, 12]`` in mV (MIMIC-IV-ECG lead order) and measured rate/RR/voltage."""
    fs, n = ECG_FS, ECG_FS * ECG_SECONDS
    leads = MIMIC_IV_ECG_LEADS
    af = f["rhythm"] == "atrial fibrillation"
    ev = f.get("evidence", 1.0)
    rr_mean = 60.0 / f["hr"]
    rr_min = 0.33 if ev <= 1.0 else min(0.33, 0.75 * rr_mean)  # stronger evidence: faster AF
    # Beat times: sinus = nearly regular (respiratory modulation); AF = irregularly irregular.
    times, t = [], float(rng.uniform(0.05, rr_mean))
    k = 0
    while t < ECG_SECONDS + 0.5:
        times.append(t)
        if af:
            rr = rr_mean * math.exp(rng.normal(0, 0.22 * ev))
            rr = min(max(rr, rr_min), 1.6)
        else:
            rr = rr_mean * (1 + 0.03 * math.sin(2 * math.pi * k * rr_mean / 4.0) + rng.normal(0, 0.012))
        t += rr
        k += 1
    times_a = np.asarray(times)
    inside = times_a[(times_a > 0.35) & (times_a < ECG_SECONDS - 0.65)]
    rr_obs = np.diff(inside) if inside.size > 2 else np.array([rr_mean])

    # Per-lead wave amplitudes (mV).
    v = f["voltage"]
    axis = math.radians(f["axis"])
    L = len(leads)
    p_amp, r_amp, s_amp, q_amp, t_amp, st = (np.zeros(L) for _ in range(6))
    ischaemic = set(_TERRITORIES.get(f["territory"] or "", ()))
    for i, lead in enumerate(leads):
        if lead in _FRONTAL_ANGLE:
            proj = math.cos(axis - math.radians(_FRONTAL_ANGLE[lead]))
            r_amp[i] = (0.15 + 1.1 * max(proj, 0.0)) * v
            s_amp[i] = -(0.1 + 1.1 * max(-proj, 0.0)) * v
            q_amp[i] = -0.06 if proj > 0.5 else 0.0
            t_amp[i] = 0.28 * math.cos(axis - math.radians(_FRONTAL_ANGLE[lead]))
            p_amp[i] = 0.12 * math.cos(math.radians(60.0 - _FRONTAL_ANGLE[lead]))
        else:
            j = _PRECORDIAL.index(lead)
            r_amp[i], s_amp[i], t_amp[i], p_amp[i] = _R_PREC[j] * v, _S_PREC[j] * v, _T_PREC[j], _P_PREC[j]
        if lead in ischaemic:
            st[i] = -f["st_depression"]
            t_amp[i] = -f["t_inversion"]
    if af:
        p_amp[:] = 0.0
    sokolow = abs(s_amp[leads.index("V1")]) + r_amp[leads.index("V5")]

    # Beat template on a local grid, added at each beat (QT shortens with the rate).
    tt = np.arange(-0.3, 0.7, 1 / fs)
    t_pos = 0.30 * math.sqrt(rr_mean)

    def g(mu: float, sd: float) -> np.ndarray:
        return np.exp(-0.5 * ((tt - mu) / sd) ** 2)

    st_shape = 0.5 * (np.tanh((tt - 0.05) / 0.01) - np.tanh((tt - (t_pos - 0.06)) / 0.02))
    template = (np.outer(p_amp, g(-0.17, 0.022)) + np.outer(q_amp, g(-0.03, 0.008)) + np.outer(r_amp, g(0.0, 0.012))
                + np.outer(s_amp, g(0.032, 0.011)) + np.outer(st, st_shape) + np.outer(t_amp, g(t_pos, 0.05)))
    pad = len(tt)
    sig = np.zeros((L, n + 3 * pad))
    off = int(round(0.3 * fs))
    for bt in times_a:
        c = int(round(bt * fs)) + pad - off
        sig[:, c:c + pad] += template * (1 + rng.normal(0, 0.03))
    sig = sig[:, pad:pad + n]
    time = np.arange(n) / fs
    if af:  # fibrillatory waves, strongest in V1 and the inferior leads
        w = np.array([0.3, 0.7, 0.7, 0.3, 0.7, 0.3, 1.0, 0.6, 0.4, 0.3, 0.3, 0.3])
        fw = sum(rng.uniform(0.05, 0.09) * np.sin(2 * np.pi * rng.uniform(5, 7) * time + rng.uniform(0, 2 * np.pi))
                 for _ in range(3))  # coarse fibrillation, up to ~0.3 mV peak in V1
        sig += np.outer(w, fw) * (1.4 * ev)
    wander = np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * time + rng.uniform(0, 2 * np.pi))
    sig += np.outer(rng.uniform(0.02, 0.08, size=L), wander)
    sig += rng.normal(0, 0.012, size=sig.shape)
    measured = {"hr": float(60.0 / rr_obs.mean()), "rr_sd_ms": float(1000 * rr_obs.std()), "sokolow_mv": float(sokolow)}
    return sig.T.astype(np.float64), measured


def write_ecg(path_no_ext: Path, signal: np.ndarray) -> None:
    """WFDB record (format 16, gain 1000/mV, baseline 0): the bytes ``wfdb.wrsamp`` writes, without its
    per-field pandas lookups (about 70 ms a record, most of the cohort's time)."""
    path_no_ext.parent.mkdir(parents=True, exist_ok=True)
    d = np.round(signal * 1000.0, 0)  # wfdb's adc: p * gain + baseline, rounded half to even
    if signal.ndim != 2 or signal.shape[1] != len(MIMIC_IV_ECG_LEADS) or not np.isfinite(d).all() \
            or np.abs(d).max() > 32767:
        return _write_ecg_wfdb(path_no_ext, signal)  # NaN or out of the 16-bit range: let wfdb handle it
    d = d.astype(np.int64)
    name = path_no_ext.name
    lines = [f"{name} {d.shape[1]} {ECG_FS} {d.shape[0]}"]
    for j, lead in enumerate(MIMIC_IV_ECG_LEADS):
        lines.append(f"{name}.dat 16 1000.0(0)/mV 16 0 {int(d[0, j])} {int(d[:, j].sum() % 65536)} 0 {lead}")
    (path_no_ext.parent / f"{name}.dat").write_bytes(d.astype("<i2").tobytes())
    (path_no_ext.parent / f"{name}.hea").write_text("\n".join(lines) + "\n", encoding="ascii")


def _write_ecg_wfdb(path_no_ext: Path, signal: np.ndarray) -> None:
    import wfdb

    path_no_ext.parent.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(path_no_ext.name, fs=ECG_FS, units=["mV"] * signal.shape[1], sig_name=list(MIMIC_IV_ECG_LEADS),
                p_signal=signal, fmt=["16"] * signal.shape[1], adc_gain=[1000.0] * signal.shape[1],
                baseline=[0] * signal.shape[1], write_dir=str(path_no_ext.parent))


def ecg_answer(f: dict[str, Any], m: dict[str, Any], causes: dict[str, str] | None = None) -> str:
    """ECG report; ``causes``: decoy sign -> the other cause the history gives for it."""
    causes = causes or {}
    af = f["rhythm"] == "atrial fibrillation"
    parts = [f"Rhythm: {f['rhythm']}, heart rate about {m['hr']:.0f} bpm."]
    if "sep_ecg" in causes and m["hr"] > 100:
        parts.append(f"The history attributes the tachycardia to {causes['sep_ecg']}.")
    if af:
        parts.append(f"RR intervals are irregularly irregular (SD {m['rr_sd_ms']:.0f} ms) with no discernible P waves "
                     "and a fibrillatory baseline.")
    else:
        parts.append(f"RR intervals are regular (SD {m['rr_sd_ms']:.0f} ms) and every QRS complex is preceded by a P wave.")
    axis = f["axis"]
    kind = "left axis deviation" if axis < -30 else ("right axis deviation" if axis > 90 else "normal axis")
    parts.append(f"QRS axis about {axis:+.0f} degrees ({kind}).")
    if m["sokolow_mv"] > 3.5:
        parts.append(f"QRS voltage is increased (Sokolow-Lyon {m['sokolow_mv']:.1f} mV), meeting criteria for left ventricular hypertrophy.")
        if "htn_ecg" in causes:
            parts.append(f"The history attributes the high voltage to {causes['htn_ecg']}.")
    else:
        parts.append(f"QRS voltage is normal (Sokolow-Lyon {m['sokolow_mv']:.1f} mV).")
    if f["territory"]:
        leads = ", ".join(_TERRITORIES[f["territory"]])
        parts.append(f"There is {f['st_depression'] * 10:.1f} mm ST depression with T-wave inversion in {leads} "
                     f"({f['territory']} territory), suggesting ischaemia.")
    else:
        parts.append("No significant ST deviation; T waves are upright where expected.")
    return " ".join(parts)


# --------------------------------------------------------------------------- CXR
_ZONES = {"upper": 0.33, "middle": 0.43, "lower": 0.52}  # vertical centres, above the heart shadow


def cxr_findings(p: Patient, rng: np.random.Generator, evidence: float = 1.0) -> dict[str, Any]:
    s, k = p.signs, evidence
    f: dict[str, Any] = {"ctr": float(_toward(rng.uniform(0.56, 0.64), 0.44, k) if "htn_cxr" in s else rng.uniform(0.40, 0.48))}
    if "pna_cxr" in s:
        f["opacity"] = {"side": str(rng.choice(["right", "left"])), "zone": str(rng.choice(sorted(_ZONES))),
                        "radius": float(rng.uniform(0.07, 0.10)), "intensity": float(rng.uniform(0.42, 0.55)) * k}
    else:
        f["opacity"] = None
    return f


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    from scipy.ndimage import zoom

    small = rng.standard_normal((cells, cells), dtype=np.float32)
    big = zoom(small, (shape[0] / cells, shape[1] / cells), order=1)
    return big[: shape[0], : shape[1]]


def render_cxr(f: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Grey radiograph ``[H, W]`` uint8: body, lungs, mediastinum, heart, ribs, optional opacity.

    Anatomy is drawn at half resolution and upsampled (bicubic) to ``CXR_SIZE``; pixel noise is
    added at full resolution.  Findings lie inside the central crop the preprocessing keeps.
    """
    from PIL import Image

    w, h = CXR_SIZE[0] // 2, CXR_SIZE[1] // 2
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = u / w, v / h

    def ellipse(cu: float, cv: float, a: float, b: float, edge: float = 0.02) -> np.ndarray:
        r = np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2)
        return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -30, 30)))  # soft-edged mask

    img = 0.04 + 0.30 * ellipse(0.5, 0.58, 0.46, 0.56)
    lungs = np.maximum(ellipse(0.36, 0.48, 0.125, 0.30), ellipse(0.64, 0.48, 0.125, 0.30))
    texture = 0.035 * _smooth_noise(rng, (h, w), 28)
    ribs = 0.05 * np.maximum(0, np.sin(2 * np.pi * (v * 9.0 - 2.0 * (u - 0.5) ** 2))) ** 4
    img = img - lungs * (0.20 - texture - ribs)
    img = img + 0.18 * ellipse(0.5, 0.36, 0.06, 0.22)  # mediastinum
    img = img + 0.04 * ellipse(0.5, 0.55, 0.02, 0.5)  # spine
    a = f["ctr"] * 0.36  # thorax width is 0.72 of the image: half-width of the heart
    heart = ellipse(0.55, 0.66, a, 0.10 + 0.2 * (a - 0.16))
    img = img * (1 - heart) + 0.58 * heart
    lungs = lungs * (1 - heart)  # an opacity behind the heart shadow is hidden, as on a real film
    op = f.get("opacity")
    if op:
        cu = 0.33 if op["side"] == "right" else 0.67  # the patient's right lung is on the image's left
        cu += rng.uniform(-0.02, 0.02)
        cv = _ZONES[op["zone"]] + rng.uniform(-0.02, 0.02)
        r2 = ((u - cu) ** 2 + (v - cv) ** 2) / op["radius"] ** 2
        patch = np.exp(-0.5 * r2) * (1 + 0.25 * _smooth_noise(rng, (h, w), 40))
        img = img + op["intensity"] * np.clip(patch, 0, None) * lungs
    img = np.clip(img, 0, 1) ** rng.uniform(0.9, 1.1) + rng.uniform(-0.03, 0.03)
    big = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(CXR_SIZE, Image.Resampling.BICUBIC))
    big = big + 0.012 * rng.standard_normal(big.shape, dtype=np.float32)
    return (np.clip(big, 0, 1) * 255).round().astype(np.uint8)


def write_cxr(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").save(path, format="JPEG", quality=85)


def cxr_answer(f: dict[str, Any], causes: dict[str, str] | None = None) -> str:
    """Radiograph report; ``causes``: decoy sign -> the other cause the history gives for it."""
    causes = causes or {}
    parts = ["Frontal chest radiograph."]
    if f["ctr"] > 0.5:
        parts.append(f"The cardiac silhouette is enlarged (cardiothoracic ratio about {f['ctr']:.2f}).")
        if "htn_cxr" in causes:
            parts.append(f"The history attributes the large heart shadow to {causes['htn_cxr']}.")
    else:
        parts.append(f"Heart size is normal (cardiothoracic ratio about {f['ctr']:.2f}).")
    op = f["opacity"]
    if op and "pna_cxr" in causes:
        parts.append(f"There is a focal opacity in the {op['side']} {op['zone']} zone; the history attributes it "
                     f"to {causes['pna_cxr']}.")
    elif op:
        parts.append(f"There is a focal airspace opacity in the {op['side']} {op['zone']} zone, consistent with consolidation.")
    else:
        parts.append("The lungs are clear without focal opacity.")
    parts.append("No pleural effusion or pneumothorax.")
    return " ".join(parts)


# --------------------------------------------------------------------------- labs
def sample_labs(p: Patient, rng: np.random.Generator, evidence: float = 1.0) -> dict[str, float]:
    """Measured raw lab values (missing labs are absent); ``evidence`` scales every disease's shifts."""
    d, signs, k = set(p.diseases), p.signs, evidence
    val: dict[str, float] = {}
    for item in LAB_IDS:
        _, c, s, lognormal, _, _ = _LAB_SPEC[item]
        val[item] = c * math.exp(rng.normal(0, s)) if lognormal else c + rng.normal(0, s)
    base = dict(val)

    if DM in d:
        # Uncontrolled diabetes: hyperglycaemia plus its chemistry (dilutional low sodium and
        # chloride, mild ketosis: anion gap up, bicarbonate down; osmotic diuresis: low Mg, low PO4).
        # Several labs together give a margin a small model finds, unlike one percentile alone.
        g = max(160.0, rng.normal(245, 50))
        val[GLUCOSE] = g
        val["50983"] -= 0.024 * (g - 100)
        val["50902"] -= 3
        val["50868"] += 4
        val["50882"] -= 4
        val["50804"] -= 4
        val["50971"] += 0.4
        val["50960"] -= 0.3
        val["50970"] -= 0.7
    if ARF in d:
        val[CREAT] = min(6.0, max(1.8, 3.0 * math.exp(rng.normal(0, 0.3))))
        val[UREA] = min(100.0, max(35.0, rng.normal(64, 15)))
        val["50971"] += 0.7
        val["50882"] -= 4
        val["50804"] -= 4
        val["50970"] += 1.3
        val["50868"] += 3
        val["51222"] -= 1.0
    if "sep_lab" in signs:
        val[LACTATE] = min(9.0, max(2.3, 4.0 * math.exp(rng.normal(0, 0.3))))
        val[WBC] = min(30.0, max(13.0, rng.normal(19, 4)))
        val["51256"] = min(95.0, rng.normal(86, 4))
        val["51244"] = max(2.0, rng.normal(7, 3))
        val["52135"] = val["52135"] * 4
        val["51265"] -= 70
        val["50820"] -= 0.07
        val["50882"] -= 3
        val["50802"] -= 5
    elif "pna_lab" in signs:
        val[WBC] = min(22.0, max(11.5, rng.normal(14.5, 2.5)))
        val["51256"] = min(92.0, rng.normal(80, 5))
        val["51244"] = max(4.0, rng.normal(12, 4))
    if "pna_lab" in signs:
        val["50821"] -= 15
    if k != 1.0:  # every shift from the patient's own normal value, scaled (log-normal labs in log space)
        for item in LAB_IDS:
            x, b = val[item], base[item]
            if x != b:
                val[item] = b * math.exp(k * math.log(x / b)) if (_LAB_SPEC[item][3] and x > 0 and b > 0) else b + k * (x - b)
    # Absolute counts follow the white cells and the differential.
    val["52075"] = val[WBC] * val["51256"] / 100
    val["51133"] = val[WBC] * val["51244"] / 100
    out: dict[str, float] = {}
    forced = {lab for key in (*d, *signs) for lab in _KEY_LABS.get(key, ())}
    for item in LAB_IDS:
        dec, p_missing = _LAB_SPEC[item][4:]
        if item in ("50802", "50804", "50818", "50820", "50821") and "sep_lab" in signs:
            # blood gases are drawn for septic patients
            p_missing = 0.2 if k == 1.0 else min(1.0, max(0.0, p_missing + k * (0.2 - p_missing)))
        if item in forced:
            if k < 1.0 and rng.random() < (1.0 - k) * p_missing:  # weak evidence: key labs may be missing
                continue
        elif rng.random() < p_missing:
            continue
        x = val[item]
        if item != "50802":  # base excess may be negative; concentrations stay positive
            x = max(x, 10 ** -dec)
        out[item] = round(x, dec)
    return out


def lab_answer(labs: dict[str, float], *, max_items: int = 6, causes: dict[str, str] | None = None) -> str:
    """Panel summary: counts, the most abnormal results (value, direction, reference range);
    ``causes``: decoy sign -> the other cause the history gives for it."""
    abnormal: list[tuple[float, str, float, str]] = []
    for item, x in labs.items():
        lo, hi = lab_reference_range(item)
        if x > hi or x < lo:
            _, c, s, lognormal, _, _ = _LAB_SPEC[item]
            z = (math.log(max(x, 1e-9) / c) if lognormal else (x - c)) / s
            abnormal.append((abs(z), item, x, "high" if x > hi else "low"))
    abnormal.sort(key=lambda a: -a[0])
    shown = [(i, x, hl) for _, i, x, hl in abnormal[:max_items]]
    n_missing = len(LAB_IDS) - len(labs)
    parts = [f"Laboratory panel: {len(labs)} of {len(LAB_IDS)} tests measured, {n_missing} not measured."]
    if shown:
        items = "; ".join(f"{_lab_name(i)} {_fmt(i, x)} ({hl}, reference {_fmt_range(i)})" for i, x, hl in shown)
        parts.append(f"Abnormal: {items}.")
        more = len(abnormal) - len(shown)
        parts.append(f"{more} further result(s) are outside the reference range." if more > 0
                     else "All other measured results are within reference ranges.")
    else:
        parts.append("All measured results are within reference ranges.")
    causes = causes or {}
    if "sep_lab" in causes and _high(labs, LACTATE):
        parts.append(f"The history attributes the raised lactate to {causes['sep_lab']}.")
    if "pna_lab" in causes and _high(labs, WBC):
        parts.append(f"The history attributes the raised white cells to {causes['pna_lab']}.")
    return " ".join(parts)


def _high(labs: dict[str, float], item: str) -> bool:
    return item in labs and labs[item] > lab_reference_range(item)[1]


def _fmt(item: str, x: float) -> str:
    unit, *_, dec, _ = _LAB_SPEC[item]
    return f"{x:.{dec}f} {unit}".strip()


def _fmt_range(item: str) -> str:
    lo, hi = lab_reference_range(item)
    dec = _LAB_SPEC[item][4]
    return f"{lo:.{dec}f}-{hi:.{dec}f}"


# --------------------------------------------------------------------------- disease answers
_WHY = {
    AF: "irregular RR without P waves means atrial fibrillation",
    CAD: "ST depression with T inversion means coronary artery disease",
    HTN: "high voltage and a large heart mean hypertension",
    PNA: "a focal opacity with raised white cells means pneumonia",
    SEPSIS: "raised lactate and white cells with tachycardia mean sepsis",
    ARF: "raised creatinine and urea mean acute renal failure",
    DM: "high glucose means diabetes mellitus",
}


def _lab_value(labs: dict[str, float], item: str) -> str:
    return f"{_lab_name(item)} {_fmt(item, labs[item]) if item in labs else 'not measured'}"


def _signs_visible(p: Patient, disease: str) -> bool:
    """Whether every sign of ``disease`` crosses the threshold at which the reports call it abnormal."""
    m, labs = p.ecg["measured"], p.labs
    return {
        HTN: lambda: m["sokolow_mv"] > 3.5 and p.cxr["ctr"] > 0.5,
        PNA: lambda: bool(p.cxr["opacity"]) and _high(labs, WBC),
        SEPSIS: lambda: m["hr"] > 100 and _high(labs, LACTATE) and _high(labs, WBC),
        ARF: lambda: _high(labs, CREAT) and _high(labs, UREA),
        DM: lambda: _high(labs, GLUCOSE),
    }.get(disease, lambda: True)()


def _weak_values(p: Patient, disease: str) -> str:
    m, labs, op = p.ecg["measured"], p.labs, p.cxr["opacity"]
    return {
        HTN: lambda: f"QRS voltage {m['sokolow_mv']:.1f} mV, CTR {p.cxr['ctr']:.2f}",
        PNA: lambda: f"{op['side']} {op['zone']} zone opacity, {_lab_value(labs, WBC)}" if op else _lab_value(labs, WBC),
        SEPSIS: lambda: f"rate {m['hr']:.0f} bpm, {_lab_value(labs, LACTATE)}, {_lab_value(labs, WBC)}",
        ARF: lambda: f"{_lab_value(labs, CREAT)}, {_lab_value(labs, UREA)}",
        DM: lambda: _lab_value(labs, GLUCOSE),
    }[disease]()


def _decoy_visible(p: Patient, sign: str) -> bool:
    m = p.ecg["measured"]
    return {"htn_ecg": lambda: m["sokolow_mv"] > 3.5, "htn_cxr": lambda: p.cxr["ctr"] > 0.5,
            "sep_ecg": lambda: m["hr"] > 100, "sep_lab": lambda: _high(p.labs, LACTATE),
            "pna_cxr": lambda: bool(p.cxr["opacity"]), "pna_lab": lambda: _high(p.labs, WBC)}[sign]()


def disease_answer(p: Patient, *, check_signs: bool = False) -> str:
    """Compact evidence and reasoning inside ``<think>``, then the categories inside ``<answer>``.

    Kept short (about 50-110 tokens) so that demo-sized generation budgets reach ``</answer>``.
    ``check_signs`` (every cohort but the default one): a disease whose signs fall below the reporting
    thresholds is reasoned about as weak signs with their values; decoy signs are named as not
    leading to the disease.  (At the default strength the signs are past the thresholds; the
    default cohort keeps its original wording byte for byte.)
    """
    e, m, c, labs = p.ecg, p.ecg["measured"], p.cxr, p.labs
    ecg = f"ECG: {e['rhythm']} {m['hr']:.0f} bpm"
    if e["rhythm"] == "atrial fibrillation":
        ecg += ", irregular RR, no P waves"
    if m["sokolow_mv"] > 3.5:
        ecg += f", high QRS voltage {m['sokolow_mv']:.1f} mV"
    if e["territory"]:
        ecg += f", {e['territory']} ST depression and T inversion"
    cxr = f"X-ray: {'enlarged' if c['ctr'] > 0.5 else 'normal'} heart (CTR {c['ctr']:.2f})"
    cxr += f", {c['opacity']['side']} {c['opacity']['zone']} zone opacity" if c["opacity"] else ", clear lungs"
    high = [(i, labs[i]) for i in (GLUCOSE, CREAT, UREA, WBC, LACTATE) if i in labs and labs[i] > lab_reference_range(i)[1]]
    lab = "Labs: " + (", ".join(f"{_lab_name(i)} {_fmt(i, x)}" for i, x in high) if high else "key tests normal")
    d = set(p.diseases)
    why = []
    for dis, text in _WHY.items():
        if dis in d:
            weak = check_signs and not _signs_visible(p, dis)
            why.append(f"weak signs ({_weak_values(p, dis)}) suggest {dis.lower()}" if weak else text)
    if check_signs:
        why += [_DECOY_WHY[k] for k in _SIGNS if k in p.decoys and _decoy_visible(p, k)]
    return f"<think> {ecg}. {cxr}. {lab}. So {'; '.join(why)}. </think>{format_answer(p.diseases)}"


_Q_DISEASE = (
    "ECG: <ecg>\nChest X-ray: <cxr>\nLaboratory panel: <lab>\nWhich diseases does this patient have? Reason over the evidence first.",
    "Here are the ECG <ecg>, the chest radiograph <cxr> and the blood tests <lab> of one hospital stay. "
    "Give your reasoning, then the diagnoses.",
    "Review this patient's ECG <ecg>, chest X-ray <cxr> and laboratory results <lab>, then diagnose.",
)
_Q_ECG = ("<ecg>\nDescribe this 12-lead ECG: rhythm, rate, axis, voltage and ST-T changes.",
          "Interpret the following electrocardiogram. <ecg>",
          "<ecg>\nWhat does this ECG show?")
_Q_CXR = ("<cxr>\nDescribe the findings of this chest radiograph.",
          "Report on this chest X-ray: heart size and lung fields. <cxr>",
          "<cxr>\nWhat does this chest X-ray show?")
_Q_LAB = ("<lab>\nSummarise this laboratory panel and point out abnormal results.",
          "Which of these blood tests are abnormal? <lab>",
          "<lab>\nInterpret the laboratory results.")


def _qa(rec_id: str, q: str, a: str, **refs: str) -> dict[str, Any]:
    return {"id": rec_id, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            **{k: [v] for k, v in refs.items()}}


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


def generator_options(*, n_patients: int = 240, seed: int = 0, test_fraction: float = 0.2, evidence: float = 1.0,
                      joint_diseases: str | tuple[str, ...] | list[str] | None = (),
                      decoy_rate: float = DEFAULT_DECOY_RATE) -> dict[str, Any]:
    """The validated ``generator`` block of the manifest for these options (raises DataError)."""
    if n_patients < 4:
        raise DataError(f"--n-patients {n_patients}: at least 4 patients are needed (train and test splits)")
    if not 0 < test_fraction < 1:
        raise DataError(f"test fraction {test_fraction}: allowed: strictly between 0 and 1")
    if not (isinstance(evidence, (int, float)) and 0 < evidence <= MAX_EVIDENCE):
        raise DataError(f"evidence {evidence}: allowed: a strength in (0, {MAX_EVIDENCE:g}] (1 = the default cohort)")
    if not (isinstance(decoy_rate, (int, float)) and 0 < decoy_rate <= 0.5):
        raise DataError(f"decoy rate {decoy_rate}: allowed: in (0, 0.5] (each of a joint disease's two signs "
                        "alone in that share of the patients without it)")
    return {"version": SYNTH_VERSION, "n_patients": n_patients, "seed": seed, "test_fraction": test_fraction,
            "evidence": float(evidence), "joint_diseases": list(parse_joint_diseases(joint_diseases)),
            "decoy_rate": float(decoy_rate)}


def synthesize(out: str | Path, *, n_patients: int = 240, seed: int = 0, test_fraction: float = 0.2,
               overwrite: bool = False, workers: int = 0, evidence: float = 1.0,
               joint_diseases: str | tuple[str, ...] | list[str] | None = (),
               decoy_rate: float = DEFAULT_DECOY_RATE) -> SynthSummary:
    """Write the synthetic cohort into ``out`` (see the module docstring); deterministic per seed.

    ``workers``: processes writing patients (0: up to 8, by CPU count); the output does not depend on it.
    ``evidence``, ``joint_diseases`` (names, a comma string, ``"all"``), ``decoy_rate``: see the
    module docstring; their defaults write the original cohort.

    The cohort is written to a temporary sibling directory and renamed into place, so ``out``
    never holds a half-written cohort.  An existing non-empty ``out`` is replaced only with
    ``overwrite`` and only when it is a medtvt synthetic cohort.
    """
    gen = generator_options(n_patients=n_patients, seed=seed, test_fraction=test_fraction, evidence=evidence,
                            joint_diseases=joint_diseases, decoy_rate=decoy_rate)
    evidence, joint, decoy_rate = gen["evidence"], tuple(gen["joint_diseases"]), gen["decoy_rate"]
    default_cohort = evidence == 1.0 and not joint
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DataError(f"{out} exists and is not empty; pass --overwrite to replace a synthetic cohort there")
        if not (out / MANIFEST_NAME).is_file():
            raise DataError(f"{out} is not a medtvt dataset (no {MANIFEST_NAME}); refusing to delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        patients = make_patients(n_patients, seed, test_fraction)
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
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                patients = list(pool.map(_render_patient, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
        _measure_every_lab(patients, seed)
        _write_labs_csv(tmp / LABS_CSV, patients)
        _write_qa(tmp, patients, seed, check_signs=not default_cohort)
        train = [p for p in patients if p.split == "train"]
        test = [p for p in patients if p.split == "test"]
        prevalence = {d: sum(d in p.diseases for p in patients) for d in DISEASES}
        decoys = {d: {_SIGNS[k][1]: sum(k in p.decoys for p in patients) for k in _signs_of(d)} for d in joint}
        write_manifest(tmp, {
            "name": "medtvt-synthetic",
            "generator": gen,
            "qa": {"pt": list(PT_FILES), "train": TRAIN_FILE, "test": TEST_FILE},
            "files": {"labs_csv": LABS_CSV, "ecg_dir": ECG_DIR, "cxr_dir": CXR_DIR},
            "splits": {"train": [p.subject_id for p in train], "test": [p.subject_id for p in test]},
            "prevalence": {"all": prevalence,
                           "train": {d: sum(d in p.diseases for p in train) for d in DISEASES},
                           "test": {d: sum(d in p.diseases for p in test) for d in DISEASES}},
            "evidence": evidence_table(joint),
            "decoys": decoys,
        })
        # The readers' training statistics (lab mean percentiles) are fitted by prepare_stats when a run
        # first opens the splits, and stored in this manifest then.
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    return SynthSummary(out, n_patients, len(train), len(test), prevalence, secs, joint, decoys)


def ensure_synthetic(out: str | Path, *, n_patients: int = 240, seed: int = 0, test_fraction: float = 0.2,
                     workers: int = 0, evidence: float = 1.0,
                     joint_diseases: str | tuple[str, ...] | list[str] | None = (),
                     decoy_rate: float = DEFAULT_DECOY_RATE) -> Path:
    """Reuse the cohort in ``out`` when its manifest records exactly these generator options, else
    (re)generate it (a cohort from before the options existed is regenerated once: same files)."""
    out = Path(out)
    opts: dict[str, Any] = {"n_patients": n_patients, "seed": seed, "test_fraction": test_fraction,
                            "evidence": evidence, "joint_diseases": joint_diseases, "decoy_rate": decoy_rate}
    want = generator_options(**opts)
    try:
        man = read_manifest(out)
    except DataError:
        man = None
    if man is not None and man.get("generator") == want:
        return out
    synthesize(out, overwrite=True, workers=workers, **opts)
    return out


def _measure_every_lab(patients: list[Patient], seed: int) -> None:
    """Give each lab at least one measured training value (rare labs can miss in small cohorts),
    so that its training percentiles and mean exist."""
    rng = np.random.default_rng([seed, 3])
    train = [p for p in patients if p.split == "train"]
    for item in LAB_IDS:
        if not any(item in p.labs for p in train):
            _, c, s, lognormal, dec, _ = _LAB_SPEC[item]
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
    pt_ecg, pt_cxr, pt_lab, dis_train, dis_test = [], [], [], [], []
    for p in patients:
        lab_ref = str(p.hadm_id)
        q = _Q_DISEASE[int(rng.integers(len(_Q_DISEASE)))]
        rec = _qa(f"{p.subject_id}-disease", q, disease_answer(p, check_signs=check_signs), ECG=p.ecg_ref, image=p.cxr_ref, lab=lab_ref)
        (dis_test if p.split == "test" else dis_train).append(rec)
        if p.split != "train":
            continue  # physiological QA only for training patients: test patients stay unseen
        pt_ecg.append(_qa(f"{p.subject_id}-ecg", _Q_ECG[int(rng.integers(3))], ecg_answer(p.ecg, p.ecg["measured"], p.decoys), ECG=p.ecg_ref))
        pt_cxr.append(_qa(f"{p.subject_id}-cxr", _Q_CXR[int(rng.integers(3))], cxr_answer(p.cxr, p.decoys), image=p.cxr_ref))
        pt_lab.append(_qa(f"{p.subject_id}-lab", _Q_LAB[int(rng.integers(3))], lab_answer(p.labs, causes=p.decoys), lab=lab_ref))
    for name, recs in zip((*PT_FILES, TRAIN_FILE, TEST_FILE), (pt_ecg, pt_cxr, pt_lab, dis_train, dis_test)):
        write_qa_file(root / name, recs)
