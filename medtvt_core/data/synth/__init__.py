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
    qa/disease_val.json                                 only with val_patients: a validation split's disease QA

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


Modules: :mod:`.patients` (constants, evidence model, signs and decoys, lab specifications,
patients), :mod:`.ecg`, :mod:`.cxr`, :mod:`.labs` (each modality's findings, rendering, file and
report), :mod:`.reports` (the disease answers and questions), :mod:`.cohort` (writing a cohort).
"""

from ...lazy import lazy_exports

#: public name -> the submodule that defines it (loaded on first use, PEP 562: the configuration
#: imports the light :mod:`.options` without the renderers)
_HOME = {
    "SynthSummary": "cohort", "ensure_synthetic": "cohort", "generator_options": "cohort", "synthesize": "cohort",
    "DEFAULT_DECOY_RATE": "options", "JOINT_CAPABLE": "options", "MAX_EVIDENCE": "options", "SynthConfig": "options",
    "parse_joint_diseases": "options",
    "CXR_DIR": "patients", "ECG_DIR": "patients", "EVIDENCE_MODALITIES": "patients", "LAB_IDS": "patients",
    "LABS_CSV": "patients", "PT_FILES": "patients", "SYNTH_VERSION": "patients", "TEST_FILE": "patients",
    "TRAIN_FILE": "patients", "VAL_FILE": "patients", "Patient": "patients", "evidence_table": "patients",
    "make_patients": "patients", "make_val_patients": "patients",
}
__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
