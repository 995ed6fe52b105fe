"""Dataset + collator over a generated cohort: masks, subsets, bad samples, plugin modalities, stats."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from pydantic import Field

from medtvt_core import hookimpl
from medtvt_core.contracts import ModalityReader, PluginConfig
from medtvt_core.build import build_readers
from medtvt_core.data import open_splits, read_manifest
from medtvt_core.data.synth import PT_FILES, TEST_FILE, TRAIN_FILE, synthesize
from medtvt_core.errors import ConfigError, DataError
from medtvt_core.plugins import build_catalog
from medtvt_plugins.readers import cxr as cxr_reader, ecg as ecg_reader, lab as lab_reader


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "data"
    synthesize(root, n_patients=12, seed=3, test_fraction=0.25, workers=1)
    return root


@pytest.fixture(scope="module")
def catalog():
    return build_catalog([ecg_reader, cxr_reader, lab_reader], autoload=False)


def splits(root: Path, names=("ecg", "cxr", "lab"), catalog=None, **kw: Any):
    mods = build_readers(list(names), catalog=catalog)
    return open_splits(root, modalities=mods, pt_files=PT_FILES, train_file=TRAIN_FILE, test_file=TEST_FILE,
                       catalog=catalog, **kw)


def test_items_and_batches(cohort, catalog):
    sp = splits(cohort, catalog=catalog)
    assert (len(sp["pt"]), len(sp["train"]), len(sp["test"])) == (27, 9, 3)
    item = sp["train"][0]
    assert set(item) == {"id", "prompt", "answer", "labels", "present", "inputs", "features"}
    assert item["present"] == {"ecg": True, "cxr": True, "lab": True} and not item["features"]
    assert {m: tuple(t.shape) for m, t in item["inputs"].items()} == {"ecg": (12, 1000), "cxr": (3, 224, 224), "lab": (100,)}
    assert "<ecg>" in item["prompt"] and item["labels"] and item["answer"].endswith("</answer>")

    pt = sp["pt"]
    items = [pt[i] for i in (0, 9, 18, 1)]  # ecg, cxr, lab, ecg (PT files are one modality each)
    batch = pt.collator()(items)
    assert batch["modality_names"] == ["ecg", "cxr", "lab"]
    assert batch["modality_mask"].tolist() == [[True, False, False], [False, True, False], [False, False, True],
                                               [True, False, False]]
    assert {m: t.shape[0] for m, t in batch["modality_inputs"].items()} == {"ecg": 2, "cxr": 1, "lab": 1}
    assert torch.equal(batch["modality_inputs"]["ecg"][1], items[3]["inputs"]["ecg"])
    assert batch["ids"] == [it["id"] for it in items] and batch["n_skipped"] == 0 and batch["labels"][0] == []
    assert pickle.loads(pickle.dumps(pt)).records[0].id == pt.records[0].id  # DataLoader workers can receive it


def test_modality_subset_masks_and_placeholder_text(cohort, catalog):
    sp = splits(cohort, ("lab", "ecg"), catalog=catalog)
    assert sp["pt"].n_without_modality == 9 and len(sp["pt"]) == 18  # CXR-only PT records carry nothing usable
    item = sp["train"][0]
    assert "(cxr not available)" in item["prompt"] and "<cxr>" not in item["prompt"] and "<lab>" in item["prompt"]
    batch = sp["train"].collator()([sp["train"][0], sp["train"][1]])
    assert batch["modality_names"] == ["lab", "ecg"] and batch["modality_mask"].all()
    assert set(batch["modality_inputs"]) == {"lab", "ecg"}


def test_stats_come_from_the_manifest(cohort, catalog, monkeypatch):
    stored = read_manifest(cohort)["stats"]["lab"]["stats"]
    assert len(stored["mean_percentile"]) == 50 and stored["n_train_rows"] == 9

    def no_fit(self, refs, root):
        raise AssertionError("stats must be restored from the manifest, not recomputed")

    monkeypatch.setattr(lab_reader.LabModality, "fit", no_fit)
    sp = splits(cohort, catalog=catalog)
    assert sp["train"].modalities["lab"].stats["mean_percentile"] == stored["mean_percentile"]


def test_random_crops_depend_on_seed_epoch_index(cohort, catalog):
    sp = splits(cohort, ("cxr",), catalog=catalog)
    ds = sp["train"]
    a = ds[0]["inputs"]["cxr"]
    assert torch.equal(a, ds[0]["inputs"]["cxr"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0]["inputs"]["cxr"])
    test = sp["test"]
    assert torch.equal(test[0]["inputs"]["cxr"], test[0]["inputs"]["cxr"])


@pytest.fixture
def broken(cohort, tmp_path) -> Path:
    """A copy of the cohort with one schema error, one missing file and one JPEG cut in half."""
    root = tmp_path / "broken"
    shutil.copytree(cohort, root)
    recs = json.loads((root / TRAIN_FILE).read_text())
    recs[0]["messages"][0]["content"] = recs[0]["messages"][0]["content"].replace("<ecg>", "the ECG")
    recs[1]["ECG"] = ["mimic-iv-ecg/files/p0000/p00000000/s0/none"]
    jpg = root / recs[2]["image"][0]
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (root / TRAIN_FILE).write_text(json.dumps(recs))
    return root


def test_on_bad_sample_skip_counts_and_logs(broken, catalog, caplog):
    sp = splits(broken, catalog=catalog, on_bad_sample="skip")
    ds = sp["train"]
    assert len(ds) == 7 and len(ds.skipped) == 2  # schema error and missing file, found up front
    reasons = [str(s) for s in ds.skipped]
    assert "disease_train.json[0]" in reasons[0] and "has no <ecg> placeholder" in reasons[0]
    assert "does not exist" in reasons[1]
    items = [ds[i] for i in range(len(ds))]
    assert sum(it is None for it in items) == 1 and len(ds.skipped) == 3  # the half JPEG, found when read
    assert "unreadable image" in str(ds.skipped[-1]) and "skipping" in caplog.text
    batch = ds.collator()(items)
    assert batch["n_skipped"] == 1 and len(batch["ids"]) == 6 and batch["modality_mask"].shape == (6, 3)


def test_on_bad_sample_fail_raises_one_line(broken, catalog):
    with pytest.raises(DataError, match=r"disease_train.json: record 0: field 'messages\[0\].content'"):
        splits(broken, catalog=catalog)
    recs = json.loads((broken / TRAIN_FILE).read_text())
    (broken / TRAIN_FILE).write_text(json.dumps(recs[2:]))
    ds = splits(broken, catalog=catalog)["train"]
    with pytest.raises(DataError, match=r"disease_train.json\[0\] \(.*\): field 'image': image .* unreadable image"):
        ds[0]


def test_bad_modality_options_are_config_errors(catalog):
    with pytest.raises(ConfigError, match=r"data.modality_options.ecg.options \(ecg\): nan_policy"):
        build_readers(["ecg"], {"ecg": {"nan_policy": "ignore"}}, catalog)
    with pytest.raises(ConfigError, match="options for cxr but the modalities in use are ecg"):
        build_readers(["ecg"], {"cxr": {}}, catalog)
    with pytest.raises(Exception, match="unknown modalities plugin 'eeg'"):
        build_readers(["eeg"], catalog=catalog)


# ---------------------------------------------------------------- a modality from a plugin
class PpgConfig(PluginConfig):
    length: int = Field(64, description="samples kept")


class PpgModality(ModalityReader):
    """Photoplethysmogram stored as .npy (a modality the loaders have never heard of)."""

    name: ClassVar[str] = "ppg"
    placeholder: ClassVar[str] = "<ppg>"
    record_field: ClassVar[str] = "PPG"
    config_class: ClassVar[type[PluginConfig]] = PpgConfig

    def __init__(self, length: int = 64):
        self.config = PpgConfig(length=length)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, self.config.length)

    def load(self, ref, *, root, train=False, generator=None):
        return torch.from_numpy(np.load(Path(root) / ref)[: self.config.length].astype(np.float32))[None]


@hookimpl
def _register_ppg(register):
    register("ppg", PpgModality, config=PpgConfig)


def test_plugin_modality_needs_no_loader_change(cohort, tmp_path):
    plugin = SimpleNamespace(medtvt_register_modalities=_register_ppg, __name__="ppg_plugin")
    cat = build_catalog([ecg_reader, cxr_reader, lab_reader, plugin], autoload=False)
    root = tmp_path / "ppg"
    shutil.copytree(cohort, root)
    np.save(root / "p1.npy", np.arange(100.0))
    recs = json.loads((root / TEST_FILE).read_text())
    recs[0]["PPG"] = ["p1.npy"]
    recs[0]["messages"][0]["content"] += " Pulse wave: <ppg>"
    (root / TEST_FILE).write_text(json.dumps(recs))
    mods = build_readers(["ecg", "ppg"], catalog=cat)
    ds = open_splits(root, modalities=mods, test_file=TEST_FILE, catalog=cat)["test"]
    batch = ds.collator()([ds[0], ds[1]])
    assert batch["modality_names"] == ["ecg", "ppg"]
    assert batch["modality_mask"].tolist() == [[True, True], [True, False]]
    assert batch["modality_inputs"]["ppg"].shape == (1, 1, 64)
    assert "(cxr not available)" in batch["prompts"][0] and "<ppg>" in batch["prompts"][0]
    # Without the plugin, the unknown field and placeholder are plain data, never an error.
    plain = open_splits(root, modalities=build_readers(["ecg"], catalog=cat), test_file=TEST_FILE,
                        known={"ecg": ecg_reader.EcgModality})["test"]
    assert "<ppg>" in plain[0]["prompt"]
