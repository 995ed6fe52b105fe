"""ECG reader on real PhysioNet records the project did not write (tests/data/wfdb: wfdb-python's sample
data, MIT licence; tests/data/README.md says what each record exercises).

The oracle is wfdb itself, called directly here: ``rdrecord(...).p_signal`` (one sample per
frame) or ``e_p_signal`` (several), cut as the reader documents, and ``scipy.signal.resample``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.signal import resample

from medtvt_core.data.formats import MIMIC_IV_ECG_LEADS
from medtvt_core.errors import DataError
from medtvt_plugins.readers.ecg import EcgModality

WFDB_DIR = Path(__file__).resolve().parent / "data" / "wfdb"

RECORDS = ["03700181", "100_3chan", "binformats", "mixedsignals"]


def names(record: str) -> tuple[str, ...]:
    return tuple(wfdb.rdheader(str(WFDB_DIR / record)).sig_name)


def copy_record(record: str, dst: Path) -> Path:
    """Writable copy of a record's header and signal files in ``dst``."""
    hea = WFDB_DIR / f"{record}.hea"
    for f in {hea.name, *wfdb.rdheader(str(WFDB_DIR / record)).file_name}:
        shutil.copyfile(WFDB_DIR / f, dst / f)  # copyfile: the tests may alter the copy, never the originals
    return dst


def reader(record: str, **kw) -> EcgModality:
    # 2 s fits every record (binformats holds 2.495 s); centre crop because mixedsignals' ECG
    # leads start with 4 s of invalid samples (NaN), which the default nan_policy refuses.
    return EcgModality(**{"leads": names(record), "duration_s": 2, "crop": "center", **kw})


def flip(path: Path, at: int, mask: int = 0x04) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= mask
    path.write_bytes(bytes(b))


def rewrite_checksums(hea: Path, fn) -> list[int]:
    """Replace each signal line's checksum field (the 7th) by ``fn(old)``; return the new values."""
    lines, new = [], []
    text = hea.read_text().splitlines()
    for k, line in enumerate(text):
        tok = line.split(" ")
        if k > 0 and line.strip() and not line.startswith("#"):
            tok[6] = str(fn(int(tok[6])))
            new.append(int(tok[6]))
        lines.append(" ".join(tok))
    hea.write_text("\n".join(lines) + "\n")
    return new


# ------------------------------------------------------------------ every record
@pytest.mark.parametrize("record", RECORDS)
def test_record_loads_with_its_own_leads(record):
    x = reader(record).load(record, root=WFDB_DIR)
    assert x.shape == (len(names(record)), 200) and str(x.dtype) == "torch.float32"
    assert np.isfinite(x.numpy()).all()


@pytest.mark.parametrize("record", RECORDS)
def test_default_leads_fail_naming_the_missing_ones(record):
    have = {n.lower() for n in names(record)}
    missing = [lead for lead in MIMIC_IV_ECG_LEADS if lead.lower() not in have]
    with pytest.raises(DataError) as err:
        EcgModality().load(record, root=WFDB_DIR)
    msg = str(err.value)
    assert "\n" not in msg and record in msg
    assert f"missing lead(s) {', '.join(missing)};" in msg


def test_lead_subset_in_configured_order():
    x = EcgModality(leads=("iii", "I"), duration_s=2, target_fs=360).load("100_3chan", root=WFDB_DIR).numpy()
    p = wfdb.rdrecord(str(WFDB_DIR / "100_3chan")).p_signal
    np.testing.assert_allclose(x, p[:720, [2, 0]].T, atol=1e-6)  # 360 Hz -> 360 Hz: no resampling


# ------------------------------------------------------------------ checksums
@pytest.mark.parametrize("record,stored_as", [("03700181", "signed"), ("100_3chan", "unsigned"), ("binformats", "signed")])
def test_signed_and_unsigned_checksums_pass(tmp_path, record, stored_as):
    sums = wfdb.rdheader(str(WFDB_DIR / record)).checksum
    assert any(c < 0 for c in sums) if stored_as == "signed" else any(c > 32767 for c in sums)  # the header is as claimed
    want = reader(record).load(record, root=WFDB_DIR)
    copy_record(record, tmp_path)
    # The same header with each checksum in the other 16-bit form: it must pass as well.
    new = rewrite_checksums(tmp_path / f"{record}.hea", lambda c: c + 65536 if c < 0 else (c - 65536 if c > 32767 else c))
    assert wfdb.rdheader(str(tmp_path / record)).checksum == new and new != sums
    np.testing.assert_array_equal(reader(record).load(record, root=tmp_path).numpy(), want.numpy())


