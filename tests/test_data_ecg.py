"""ECG reader on WFDB records written with wfdb.wrsamp (no mocked formats)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb
from pydantic import ValidationError
from scipy.signal import resample

from medtvt_core.data.formats import MIMIC_IV_ECG_LEADS, PTB_XL_LEADS
from medtvt_core.errors import DataError
from medtvt_plugins.readers.ecg import EcgModality


def write(root: Path, name: str, sig: np.ndarray, leads, fs: float = 500) -> str:
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=sig, fmt=["16"] * len(leads),
                adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads), write_dir=str(root))
    return name


def signal(leads, fs: float = 500, seconds: float = 10, *, seed: int = 0) -> np.ndarray:
    """Lead k: DC offset 0.1*k plus a 3 Hz sine, so each lead is identifiable after resampling."""
    t = np.arange(int(round(fs * seconds))) / fs
    rng = np.random.default_rng(seed)
    return np.stack([0.1 * k + 0.3 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)) for k in range(len(leads))], axis=1)


def test_mimic_record_shape_values_and_resampling(tmp_path):
    sig = signal(MIMIC_IV_ECG_LEADS)
    ref = write(tmp_path, "r1", sig, MIMIC_IV_ECG_LEADS)
    x = EcgModality().load(ref, root=tmp_path)
    assert x.shape == (12, 1000) and str(x.dtype) == "torch.float32"
    expected = resample(np.round(sig * 1000) / 1000, 1000, axis=0).T  # what a Fourier resampler must give
    np.testing.assert_allclose(x.numpy(), expected, atol=2e-4)


def test_ptbxl_order_file_is_reordered_by_name(tmp_path):
    sig = signal(PTB_XL_LEADS)
    ref = write(tmp_path, "ptb", sig, [n.lower() if n.startswith("aV") else n for n in PTB_XL_LEADS])
    x = EcgModality().load(ref, root=tmp_path).numpy()
    # Row i of the output must be the file's lead named MIMIC_IV_ECG_LEADS[i] (DC offset 0.1 * file index).
    for i, lead in enumerate(MIMIC_IV_ECG_LEADS):
        assert x[i].mean() == pytest.approx(0.1 * PTB_XL_LEADS.index(lead), abs=0.01), lead
    y = EcgModality(leads=PTB_XL_LEADS).load(ref, root=tmp_path).numpy()
    np.testing.assert_allclose(y[4], x[5])  # aVL moves to position 4 in PTB-XL order


def test_extra_leads_are_ignored_and_ext_accepted(tmp_path):
    leads = ["X", *MIMIC_IV_ECG_LEADS, "vx"]
    ref = write(tmp_path, "extra", signal(leads), leads)
    x = EcgModality().load(ref + ".hea", root=tmp_path)
    assert x.shape == (12, 1000)
    assert x[0].mean().item() == pytest.approx(0.1, abs=0.01)  # lead I is file index 1


@pytest.mark.parametrize("fs", [250, 1000, 360])
def test_other_sampling_rates(tmp_path, fs):
    t = np.arange(fs * 10) / fs
    sig = np.stack([np.sin(2 * np.pi * 5 * t)] * 12, axis=1)
    ref = write(tmp_path, f"fs{fs}", sig, MIMIC_IV_ECG_LEADS, fs=fs)
    x = EcgModality().load(ref, root=tmp_path).numpy()
    assert x.shape == (12, 1000)
    spectrum = np.abs(np.fft.rfft(x[0]))
    assert np.argmax(spectrum) == 50  # 5 Hz over 10 s


def test_two_lead_record_is_rejected(tmp_path):
    ref = write(tmp_path, "two", signal(["I", "II"]), ["I", "II"])
    with pytest.raises(DataError, match=r"missing lead\(s\) III, aVR.*file has I, II"):
        EcgModality().load(ref, root=tmp_path)


def test_truncated_dat(tmp_path):
    ref = write(tmp_path, "trunc", signal(MIMIC_IV_ECG_LEADS), MIMIC_IV_ECG_LEADS)
    dat = tmp_path / "trunc.dat"
    dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])
    with pytest.raises(DataError, match=r"header says 5000 samples per lead but trunc.dat holds 2500"):
        EcgModality().load(ref, root=tmp_path)


@pytest.mark.parametrize("claimed", [6000, 4000])
def test_header_that_lies_about_its_length(tmp_path, claimed):
    ref = write(tmp_path, "lie", signal(MIMIC_IV_ECG_LEADS), MIMIC_IV_ECG_LEADS)
    hea = tmp_path / "lie.hea"
    hea.write_text(hea.read_text().replace("lie 12 500 5000", f"lie 12 500 {claimed}"))
    with pytest.raises(DataError, match=rf"header says {claimed} samples per lead but lie.dat holds 5000"):
        EcgModality().load(ref, root=tmp_path)


def test_corrupt_bytes_fail_the_checksum(tmp_path):
    ref = write(tmp_path, "flip", signal(MIMIC_IV_ECG_LEADS), MIMIC_IV_ECG_LEADS)
    dat = tmp_path / "flip.dat"
    b = bytearray(dat.read_bytes())
    b[1001] ^= 0x40
    dat.write_bytes(bytes(b))
    with pytest.raises(DataError, match="checksum"):
        EcgModality().load(ref, root=tmp_path)
    assert EcgModality(verify_checksum=False).load(ref, root=tmp_path).shape == (12, 1000)


def test_length_policies(tmp_path):
    short = write(tmp_path, "short", signal(MIMIC_IV_ECG_LEADS, seconds=8), MIMIC_IV_ECG_LEADS)
    long = write(tmp_path, "long", signal(MIMIC_IV_ECG_LEADS, seconds=12), MIMIC_IV_ECG_LEADS)
    with pytest.raises(DataError, match=r"8 s .*shorter than 10 s"):
        EcgModality().load(short, root=tmp_path)
    assert EcgModality(pad="edge").load(short, root=tmp_path).shape == (12, 1000)
    assert EcgModality().load(long, root=tmp_path).shape == (12, 1000)
    with pytest.raises(DataError, match="longer than 10 s"):
        EcgModality(crop="error").load(long, root=tmp_path)


def test_nan_policies(tmp_path):
    sig = signal(MIMIC_IV_ECG_LEADS)
    sig[100:110, 3] = np.nan
    ref = write(tmp_path, "nan", sig, MIMIC_IV_ECG_LEADS)
    with pytest.raises(DataError, match=r"10 NaN sample\(s\) in lead\(s\) aVR"):
        EcgModality().load(ref, root=tmp_path)
    mod = EcgModality(nan_policy="interpolate")
    x = mod.load(ref, root=tmp_path)
    assert np.isfinite(x.numpy()).all() and mod.nan_filled_records == 1 and mod.nan_filled_samples == 10
    assert np.isfinite(EcgModality(nan_policy="zero").load(ref, root=tmp_path).numpy()).all()
    with pytest.raises(DataError, match="max_nan_fraction"):
        EcgModality(nan_policy="zero", max_nan_fraction=1e-5).load(ref, root=tmp_path)


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        EcgModality().load("nowhere/r", root=tmp_path)
    with pytest.raises(ValidationError):
        EcgModality(leads=("I", "i"))
    with pytest.raises(ValidationError):
        EcgModality(nan_policy="ignore")
    assert EcgModality(target_fs=50, duration_s=5).sample_shape == (12, 250)


def test_duplicate_lead_names_matter_only_when_configured(tmp_path):
    leads = ["I", "II", "X", "x"]
    ref = write(tmp_path, "dup", signal(leads), leads)
    assert EcgModality(leads=("II", "I")).load(ref, root=tmp_path).shape == (2, 1000)
    with pytest.raises(DataError, match=r"lead\(s\) X appear more than once in the header"):
        EcgModality(leads=("I", "X")).load(ref, root=tmp_path)


def test_unparseable_header_is_one_line(tmp_path):
    ref = write(tmp_path, "bad", signal(MIMIC_IV_ECG_LEADS), MIMIC_IV_ECG_LEADS)
    (tmp_path / "bad.hea").write_text("bad twelve 500 5000\n")
    mod = EcgModality()
    assert mod.files_of(ref, root=tmp_path) == [tmp_path / "bad.hea"]  # hashed as is; load says what is wrong
    with pytest.raises(DataError, match=r"bad\.hea \(HeaderSyntaxError: .*\); allowed: a header wfdb\.rdheader reads") as err:
        mod.load(ref, root=tmp_path)
    assert "\n" not in str(err.value)
