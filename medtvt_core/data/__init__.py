"""Data layer: MedTVT-QA schema, modality datasets and collator, feature cache, synthetic cohort, checks."""

from .cache import FeatureCache, encode_dataset, encode_frozen
from .check import CheckReport, check_dataset
from .dataset import (Collator, QADataset, SkippedSample, all_finite, build_modalities, open_splits,
                      registered_modalities)
from .labels import DISEASES, ICD10_PREFIXES, format_answer, icd10_category, parse_answer, unknown_labels
from .manifest import MANIFEST_NAME, prepare_stats, read_manifest, write_manifest
from .schema import QARecord, RecordProblem, read_qa_file, write_qa_file
from .synth import ensure_synthetic, synthesize

__all__ = [
    "CheckReport", "Collator", "DISEASES", "FeatureCache", "ICD10_PREFIXES", "MANIFEST_NAME", "QADataset", "QARecord",
    "RecordProblem", "SkippedSample", "all_finite", "build_modalities", "check_dataset", "encode_dataset",
    "encode_frozen", "ensure_synthetic", "format_answer", "icd10_category", "open_splits", "parse_answer",
    "prepare_stats", "read_manifest", "read_qa_file", "registered_modalities", "synthesize", "unknown_labels",
    "write_manifest", "write_qa_file",
]
