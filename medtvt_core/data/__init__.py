"""Data layer: MedTVT-QA schema, modality datasets and collator, feature cache, synthetic cohort, checks.

The names below load on first use (PEP 562), so importing one light submodule (e.g.
``medtvt_core.data.labels`` from the configuration) does not import the dataset, the cache and torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

#: public name -> the submodule that defines it
_HOME = {
    "FeatureCache": "cache", "encode_dataset": "cache", "encode_frozen": "cache",
    "CheckReport": "check", "check_dataset": "check",
    "Collator": "dataset", "QADataset": "dataset", "SkippedSample": "dataset", "all_finite": "dataset",
    "open_splits": "dataset", "registered_modalities": "dataset",
    "DISEASES": "labels", "ICD10_PREFIXES": "labels", "format_answer": "labels", "icd10_category": "labels",
    "parse_answer": "labels", "unknown_labels": "labels",
    "MANIFEST_NAME": "manifest", "prepare_stats": "manifest", "read_manifest": "manifest", "write_manifest": "manifest",
    "QARecord": "schema", "RecordProblem": "schema", "read_qa_file": "schema", "write_qa_file": "schema",
    "ensure_synthetic": "synth", "synthesize": "synth",
}
__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