@pytest.mark.parametrize("record,fname,at,lead", [
    ("100_3chan", "100_3chan.dat", 9, "I"),          # 212, 3 samples (4.5 bytes) a frame: byte 9 = low byte of frame 2's I
    ("03700181", "03700181.dat", 9000, "MCL1"),       # 6 samples (9 bytes) a frame, MCL1 first: expanded samples
    ("mixedsignals", "mixedsignals.hea", None, "II"),  # FLAC: corrupt bytes break decoding, so alter the header's sum
    *[("binformats", f"binformats.d{k}", at, f"sig {k}, fmt {fmt}") for k, (fmt, at) in enumerate(
        [("8", 200), ("16", 400), ("61", 401), ("80", 200), ("160", 400), ("212", 300), ("310", 400), ("311", 400),
         ("24", 600), ("32", 800)])],                 # a low-order byte of a sample in each format
])
def test_corrupted_copy_fails_the_checksum(tmp_path, record, fname, at, lead):
    copy_record(record, tmp_path)
    if at is None:
        hea = tmp_path / fname
        hea.write_text(hea.read_text().replace(" 24460 0 II", " 24461 0 II"))
    else:
        flip(tmp_path / fname, at)
    with pytest.raises(DataError) as err:
        reader(record).load(record, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / record) in msg
    assert f"checksum mismatch in lead(s) {lead}:" in msg
    assert reader(record, verify_checksum=False).load(record, root=tmp_path).shape[1] == 200


def test_skewed_signal_is_skipped_with_a_note(caplog):
    # Why it must be skipped: wfdb's (shifted) RESP samples do not sum to the header's value.
    rec = wfdb.rdrecord(str(WFDB_DIR / "03700181"), physical=False, smooth_frames=False)
    assert rec.skew == [None, None, 4]
    assert (rec.checksum[2] - rec.calc_checksum(expanded=True)[2]) % 65536 != 0
    with caplog.at_level(logging.INFO, logger="medtvt.data"):
        x = reader("03700181").load("03700181", root=WFDB_DIR)
    assert x.shape == (3, 200)
    notes = [r.getMessage() for r in caplog.records if "not verified" in r.getMessage()]
    assert len(notes) == 1 and "RESP (skew 4)" in notes[0] and "MCL1" not in notes[0] and "ABP" not in notes[0]


# ------------------------------------------------------------------ independent oracle
def centre(x: np.ndarray, fs: float, seconds: float) -> np.ndarray:
    """The reader's documented centre cut: round(seconds * fs) samples from (n - want) // 2."""
    want = int(round(seconds * fs))
    start = (len(x) - want) // 2
    return x[start:start + want]


