"""The patient model: the cohort's constants, each disease's evidence and signs, decoys, lab specifications, patients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..formats import SYMILE_LABS, mimic_cxr_path, mimic_ecg_path
from ..labels import DISEASES
from .options import JOINT_CAPABLE

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
VAL_FILE = "qa/disease_val.json"

CAD, ARF, HTN, AF, PNA, DM, SEPSIS = DISEASES

# --------------------------------------------------------------------------- evidence model
#: Modalities (reader names) whose files carry each disease's evidence.
EVIDENCE_MODALITIES: dict[str, tuple[str, ...]] = {
    CAD: ("ecg",), ARF: ("lab",), HTN: ("ecg", "cxr"), AF: ("ecg",), PNA: ("cxr", "lab"), DM: ("lab",),
    SEPSIS: ("ecg", "lab"),
}

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
_LAB_PARAMS: dict[str, tuple[str, float, float, bool, int, float]] = {
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
assert set(_LAB_PARAMS) == set(SYMILE_LABS)
LAB_IDS: tuple[str, ...] = tuple(sorted(SYMILE_LABS))

GLUCOSE, CREAT, UREA, WBC, LACTATE = "50931", "50912", "51006", "51301", "50813"
# Labs whose disease (or lab sign) always gets them measured (a diabetic's glucose, a septic lactate).
_KEY_LABS = {DM: (GLUCOSE,), ARF: (CREAT, UREA), "sep_lab": (LACTATE, WBC), "pna_lab": (WBC,)}
_SHORT = {GLUCOSE: "glucose", CREAT: "creatinine", UREA: "urea nitrogen", WBC: "white cells", LACTATE: "lactate",
          "50971": "potassium", "50882": "bicarbonate", "51256": "neutrophils", "51265": "platelets", "50820": "pH"}


def lab_reference_range(item: str) -> tuple[float, float]:
    _, c, s, lognormal, _, _ = _LAB_PARAMS[item]
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


def make_val_patients(n: int, seed: int, after: list[Patient]) -> list[Patient]:
    """``n`` validation patients, indexed after ``after`` and drawn from a stream of their own
    (seed, 5), so the other patients are the same with or without them; their ids avoid ``after``'s."""
    rng = np.random.default_rng([seed, 5])
    taken = [{getattr(p, k) for p in after} for k in ("subject_id", "hadm_id", "ecg_study", "cxr_study")]
    cols = []
    for (lo, hi), used in zip(((10_000_000, 20_000_000), (20_000_000, 30_000_000), (40_000_000, 50_000_000),
                               (50_000_000, 60_000_000)), taken):
        ids = [x for x in _ids(rng, n + len(used), lo, hi) if x not in used]  # enough left after the collisions
        cols.append(ids[:n])
    start = len(after)
    return [Patient(start + i, cols[0][i], cols[1][i], cols[2][i], cols[3][i],
                    "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5)), sample_diseases(rng), split="val")
            for i in range(n)]


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
