"""Constants of the real on-disk formats (MIMIC-IV-ECG, MIMIC-CXR-JPG, Symile-MIMIC)."""

from __future__ import annotations

#: Lead order of MIMIC-IV-ECG records (aVF before aVL).
MIMIC_IV_ECG_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
#: Lead order of PTB-XL and most other datasets (aVL before aVF).
PTB_XL_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The 50 Symile-MIMIC labs: MIMIC-IV item id -> name.
SYMILE_LABS: dict[str, str] = {
    "50802": "Base Excess", "50804": "Calculated Total CO2", "50813": "Lactate", "50818": "pCO2",
    "50820": "pH", "50821": "pO2", "50861": "Alanine Aminotransferase (ALT)", "50862": "Albumin",
    "50863": "Alkaline Phosphatase", "50868": "Anion Gap", "50878": "Asparate Aminotransferase (AST)",
    "50882": "Bicarbonate", "50885": "Bilirubin, Total", "50893": "Calcium, Total", "50902": "Chloride",
    "50910": "Creatine Kinase (CK)", "50912": "Creatinine", "50931": "Glucose", "50934": "H", "50947": "I",
    "50960": "Magnesium", "50970": "Phosphate", "50971": "Potassium", "50983": "Sodium", "51006": "Urea Nitrogen",
    "51133": "Absolute Lymphocyte Count", "51146": "Basophils", "51200": "Eosinophils", "51221": "Hematocrit",
    "51222": "Hemoglobin", "51237": "INR(PT)", "51244": "Lymphocytes", "51248": "MCH", "51249": "MCHC",
    "51250": "MCV", "51254": "Monocytes", "51256": "Neutrophils", "51265": "Platelet Count", "51274": "PT",
    "51275": "PTT", "51277": "RDW", "51279": "Red Blood Cells", "51301": "White Blood Cells", "51678": "L",
    "52069": "Absolute Basophil Count", "52073": "Absolute Eosinophil Count", "52074": "Absolute Monocyte Count",
    "52075": "Absolute Neutrophil Count", "52135": "Immature Granulocytes", "52172": "RDW-SD",
}

#: The six CheXpert label columns of the Symile-MIMIC split CSVs (1 positive, 0 negative,
#: -1 uncertain, empty = not mentioned).
SYMILE_CHEXPERT: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Edema", "Lung Opacity", "No Finding", "Pleural Effusion")


def mimic_ecg_path(subject_id: int, study_id: int) -> str:
    """``files/pXXXX/pXXXXXXXX/sXXXXXXXX/XXXXXXXX`` (record path without extension, MIMIC-IV-ECG)."""
    s = str(subject_id)
    return f"files/p{s[:4]}/p{s}/s{study_id}/{study_id}"


def mimic_cxr_path(subject_id: int, study_id: int, dicom_id: str) -> str:
    """``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` (MIMIC-CXR-JPG)."""
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}/{dicom_id}.jpg"
