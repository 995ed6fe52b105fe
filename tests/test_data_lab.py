"""LAB reader on Symile-format CSV files written with pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medtvt_core.data.formats import SYMILE_LABS
from medtvt_core.errors import DataError
from medtvt_plugins.readers.lab import LabModality

LABS = sorted(SYMILE_LABS)


def make_csv(path, n_rows: int = 5, *, seed: int = 0) -> pd.DataFrame:
    """Rows with hadm_id 100+i; lab j of row i has percentile (i*50+j)/1000; row 0 misses lab 0."""
    rows = []
    for i in range(n_rows):
        row = {"subject_id": 10_000_000 + i, "hadm_id": 100 + i, "cxr_path": f"files/p10/x{i}.jpg", "ecg_path": f"files/p1000/{i}"}
        for j, lab in enumerate(reversed(LABS)):  # file column order differs from sorted order on purpose
            k = len(LABS) - 1 - j
            row[lab] = float(k + i)
            row[f"{lab}_percentile"] = (i * 50 + k) / 1000
        rows.append(row)
    df = pd.DataFrame(rows)
    df.loc[0, [LABS[0], f"{LABS[0]}_percentile"]] = np.nan
    df.to_csv(path, index=False)
    return df


def test_vector_layout_missing_fill_and_flags(tmp_path):
    make_csv(tmp_path / "labs.csv")
    mod = LabModality()
    stats = mod.fit(["101", "102"], tmp_path)  # training rows 1 and 2 only
    assert stats["mean_percentile"][LABS[0]] == pytest.approx((50 + 100) / 2 / 1000)
    v = mod.load("100", root=tmp_path).numpy()
    assert v.shape == (100,) and v.dtype == np.float32
    assert v[0] == pytest.approx(0.075)  # missing -> training mean percentile
    np.testing.assert_allclose(v[1:50], np.arange(1, 50) / 1000, atol=1e-6)  # sorted column-name order
    assert v[50] == 0 and (v[51:] == 1).all()  # measured flags
    assert mod.load(101, root=tmp_path)[0].item() == pytest.approx(0.05)  # integer ids work too


def test_stats_roundtrip_and_fingerprint(tmp_path):
    make_csv(tmp_path / "labs.csv")
    a = LabModality()
    with pytest.raises(DataError, match="no training statistics"):
        a.load("100", root=tmp_path)
    fp0 = a.preprocess_fingerprint()
    stats = a.fit(["101"], tmp_path)
    b = LabModality()
    b.set_stats(stats)
    assert np.array_equal(a.load("100", root=tmp_path).numpy(), b.load("100", root=tmp_path).numpy())
    assert a.preprocess_fingerprint() == b.preprocess_fingerprint() != fp0
    c = LabModality()
    c.fit(["102"], tmp_path)
    assert c.preprocess_fingerprint() != a.preprocess_fingerprint()
    with pytest.raises(DataError, match="malformed"):
        LabModality().set_stats({"labs": LABS})


def test_csv_is_read_once(tmp_path):
    make_csv(tmp_path / "labs.csv")
    mod = LabModality()
    mod.fit(["101"], tmp_path)
    first = mod.load("103", root=tmp_path)
    (tmp_path / "labs.csv").unlink()  # later samples come from the parsed table kept in memory
    assert np.array_equal(mod.load("103", root=tmp_path).numpy(), first.numpy())
    assert mod.content_key("103", root=tmp_path) != mod.content_key("104", root=tmp_path)


def test_missing_percentile_column(tmp_path):
    df = make_csv(tmp_path / "labs.csv")
    df.drop(columns=[f"{LABS[7]}_percentile"]).to_csv(tmp_path / "labs.csv", index=False)
    with pytest.raises(DataError, match=rf"labs.csv: column '{LABS[7]}_percentile' is missing"):
        LabModality().fit(["101"], tmp_path)


def test_missing_lab_entirely(tmp_path):
    df = make_csv(tmp_path / "labs.csv")
    df.drop(columns=[LABS[3], f"{LABS[3]}_percentile"]).to_csv(tmp_path / "labs.csv", index=False)
    with pytest.raises(DataError, match="found 49 labs with percentile columns, expected n_labs=50"):
        LabModality().fit(["101"], tmp_path)
    with pytest.raises(DataError, match=rf"column '{LABS[3]}_percentile' is missing"):
        LabModality(labs=tuple(LABS)).fit(["101"], tmp_path)


def test_text_in_numeric_column(tmp_path):
    df = make_csv(tmp_path / "labs.csv")
    df[f"{LABS[5]}_percentile"] = df[f"{LABS[5]}_percentile"].astype(object)
    df.loc[3, f"{LABS[5]}_percentile"] = "high"
    df.to_csv(tmp_path / "labs.csv", index=False)
    with pytest.raises(DataError, match=rf"labs.csv: line 5 \(row 3\), column '{LABS[5]}_percentile': 'high' is not a number"):
        LabModality().load("101", root=tmp_path)


def test_bad_keys(tmp_path):
    df = make_csv(tmp_path / "labs.csv")
    mod = LabModality()
    mod.fit(["101"], tmp_path)
    with pytest.raises(DataError, match="no row with hadm_id = '999'"):
        mod.load("999", root=tmp_path)
    df.loc[4, "hadm_id"] = 101
    df.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match="'101' repeats line 3"):
        LabModality(csv="dup.csv").fit(["101"], tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        LabModality(csv="none.csv").fit(["101"], tmp_path)


@pytest.mark.parametrize("value", [7.5, -0.01, 1.0001])
def test_percentile_outside_unit_interval_is_refused(tmp_path, value):
    """A percentile is a fraction in [0, 1]: 7.5 (a percent, or a raw value in the wrong column) is refused
    naming the file, the row (line, hadm_id, subject_id), the column and the allowed range, in one line."""
    df = make_csv(tmp_path / "labs.csv")
    df.loc[3, f"{LABS[7]}_percentile"] = value
    df.loc[4, f"{LABS[2]}_percentile"] = 9.0  # a later row: the first offending one is named
    df.to_csv(tmp_path / "labs.csv", index=False)
    with pytest.raises(DataError) as e:
        LabModality().fit(["101"], tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "labs.csv") in msg
    assert f"line 5 (row 3: hadm_id 103, subject_id 10000003), column '{LABS[7]}_percentile': percentile {value} " \
           "is outside [0, 1]; allowed: a number in [0, 1] or an empty cell" in msg


def test_percentile_bounds_are_accepted(tmp_path):
    df = make_csv(tmp_path / "labs.csv")
    df.loc[1, f"{LABS[7]}_percentile"] = 0.0
    df.loc[2, f"{LABS[7]}_percentile"] = 1.0
    df.to_csv(tmp_path / "labs.csv", index=False)
    mod = LabModality()
    mod.fit(["101", "102"], tmp_path)
    assert mod.load("102", root=tmp_path)[7].item() == 1.0 and mod.load("101", root=tmp_path)[7].item() == 0.0