@pytest.mark.parametrize("record,target_fs,seconds,same_rate", [
    ("03700181", 500.0, 4, 1),       # MCL1 at 500 Hz (4 samples per frame at 125 Hz) unresampled; ABP, RESP from 125 Hz
    ("mixedsignals", 249.89, 20, 3),  # non-integer rates: ECG leads at 249.89 Hz unresampled; ABP, Pleth, Resp resampled
    ("100_3chan", 100.0, 2, 0),       # 360 Hz -> 100 Hz
    ("binformats", 200.0, 2, 10),     # every storage format, unresampled
])
def test_values_match_wfdb_and_scipy(record, target_fs, seconds, same_rate):
    path = str(WFDB_DIR / record)
    rec = wfdb.rdrecord(path, smooth_frames=False)  # physical values, every sample of every frame
    x = reader(record, target_fs=target_fs, duration_s=seconds).load(record, root=WFDB_DIR).numpy()
    n_out = int(round(target_fs * seconds))
    assert x.shape == (rec.n_sig, n_out)
    identity = 0
    for i, sig in enumerate(rec.e_p_signal):
        fs = rec.fs * rec.samps_per_frame[i]
        cut = centre(sig, fs, seconds)
        if len(cut) == n_out:
            identity += 1
            np.testing.assert_allclose(x[i], cut, rtol=1e-6, atol=1e-6, err_msg=rec.sig_name[i])
        else:
            want = resample(cut, n_out)
            np.testing.assert_allclose(x[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=rec.sig_name[i])
    assert identity == same_rate  # leads at target_fs compare raw values, not only resampled ones
    if record == "03700181":
        # Smoothed frames (wfdb's default) are not what the reader returns for MCL1.
        smooth = wfdb.rdrecord(path).p_signal[:, 0]
        assert not np.allclose(x[0, ::4], centre(smooth, rec.fs, seconds), atol=1e-3)


# ------------------------------------------------------------------ headers and bad input
def test_header_with_leading_comment_and_blank_line(tmp_path):
    copy_record("100_3chan", tmp_path)
    hea = tmp_path / "100_3chan.hea"
    first, *rest = hea.read_text().splitlines()
    hea.write_text("\n".join(["# a leading comment line", first, "", *rest, ""]))
    mod = reader("100_3chan")
    assert mod.files_of("100_3chan", root=tmp_path) == [hea, tmp_path / "100_3chan.dat"]
    np.testing.assert_array_equal(mod.load("100_3chan", root=tmp_path).numpy(),
                                  mod.load("100_3chan", root=WFDB_DIR).numpy())


def test_files_of_lists_the_signal_files_the_header_names():
    assert EcgModality().files_of("binformats", root=WFDB_DIR) == [
        WFDB_DIR / "binformats.hea", *(WFDB_DIR / f"binformats.d{k}" for k in range(10))]
    assert EcgModality().files_of("mixedsignals.hea", root=WFDB_DIR) == [
        WFDB_DIR / f"mixedsignals{s}" for s in (".hea", "_e.dat", "_p.dat", "_r.dat")]


def test_files_of_parses_a_header_once_and_again_when_it_changes(tmp_path, monkeypatch):
    """The feature cache asks for an input's files at every access: one wfdb parse per header as it is
    on disk; a rewritten header (new size/mtime) is parsed again, and its list is wfdb's own."""
    import os

    copy_record("100_3chan", tmp_path)
    mod = reader("100_3chan")
    calls = []
    real = wfdb.rdheader
    monkeypatch.setattr(wfdb, "rdheader", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(5):
        assert mod.files_of("100_3chan", root=tmp_path) == [tmp_path / "100_3chan.hea", tmp_path / "100_3chan.dat"]
    assert len(calls) == 1
    hea = tmp_path / "100_3chan.hea"
    shutil.copyfile(tmp_path / "100_3chan.dat", tmp_path / "other.dat")
    hea.write_text(hea.read_text().replace("100_3chan.dat", "other.dat", 1))
    st = hea.stat()
    os.utime(hea, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new stamp even on a coarse clock
    want = [hea, *(tmp_path / f for f in dict.fromkeys(real(str(tmp_path / "100_3chan")).file_name))]
    assert mod.files_of("100_3chan", root=tmp_path) == want and tmp_path / "other.dat" in want
    assert len(calls) == 2


@pytest.mark.parametrize("text", ["this is not a record line\n", "", "100_3chan three 360 999\n"])
def test_unparseable_header(tmp_path, text):
    copy_record("100_3chan", tmp_path)
    (tmp_path / "100_3chan.hea").write_text(text)
    mod = reader("100_3chan")
    assert mod.files_of("100_3chan", root=tmp_path) == [tmp_path / "100_3chan.hea"]
    with pytest.raises(DataError, match=r"unparseable WFDB header 100_3chan\.hea .*allowed: a header wfdb\.rdheader reads") as err:
        mod.load("100_3chan", root=tmp_path)
    assert "\n" not in str(err.value)


def test_header_declaring_more_signals_than_lines(tmp_path):
    copy_record("100_3chan", tmp_path)
    hea = tmp_path / "100_3chan.hea"
    hea.write_text(hea.read_text().replace("100_3chan 3 360.0 999", "100_3chan 4 360.0 999"))
    with pytest.raises(DataError, match=r"100_3chan\.hea declares 4 signal\(s\) but has 3 signal line\(s\)"):
        reader("100_3chan").load("100_3chan", root=tmp_path)


def test_samples_shorter_than_the_header_says(tmp_path):
    copy_record("100_3chan", tmp_path)
    dat = tmp_path / "100_3chan.dat"
    dat.write_bytes(dat.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"header says 999 samples per lead but 100_3chan\.dat holds 444 \(2000 bytes"):
        reader("100_3chan").load("100_3chan", root=tmp_path)


def test_flac_shorter_than_the_header_says(tmp_path):
    copy_record("mixedsignals", tmp_path)
    hea = tmp_path / "mixedsignals.hea"
    hea.write_text(hea.read_text().replace("62.4725/999.56 14400", "62.4725/999.56 15000"))
    with pytest.raises(DataError, match=r"header says 15000 frames but mixedsignals_e\.dat holds 14400 \(FLAC"):
        reader("mixedsignals").load("mixedsignals", root=tmp_path)


def test_cut_flac_file_is_named(tmp_path):
    copy_record("mixedsignals", tmp_path)
    f = tmp_path / "mixedsignals_p.dat"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DataError, match=r"unreadable signal file mixedsignals_p\.dat .*allowed: a complete file in WFDB format 516") as err:
        reader("mixedsignals").load("mixedsignals", root=tmp_path)
    assert "\n" not in str(err.value)
