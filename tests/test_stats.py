"""Seeds and intervals: seed parsing, seed mean/std, joint paired bootstrap CIs, paired tests, tables.

Oracles are independent of medtvt_core.stats: scipy.stats.bootstrap / permutation_test called
directly, explicit numpy resampling loops, full enumeration of sign flips, numpy's std.
"""

from __future__ import annotations

import csv
import doctest
import itertools
import os

import numpy as np
import pytest
from scipy import stats as st

import medtvt_core.stats as S
from medtvt_core.errors import ConfigError, DataError
from medtvt_core.stats import (
    holm,
    noise_sentences,
    parse_seeds,
    per_record_scores,
    summarize_ablation,
    write_ablation,
)


def ids(n: int, start: int = 0) -> list[str]:
    return [f"r{i:03d}" for i in range(start, start + n)]


def col(values, rid=None) -> dict:
    rid = rid or ids(len(values))
    return {r: (None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)) for r, v in zip(rid, values)}


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_doctests():
    res = doctest.testmod(S)
    assert res.attempted > 0 and res.failed == 0


# ------------------------------------------------------------------------------------ seeds
@pytest.mark.parametrize("text, seeds", [("0,1,2", [0, 1, 2]), ("0-2", [0, 1, 2]), (" 3, 0-2 ", [3, 0, 1, 2]),
                                         ("7", [7]), ("5-5", [5])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, what", [("0,1,1", "more than once"), ("0,0-2", "more than once"),
                                        ("-1", "negative"), ("0, -3", "negative"), ("", "empty"),
                                        ("a", "not a seed"), ("1.5", "not a seed"), ("2-0", "decreasing"),
                                        ("0,,1", "not a seed"), (str(2**32), "out of range")])
def test_parse_seeds_bad(text, what):
    with pytest.raises(ConfigError) as e:
        parse_seeds(text)
    msg = one_line(e)
    assert what in msg and "--seeds" in msg


# ------------------------------------------------------------------------------------ estimates
def test_single_variant_ci_matches_scipy_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, 30)
    x_nan = x.copy()
    x_nan[[2, 9, 17]] = np.nan
    for data, stat in ((x, np.mean), (x_nan, np.nanmean)):
        res = summarize_ablation({"a": {0: {"f1": col(data)}}}, n_resamples=2000, random_state=7).stats["a"]["f1"]
        ref = st.bootstrap((data,), lambda a, axis=-1, stat=stat: stat(a, axis=axis), vectorized=True, n_resamples=2000,
                           method="percentile", rng=np.random.default_rng(7)).confidence_interval
        assert res.ci_low == pytest.approx(ref.low, abs=1e-12) and res.ci_high == pytest.approx(ref.high, abs=1e-12)
        assert res.mean == pytest.approx(np.nanmean(data)) and res.std is None and res.per_seed == (res.mean,)
        assert res.n_defined == int(np.isfinite(data).sum())


def test_seed_average_ci_matches_explicit_loop_and_std_matches_numpy():
    rng = np.random.default_rng(11)
    n, b = 20, 10000
    x = rng.uniform(0, 1, (3, n))
    x[1, [0, 5]] = np.nan  # undefined on two records in one seed: NaN-mean over records
    res = summarize_ablation({"a": {s: {"f1": col(x[s])} for s in range(3)}}, n_resamples=b).stats["a"]["f1"]
    seed_metric = np.nanmean(x, axis=1)
    assert res.per_seed == pytest.approx(tuple(seed_metric))
    assert res.mean == pytest.approx(seed_metric.mean())
    assert res.std == pytest.approx(np.std(seed_metric, ddof=1))
    loop_rng = np.random.default_rng(12345)  # another stream: agreement up to Monte Carlo error
    boot = []
    for _ in range(b):
        i = loop_rng.integers(0, n, n)
        boot.append(np.mean(np.nanmean(x[:, i], axis=1)))  # metric of each seed, then mean over seeds
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert res.ci_low == pytest.approx(lo, abs=0.01) and res.ci_high == pytest.approx(hi, abs=0.01)
    assert res.ci_low < res.mean < res.ci_high


