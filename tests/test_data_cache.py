"""Feature cache: hits, misses, invalidation (weights, preprocessing, content), corruption, atomicity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pytest
import safetensors.torch
import torch
import wfdb
from torch import nn

from medtvt_core.contracts import Encoder, PluginConfig
from medtvt_core.build import build_readers
from medtvt_core.data import FeatureCache, encode_dataset, open_splits
from medtvt_core.data.synth import PT_FILES, TEST_FILE, TRAIN_FILE, synthesize
from medtvt_core.plugins import build_catalog
from medtvt_plugins.readers import cxr as cxr_reader, ecg as ecg_reader, lab as lab_reader


class _Cfg(PluginConfig):
    pass


class Tiny(Encoder):
    """Frozen average-pool + linear backbone ([B, *shape] -> [B, 4, 3]); counts encoded samples."""

    config_class: ClassVar[type[PluginConfig]] = _Cfg

    def __init__(self, modality: str, shape: tuple[int, ...], seed: int = 0):
        super().__init__()
        self.modality = modality  # type: ignore[misc]
        torch.manual_seed(seed)
        self.input_shape, self.feature_shape, self.pooled_dim, self.num_tokens = shape, (4, 3), 5, 1
        self.pool_in = nn.AdaptiveAvgPool1d(16)
        self.backbone = nn.Linear(16, 12)
        self.head = nn.Linear(3, 5)
        self.calls = 0
        self.freeze_backbone()

    def encode(self, x):
        self.calls += x.shape[0]
        return self.backbone(self.pool_in(x.flatten(1)[:, None])[:, 0]).view(-1, 4, 3)

    def pool(self, f):
        return self.head(f.mean(1, keepdim=True))

    def head_parameters(self):
        return list(self.head.parameters())


SHAPES = {"ecg": (12, 1000), "cxr": (3, 224, 224), "lab": (100,)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "data"
    synthesize(root, n_patients=8, seed=5, test_fraction=0.25, workers=1)
    return root


@pytest.fixture(scope="module")
def catalog():
    return build_catalog([ecg_reader, cxr_reader, lab_reader], autoload=False)


def make(root, cache_dir, catalog, *, encoders=None, options=None, names=("ecg", "cxr", "lab")):
    mods = build_readers(list(names), options, catalog)
    encoders = encoders or {m: Tiny(m, SHAPES[m]) for m in names}
    cache = FeatureCache(cache_dir)
    sp = open_splits(root, modalities=mods, pt_files=PT_FILES, train_file=TRAIN_FILE, test_file=TEST_FILE,
                     catalog=catalog, encoders=encoders, cache=cache)
    return sp, encoders, cache


def feats(ds, i=0):
    return ds[i]["features"]


def test_hits_misses_and_random_crop_bypass(cohort, tmp_path, catalog):
    sp, enc, cache = make(cohort, tmp_path, catalog)
    train = sp["train"]
    assert train.cached_modalities == ["ecg", "lab"]  # CXR random crops are not cached in training
    first = [train[i] for i in range(len(train))]
    assert cache.misses == 2 * len(train) and cache.hits == 0
    assert set(first[0]["features"]) == {"ecg", "lab"} and set(first[0]["inputs"]) == {"cxr"}
    x = train.modalities["ecg"].load(train.records[0].ref("ECG"), root=cohort)
    assert torch.allclose(first[0]["features"]["ecg"], enc["ecg"].encode(x[None])[0], atol=1e-6)
    again = [train[i] for i in range(len(train))]
    assert cache.hits == 2 * len(train) and torch.equal(again[0]["features"]["lab"], first[0]["features"]["lab"])
    batch = train.collator()(again[:3])
    assert batch["modality_features"]["ecg"].shape == (3, 4, 3) and batch["modality_inputs"]["cxr"].shape[0] == 3
    assert sp["test"].cached_modalities == ["ecg", "cxr", "lab"]  # evaluation views are deterministic


def test_encode_dataset_batches_then_everything_hits(cohort, tmp_path, catalog):
    sp, enc, cache = make(cohort, tmp_path, catalog)
    pt = sp["pt"]
    report = encode_dataset(pt, batch_size=4)
    n = len(pt.references("ecg"))
    assert report["ecg"] == {"cached": 0, "encoded": n, "failed": []} and "cxr" not in report
    assert enc["ecg"].calls == n and enc["lab"].calls == n
    assert encode_dataset(pt, batch_size=4)["lab"]["cached"] == n  # second pass: nothing to do
    calls = enc["ecg"].calls
    for i in range(len(pt)):
        pt[i]
    assert enc["ecg"].calls == calls and cache.misses == 0
    # The training disease records reuse the same ECGs and labs: no new encoding.
    assert encode_dataset(sp["train"])["ecg"]["encoded"] == 0


def test_invalidation_by_weights_preprocessing_and_content(cohort, tmp_path, catalog):
    sp, enc, cache = make(cohort, tmp_path, catalog, names=("ecg",))
    ds = sp["test"]
    base = feats(ds)["ecg"]
    assert cache.misses == 1
    original = enc["ecg"].backbone.weight.detach().clone()
    with torch.no_grad():  # new weights: new identity, new entries
        enc["ecg"].backbone.weight.add_(0.5)
    sp2, _, cache2 = make(cohort, tmp_path, catalog, encoders=enc, names=("ecg",))
    assert not torch.allclose(feats(sp2["test"])["ecg"], base) and cache2.misses == 1
    with torch.no_grad():
        enc["ecg"].backbone.weight.copy_(original)
    sp3, _, cache3 = make(cohort, tmp_path, catalog, encoders=enc, names=("ecg",), options={"ecg": {"crop": "center"}})
    feats(sp3["test"])
    assert cache3.misses == 1  # another preprocessing config: re-encoded
    sp4, _, cache4 = make(cohort, tmp_path, catalog, encoders=enc, names=("ecg",))
    assert torch.equal(feats(sp4["test"])["ecg"], base) and cache4.hits == 1  # back to the original: hit

    # Same path, new content: re-encoded.
    rec = cohort / sp4["test"].records[0].ref("ECG")
    sig, fields = wfdb.rdsamp(str(rec))
    try:
        wfdb.wrsamp(rec.name, fs=500, units=["mV"] * 12, sig_name=fields["sig_name"], p_signal=sig * 0.5,
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(rec.parent))
        sp5, _, cache5 = make(cohort, tmp_path, catalog, encoders=enc, names=("ecg",))
        assert not torch.equal(feats(sp5["test"])["ecg"], base) and cache5.misses == 1
    finally:
        wfdb.wrsamp(rec.name, fs=500, units=["mV"] * 12, sig_name=fields["sig_name"], p_signal=sig,
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(rec.parent))


def test_lab_stats_are_part_of_the_key(cohort, tmp_path, catalog):
    sp, enc, cache = make(cohort, tmp_path, catalog, names=("lab",))
    ds = sp["test"]
    feats(ds)
    lab = ds.modalities["lab"]
    lab.set_stats({**lab.stats, "mean_percentile": {k: 0.5 for k in lab.stats["mean_percentile"]}})
    feats(ds)
    assert cache.misses == 2


def test_corrupt_entry_is_reencoded_with_a_warning(cohort, tmp_path, catalog):
    sp, enc, cache = make(cohort, tmp_path, catalog, names=("ecg",))
    ds = sp["test"]
    good = feats(ds)["ecg"]
    (entry,) = list(Path(tmp_path, "ecg").rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match="unreadable.*re-encoding"):
        again = feats(ds)["ecg"]
    assert torch.equal(again, good) and cache.corrupt == 1 and cache.misses == 2
    assert torch.equal(feats(ds)["ecg"], good) and cache.hits == 1


def test_interrupted_write_leaves_no_entry(cohort, tmp_path, catalog, monkeypatch):
    sp, enc, cache = make(cohort, tmp_path, catalog, names=("ecg",))
    ds = sp["test"]
    real = safetensors.torch.save_file

    def dies_halfway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:30])
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        feats(ds)
    assert not [p for p in Path(tmp_path).rglob("*") if p.is_file()]  # neither an entry nor a temp file
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert feats(ds)["ecg"].shape == (4, 3) and len(list(Path(tmp_path).rglob("*.safetensors"))) == 1


def test_failed_inputs_are_dropped_when_skipping(cohort, tmp_path, catalog):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(cohort, root)
    mods = build_readers(["ecg"], None, catalog)
    enc = {"ecg": Tiny("ecg", SHAPES["ecg"])}
    sp = open_splits(root, modalities=mods, test_file=TEST_FILE, catalog=catalog, encoders=enc,
                     cache=FeatureCache(tmp_path / "c"), on_bad_sample="skip")
    ds = sp["test"]
    dat = (root / ds.records[0].ref("ECG")).with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:1000])
    report = encode_dataset(ds)
    assert len(report["ecg"]["failed"]) == 1 and "holds" in report["ecg"]["failed"][0][1]
    assert len(ds) == 1 and len(ds.skipped) == 1 and os.fspath(dat.name[:-4]) in str(ds.skipped[0])