def test_joint_resampling_difference_ci_collapses_to_constant():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (2, 50))
    scores = {"base": {s: {"f1": col(x[s])} for s in range(2)},
              "plus": {s: {"f1": col(x[s] + 0.1)} for s in range(2)}}
    r = summarize_ablation(scores, n_resamples=2000).stats["plus"]["f1"]
    assert r.diff == pytest.approx(0.1, abs=1e-12)
    assert r.diff_ci_low == pytest.approx(0.1, abs=1e-12) and r.diff_ci_high == pytest.approx(0.1, abs=1e-12)
    # the variant's own interval is wide: only shared resamples make the difference's collapse
    assert r.ci_high - r.ci_low > 0.05
    assert r.p == pytest.approx(2 / 2001)  # only the identity sign pattern reaches +0.1


def test_equal_variant_p_one_and_better_variant_small_p():
    rng = np.random.default_rng(0)
    n = 200
    base = rng.uniform(0, 1, (3, n))
    better = np.clip(base + 0.08 + rng.normal(0, 0.1, (3, n)), 0, 1)
    scores = {"base": {s: {"f1": col(base[s])} for s in range(3)},
              "same": {s: {"f1": col(base[s])} for s in range(3)},
              "better": {s: {"f1": col(better[s])} for s in range(3)}}
    summ = summarize_ablation(scores, n_resamples=2000)
    same, good = summ.stats["same"]["f1"], summ.stats["better"]["f1"]
    assert same.p == 1.0 and same.diff == 0.0 and same.diff_ci_low == same.diff_ci_high == 0.0
    assert good.p < 0.01 and good.p_holm < 0.01 and good.diff_ci_low > 0
    text = " ".join(noise_sentences(summ))
    assert "Distinguishable from noise on f1: `better`" in text
    assert "Not distinguishable from noise on f1: `same`" in text
    assert "Holm" in text


def test_paired_test_matches_exact_sign_flip_enumeration():
    rng = np.random.default_rng(8)
    n = 14
    b, v = rng.normal(0.5, 0.2, n), rng.normal(0.55, 0.2, n)
    v[[1, 7]] = np.nan  # those records leave the test: 12 differences
    r = summarize_ablation({"b": {0: {"f1": col(b)}}, "v": {0: {"f1": col(v)}}}, min_records=n,
                           n_resamples=2**n).stats["v"]["f1"]  # >= 2**n sign patterns: scipy enumerates them
    d = (v - b)[~np.isnan(v)]
    null = np.array([np.mean(np.array(sg) * d) for sg in itertools.product([1, -1], repeat=d.size)])
    t, eps = d.mean(), 1e-12
    p_ref = min(1.0, 2 * min(np.mean(null >= t - eps), np.mean(null <= t + eps)))
    assert r.p == pytest.approx(p_ref, abs=1e-12)
    # the table's difference uses every defined record of each variant, not only the paired ones
    assert r.diff == pytest.approx(np.nanmean(v) - b.mean())


def test_paired_test_randomized_close_to_t_test_and_rows_independent_of_each_other():
    rng = np.random.default_rng(10)
    n = 60
    b = rng.normal(0.5, 0.2, n)
    vs = {f"v{k}": b + rng.normal(0.03 * k, 0.2, n) for k in range(4)}
    vs["v2"][:7] = np.nan
    sc = {"b": {0: {"f1": col(b)}}, **{k: {0: {"f1": col(x)}} for k, x in vs.items()}}
    summ = summarize_ablation(sc, n_resamples=4000)
    for k, x in vs.items():
        d = (x - b)[~np.isnan(x)]
        # roughly normal differences: the permutation p is close to the paired t-test's
        assert summ.stats[k]["f1"].p == pytest.approx(st.ttest_1samp(d, 0).pvalue, abs=0.04)
    # a variant's p-value does not depend on which other variants are in the grid (beyond MC error)
    alone = summarize_ablation({"b": sc["b"], "v3": sc["v3"]}, n_resamples=4000).stats["v3"]["f1"].p
    assert alone == pytest.approx(summ.stats["v3"]["f1"].p, abs=0.02)


def test_holm_matches_definition():
    rng = np.random.default_rng(2)
    p = list(rng.uniform(0, 0.2, 7))
    m = len(p)
    order = np.argsort(p)
    ref = np.empty(m)
    for k, i in enumerate(order):  # adjusted p_(k) = max_{j <= k} min(1, (m - j) p_(j))
        ref[i] = max(min(1.0, (m - j) * p[order[j]]) for j in range(k + 1))
    assert holm(p) == pytest.approx(list(ref))
    assert holm([None, 0.5]) == [None, 0.5] and holm([]) == []


def test_different_seed_counts_do_not_change_a_variants_interval():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0, 1, (3, 25)), rng.uniform(0, 1, (2, 25))
    va = {s: {"f1": col(a[s])} for s in range(3)}
    vb = {s: {"f1": col(b[s])} for s in (0, 1)}
    joint = summarize_ablation({"a": va, "b": vb}, n_resamples=1000)
    alone = summarize_ablation({"b": vb}, n_resamples=1000).stats["b"]["f1"]
    jb = joint.stats["b"]["f1"]
    assert (jb.mean, jb.std, jb.ci_low, jb.ci_high) == pytest.approx((alone.mean, alone.std, alone.ci_low, alone.ci_high))
    assert joint.seeds == {"a": (0, 1, 2), "b": (0, 1)}


def test_reproducible_with_random_state():
    rng = np.random.default_rng(6)
    sc = {"a": {0: {"f1": col(rng.uniform(0, 1, 40))}}, "b": {0: {"f1": col(rng.uniform(0, 1, 40))}}}
    s1, s2 = summarize_ablation(sc, n_resamples=500), summarize_ablation(sc, n_resamples=500)
    s3 = summarize_ablation(sc, n_resamples=500, random_state=1)
    assert s1.stats == s2.stats and s1.stats["b"]["f1"].ci_low != s3.stats["b"]["f1"].ci_low


# ------------------------------------------------------------------------------------ validation
def test_restricts_to_common_records_and_says_so():
    rng = np.random.default_rng(9)
    x, y = rng.uniform(0, 1, 30), rng.uniform(0, 1, 25)
    summ = summarize_ablation({"a": {0: {"f1": col(x)}}, "b": {0: {"f1": col(y, ids(25, start=5))}}},
                              n_resamples=200)
    assert summ.record_ids == tuple(ids(25, start=5))
    assert summ.stats["a"]["f1"].mean == pytest.approx(x[5:].mean())
    assert any("25 test records common" in n and "a 5" in n for n in summ.notes)
    assert "25 test records common" in " ".join(noise_sentences(summ))


@pytest.mark.parametrize("case, err, what", [
    ("few", DataError, "at least 20 test records"),
    ("overlap_few", DataError, "got 10"),
    ("disjoint", DataError, "no common test records"),
    ("missing_metric", DataError, "no scores for metric 'rouge'"),
    ("not_number", DataError, "record 'r003': value 'x'"),
    ("infinite", DataError, "infinite"),
    ("no_variants", ConfigError, "no variants"),
    ("no_seeds", DataError, "no seeds"),
    ("primary", ConfigError, "primary metric 'f1'"),
])
def test_bad_input_is_one_line(case, err, what):
    v30 = {"f1": col(np.linspace(0, 1, 30)), "rouge": col(np.linspace(0, 1, 30))}
    kw = {}
    scores = {
        "few": {"a": {0: {"f1": col(np.linspace(0, 1, 19))}}},
        "overlap_few": {"a": {0: {"f1": col(np.ones(30))}}, "b": {0: {"f1": col(np.ones(30), ids(30, start=20))}}},
        "disjoint": {"a": {0: {"f1": col(np.ones(30))}}, "b": {0: {"f1": col(np.ones(30), ids(30, start=100))}}},
        "missing_metric": {"a": {0: v30}, "b": {0: {"f1": v30["f1"]}}},
        "not_number": {"a": {0: {"f1": {**col(np.ones(30)), "r003": "x"}}}},
        "infinite": {"a": {0: {"f1": {**col(np.ones(30)), "r003": float("inf")}}}},
        "no_variants": {},
        "no_seeds": {"a": {}},
        "primary": {"a": {0: {"rouge": v30["rouge"]}}},
    }[case]
    with pytest.raises(err) as e:
        summarize_ablation(scores, **kw)
    assert what in one_line(e)


def test_bootstrap_off_allows_few_records():
    summ = summarize_ablation({"a": {0: {"f1": col([0.2, 0.4])}, 1: {"f1": col([0.4, 0.6])}},
                               "b": {0: {"f1": col([0.5, None])}}}, bootstrap=False)
    a, b = summ.stats["a"]["f1"], summ.stats["b"]["f1"]
    assert a.mean == pytest.approx(0.4) and a.std == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert a.ci_low is None and b.p is None and b.diff == pytest.approx(0.1) and b.n_defined == 1


def test_per_record_scores():
    recs = [{"id": "x", "f1": 0.5, "meteor": 0.1}, {"id": "y", "f1": None}]
    assert per_record_scores(recs, ["f1", "meteor"]) == {"f1": {"x": 0.5, "y": None}, "meteor": {"x": 0.1, "y": None}}
    with pytest.raises(DataError) as e:
        per_record_scores(recs + [{"id": "x", "f1": 1.0}], ["f1"])
    assert "occurs twice" in one_line(e)


# ------------------------------------------------------------------------------------ tables
def _summary():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (2, 40))
    sc = {v: {s: {"f1": col(x[s] + off), "rouge": col(x[s] / 2)} for s in range(2)}
          for v, off in (("fusion-mpl", 0.0), ("fusion-cmha", 0.05))}
    return summarize_ablation(sc, n_resamples=300)


def test_write_ablation_tables(tmp_path):
    summ = _summary()
    axes = {"fusion-mpl": {"fusion": "mpl"}, "fusion-cmha": {"fusion": "cmha"}}
    csv_path, md_path = write_ablation(tmp_path, summ, axes, extra={"fusion-mpl": {"bleu": 0.3}})
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    required = [f"{m}_{k}" for m in ("f1", "rouge") for k in ("mean", "std", "ci_low", "ci_high")] + ["p_vs_baseline"]
    assert set(required) <= set(rows[0]) and {"fusion", "variant", "bleu", "f1_diff_ci_low", "rouge_p"} <= set(rows[0])
    base, cmha = rows
    assert (base["fusion"], base["variant"], base["p_vs_baseline"], base["bleu"]) == ("mpl", "fusion-mpl", "", "0.3")
    s = summ.stats["fusion-cmha"]["f1"]
    assert float(cmha["f1_mean"]) == s.mean and float(cmha["p_vs_baseline"]) == s.p and cmha["bleu"] == ""
    assert float(cmha["f1_diff_ci_low"]) == pytest.approx(0.05) and cmha["n_records"] == "40"
    md = md_path.read_text()
    assert f"| cmha | fusion-cmha | {s.mean:.4f} ± {s.std:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}]" in md
    assert "(baseline)" in md and "Holm" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.csv", "ablation.md"]  # no temp files left


def test_write_is_atomic(tmp_path, monkeypatch):
    (tmp_path / "ablation.csv").write_text("old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_ablation(tmp_path, _summary())
    assert (tmp_path / "ablation.csv").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ablation.csv"]


def test_noise_sentences_edge_cases():
    only = summarize_ablation({"a": {0: {"f1": col(np.linspace(0, 1, 20))}}}, n_resamples=100)
    assert noise_sentences(only) == ["Only the baseline variant `a` was run; there is nothing to compare."]
    summ = _summary()
    text = noise_sentences(summ, metrics=["f1", "rouge"])
    assert any(t.startswith("Distinguishable from noise on f1: `fusion-cmha` (f1 +0.0500") for t in text)
    assert any(t.startswith("Not distinguishable from noise on rouge: `fusion-cmha` (rouge +0.0000") for t in text)
