"""Seeds and intervals for ``medtvt ablate``: seed means/std, paired bootstrap CIs, paired tests.

Input (``scores``): ``variant -> seed -> metric -> {record_id: value}``, one per-record score of a
per-sample metric (f1, precision, recall, a reward, METEOR, ROUGE-L...) for every test record;
``None`` or NaN marks a record on which the metric is undefined. The first variant is the baseline.
Corpus-level metrics (BLEU, AUC) are not means of per-record scores and do not fit here.

Statistics of a variant ``v`` and metric ``m`` on the ``n`` test records common to all variants:

* metric of a seed: NaN-mean over records (undefined records are left out, not counted as 0);
* ``mean``: mean over seeds of the seed metrics; ``std``: their standard deviation, ``ddof=1``,
  ``None`` with one seed (seeds whose metric is undefined on every record are left out of both);
* ``ci_low``/``ci_high``: percentile bootstrap CI of ``mean`` over test records. One
  ``scipy.stats.bootstrap`` call per metric (``paired=True``, vectorized) resamples record
  *indices*; its statistic evaluates every variant and seed on each index resample, so all
  variants are compared on the same resampled test sets. The CI is conditional on the trained
  seeds: it measures test-set sampling; the seed ``std`` measures training variance;
* ``diff`` = ``mean(v) - mean(baseline)``, its CI from the same joint resamples;
* ``p``: two-sided paired sign-flip permutation test (``scipy.stats.permutation_test``,
  ``permutation_type="samples"`` on one sample) of the mean per-record difference of the
  seed-averaged score (per record: NaN-mean over seeds; records undefined for either variant are
  left out, so with NaNs it can differ slightly from ``diff``). One call tests all (metric,
  variant) rows with shared sign patterns; ``p_holm``: Holm-adjusted across the non-baseline
  variants, per metric (metrics other than the primary one are descriptive: no correction across
  metrics). Defaults: 9999 resamples, ``random_state=0``.

Why these methods: percentile rather than BCa because BCa's jackknife costs O(n^2) memory per
batch and gives no interval (NaN) for degenerate distributions, e.g. a difference that is
constant over records, while percentile intervals of a mean of bounded scores are adequate for
n >= 20. Sign-flip permutation rather than Wilcoxon because it tests the quantity in the table
(the mean difference) and makes no assumption beyond exchangeability of the two variants' scores
per record under the null hypothesis; Wilcoxon tests a pseudo-median and handles the many exact
ties/zeros of per-record F1 differences by approximation. Holm (hand-written below: neither scipy
nor the installed environment offers it; statsmodels is not a dependency) controls the
family-wise error rate across variants without independence assumptions.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import re
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError
from .io import atomic_write_text

MIN_RECORDS = 20
MAX_SEED = 2**32 - 1  # the range numpy.random.seed accepts (torch.manual_seed accepts more)
# Resampled elements per batch over all variants (float64: 64 MB, a few times that in temporaries).
_BATCH_ELEMENTS = 2**23

Scores = Mapping[str, Mapping[int, Mapping[str, Mapping[Hashable, Any]]]]


# ------------------------------------------------------------------------------------ seeds
def check_seeds(seeds: Iterable[Any], where: str = "seeds") -> list[int]:
    """Validate a list of seeds (distinct integers in ``0..2**32-1``); return it as ints, in order."""
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ConfigError(f"{where}: seed {s!r} is not an integer; expected distinct integers 0..{MAX_SEED}")
        s = int(s)
        if s < 0 or s > MAX_SEED:
            raise ConfigError(f"{where}: seed {s} is out of range; expected distinct integers 0..{MAX_SEED}")
        out.append(s)
    if not out:
        raise ConfigError(f"{where}: no seeds; expected at least one integer 0..{MAX_SEED}")
    dup = sorted({s for s in out if out.count(s) > 1})
    if dup:
        raise ConfigError(f"{where}: seed {', '.join(map(str, dup))} given more than once; seeds must be distinct")
    return out


def parse_seeds(text: str, where: str = "--seeds") -> list[int]:
    """Parse ``"0,1,2"`` or inclusive ranges ``"0-2"`` (mixable: ``"0-2,7"``) into distinct seeds, in order.

    >>> parse_seeds("3, 0-2")
    [3, 0, 1, 2]
    """
    allowed = "expected distinct non-negative integers separated by commas, or ranges like 0-2"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: empty; {allowed}")
    out: list[int] = []
    for tok in text.split(","):
        t = tok.strip()
        if re.fullmatch(r"\d+", t):
            out.append(int(t))
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", t):
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise ConfigError(f"{where} {text!r}: range {t!r} is decreasing; {allowed}")
            if b - a >= 100_000:  # a typo like 0-1000000 would start a million runs
                raise ConfigError(f"{where} {text!r}: range {t!r} has {b - a + 1} seeds; at most 100000")
            out.extend(range(a, b + 1))
        elif re.fullmatch(r"-\s*\d+", t):
            raise ConfigError(f"{where} {text!r}: seed {t.replace(' ', '')} is negative; {allowed}")
        else:
            raise ConfigError(f"{where} {text!r}: {t!r} is not a seed; {allowed}")
    return check_seeds(out, where=f"{where} {text!r}")


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class MetricStats:
    """Statistics of one variant and metric (module doc); ``None`` where undefined.

    ``diff``/``diff_ci_*``/``p``/``p_holm`` are ``None`` for the baseline; CIs and p-values are
    ``None`` when the bootstrap is off.
    """

    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    per_seed: tuple[float | None, ...]
    n_defined: int  # common records on which at least one seed defines the metric
    diff: float | None = None
    diff_ci_low: float | None = None
    diff_ci_high: float | None = None
    p: float | None = None
    p_holm: float | None = None


@dataclass(frozen=True)
class AblationSummary:
    """Result of :func:`summarize_ablation`; ``stats[variant][metric]`` is a :class:`MetricStats`."""

    variants: tuple[str, ...]
    metrics: tuple[str, ...]
    primary: str
    seeds: dict[str, tuple[int, ...]]
    record_ids: tuple[Hashable, ...]
    stats: dict[str, dict[str, MetricStats]]
    bootstrap: bool
    n_resamples: int
    confidence_level: float
    alpha: float
    random_state: int
    notes: tuple[str, ...] = ()

    @property
    def baseline(self) -> str:
        return self.variants[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (record ids as strings)."""
        d = asdict(self)
        d["record_ids"] = [str(r) for r in self.record_ids]
        d["baseline"] = self.baseline
        return d


# ------------------------------------------------------------------------------------ helpers
def _none(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    # np.nanmean warns on all-NaN slices; here an all-NaN slice is an expected "undefined".
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=axis)
    tot = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tot / cnt


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values, same order; ``None`` entries stay ``None`` and are not counted.

    >>> [None if p is None else round(p, 6) for p in holm([0.01, 0.04, 0.03, None])]
    [0.03, 0.06, 0.06, None]
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):  # type: ignore[arg-type, return-value]
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))  # type: ignore[arg-type]
        out[i] = running  # the running max keeps adjusted p-values monotone in the raw ones
    return out


def per_record_scores(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], *,
                      id_key: str = "id", where: str = "records") -> dict[str, dict[Hashable, Any]]:
    """``metric -> {record_id: value}`` from per-record dicts such as ``[{"id": ..., "f1": ...}]``.

    A metric missing from a record counts as undefined (``None``).
    """
    out: dict[str, dict[Hashable, Any]] = {m: {} for m in metrics}
    seen: set[Hashable] = set()
    for i, r in enumerate(records):
        if id_key not in r:
            raise DataError(f"{where}[{i}]: no {id_key!r} field; every record needs a record id")
        rid = r[id_key]
        if rid in seen:
            raise DataError(f"{where}[{i}]: record id {rid!r} occurs twice; record ids must be unique")
        seen.add(rid)
        for m in metrics:
            out[m][rid] = r.get(m)
    return out


def _value(x: Any) -> float:
    # TypeError/ValueError with the reason; the caller adds where (building it per value is slow).
    if x is None:
        return math.nan
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"value {x!r} is not a number; expected a finite number or None (undefined)")
    f = float(x)
    if math.isinf(f):
        raise ValueError(f"value {f} is infinite; expected a finite number or None (undefined)")
    return f


def _collect(scores: Scores, metrics: Sequence[str] | None, *, bootstrap: bool, min_records: int):
    if not scores:
        raise ConfigError("ablation: no variants; expected at least one variant with scores")
    variants = [str(v) for v in scores]
    if len(set(variants)) != len(variants):
        raise ConfigError(f"ablation: variant names {variants} are not distinct as strings")
    seeds: dict[str, list[Any]] = {}
    for v, per_seed in scores.items():
        if not per_seed:
            raise DataError(f"ablation variant {v!r}: no seeds with scores; expected at least one seed")
        seeds[str(v)] = list(per_seed)
    first = next(iter(next(iter(scores.values())).values()))
    metrics = list(first) if metrics is None else list(metrics)
    if not metrics:
        raise ConfigError("ablation: no metrics; expected at least one per-record metric")
    common: set[Hashable] | None = None
    union: dict[str, set[Hashable]] = {}
    for v, per_seed in scores.items():
        u: set[Hashable] = set()
        for s, per_metric in per_seed.items():
            for m in metrics:
                if m not in per_metric:
                    raise DataError(f"ablation variant {v!r} seed {s}: no scores for metric {m!r}; "
                                    f"every variant and seed needs the metrics {metrics}")
                ids = set(per_metric[m])
                u |= ids
                common = ids if common is None else common & ids
        union[str(v)] = u
    assert common is not None
    if not common:
        raise DataError(f"ablation: variants {variants} have no common test records (no common test split); "
                        "every variant and seed must be scored on the same test split")
    if bootstrap and len(common) < min_records:
        raise DataError(f"ablation: the bootstrap needs at least {min_records} test records common to all variants "
                        f"and seeds, got {len(common)}; use a larger test split or turn the bootstrap off")
    order = [r for r in first[metrics[0]] if r in common]  # the baseline's order: deterministic resamples
    notes = []
    dropped = {v: len(u) - len(common) for v, u in union.items() if len(u) > len(common)}
    if dropped:
        notes.append(f"restricted to the {len(common)} test records common to all variants and seeds "
                     "(records dropped: " + ", ".join(f"{v} {k}" for v, k in dropped.items()) + ")")
    # (variant, metric) -> (seeds, n) in the order of ``order``; NaN = undefined
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for v, per_seed in scores.items():
        arrays[str(v)] = {}
        for m in metrics:
            a = np.full((len(per_seed), len(order)), np.nan)
            for k, (s, per_metric) in enumerate(per_seed.items()):
                col = per_metric[m]
                for j, r in enumerate(order):
                    try:
                        a[k, j] = _value(col[r])
                    except (TypeError, ValueError) as e:
                        raise DataError(f"ablation variant {v!r} seed {s} metric {m!r} record {r!r}: {e}") from None
            arrays[str(v)][m] = a
    return variants, metrics, seeds, order, arrays, notes


def _seed_averaged(x: np.ndarray) -> float | None:
    """(seeds, n) -> NaN-mean over records, then NaN-mean over seeds."""
    return _none(_nanmean(_nanmean(x, axis=-1), axis=0))


def _resampled_metrics(xs: Sequence[np.ndarray], pairs: Sequence[int]):
    """Vectorized bootstrap statistic of record *indices*: seed-averaged metric of every array in
    ``xs`` on the resample, then the difference ``xs[i] - xs[0]`` for ``i`` in ``pairs``.

    A resample's NaN-mean over records is ``(w @ values) / (w @ defined)`` with ``w`` the count of
    each record in the resample: one matrix product for all variants and seeds instead of
    gathering a (seeds, resamples, records) array per variant.
    """
    n = xs[0].shape[1]
    vals = np.concatenate([np.nan_to_num(x, nan=0.0) for x in xs])  # (all seeds, n)
    defined = np.concatenate([(~np.isnan(x)).astype(np.float64) for x in xs])
    bounds = np.cumsum([0] + [x.shape[0] for x in xs])

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        flat = np.asarray(idx).reshape(-1, n)
        b = flat.shape[0]
        w = np.bincount((flat + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            seed_metric = (w @ vals.T) / (w @ defined.T)  # (b, all seeds); NaN: nothing defined
        ms = [_nanmean(seed_metric[:, lo:hi], axis=1) for lo, hi in itertools.pairwise(bounds)]
        rows = np.stack(ms + [ms[i] - ms[0] for i in pairs], axis=0)
        return rows.reshape(rows.shape[:1] + np.shape(idx)[:-1])

    return statistic


# ------------------------------------------------------------------------------------ summary
def summarize_ablation(scores: Scores, *, metrics: Sequence[str] | None = None, primary: str = "f1",
                       bootstrap: bool = True, n_resamples: int = 9999, confidence_level: float = 0.95,
                       alpha: float = 0.05, random_state: int = 0,
                       min_records: int = MIN_RECORDS) -> AblationSummary:
    """Seed mean/std, joint paired bootstrap CIs and paired tests vs the first variant (module doc).

    ``metrics`` defaults to those of the first variant's first seed; ``primary`` (the metric of
    ``p_vs_baseline``) must be one of them. Reproducible: every resampling uses
    ``numpy.random.default_rng(random_state)``.
    """
    from scipy import stats as st

    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ConfigError(f"ablation: n_resamples {n_resamples!r}; expected a positive integer")
    if not 0 < confidence_level < 1:
        raise ConfigError(f"ablation: confidence_level {confidence_level!r}; expected a number in (0, 1)")
    if not 0 < alpha < 1:
        raise ConfigError(f"ablation: alpha {alpha!r}; expected a number in (0, 1)")
    variants, metrics, seeds, order, arrays, notes = _collect(scores, metrics, bootstrap=bootstrap,
                                                              min_records=min_records)
    if primary not in metrics:
        raise ConfigError(f"ablation: primary metric {primary!r} is not among the metrics {metrics}")
    n = len(order)
    batch = max(1, min(n_resamples, _BATCH_ELEMENTS // n))
    partial: dict[str, tuple] = {}
    diffs: list[np.ndarray] = []  # per-record differences to the baseline, for the paired test
    diff_of: list[tuple[str, int]] = []  # their (metric, variant index)
    for m in metrics:
        xs = [arrays[v][m] for v in variants]
        mean = [_seed_averaged(x) for x in xs]
        per_seed = [tuple(_none(y) for y in _nanmean(x, axis=-1)) for x in xs]
        std = []
        for ps in per_seed:
            d = [y for y in ps if y is not None]
            std.append(float(np.std(d, ddof=1)) if len(d) > 1 else None)
        defined = [int((~np.isnan(x)).any(axis=0).sum()) for x in xs]
        diff = [None] + [None if mv is None or mean[0] is None else mv - mean[0] for mv in mean[1:]]
        ci: list[tuple[float | None, float | None]] = [(None, None)] * len(variants)
        dci: list[tuple[float | None, float | None]] = [(None, None)] * len(variants)
        if bootstrap:
            ok = [i for i, mv in enumerate(mean) if mv is not None]  # all-undefined variants: no interval
            pairs = [i for i in ok if i != 0] if 0 in ok else []
            if ok:
                # One bootstrap of record indices per metric; the statistic evaluates every variant
                # and seed on each index resample, so all variants share every resample.
                statistic = _resampled_metrics([xs[i] for i in ok], [ok.index(i) for i in pairs])
                with warnings.catch_warnings():
                    # an all-undefined resample gives NaN; reported as "no interval" below
                    warnings.simplefilter("ignore", st.DegenerateDataWarning)
                    res = st.bootstrap((np.arange(n),), statistic, paired=True, vectorized=True, axis=-1,
                                       n_resamples=n_resamples, batch=batch, confidence_level=confidence_level,
                                       method="percentile", rng=np.random.default_rng(random_state))
                lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
                for k, i in enumerate(ok):
                    ci[i] = (_none(lo[k]), _none(hi[k]))
                for k, i in enumerate(pairs):
                    dci[i] = (_none(lo[len(ok) + k]), _none(hi[len(ok) + k]))
                if any(ci[i][0] is None for i in ok) or any(dci[i][0] is None for i in pairs):
                    notes.append(f"{m}: some resamples hold no record on which the metric is defined; "
                                 "those intervals are left empty")
            y0 = _nanmean(xs[0], axis=0)  # per-record seed-averaged scores
            for i in pairs:
                d = _nanmean(xs[i], axis=0) - y0  # NaN: undefined for either variant
                if not np.isnan(d).all():
                    diffs.append(d)
                    diff_of.append((m, i))
        partial[m] = (mean, std, ci, dci, per_seed, defined, diff)
    # One sign-flip test for every (metric, variant) row: scipy's cost is per record and batch, not
    # per row. Rows share the sign patterns; each test stays valid, and Holm needs no
    # independence. NaN differences are flipped too but ignored by the NaN-mean: records left out.
    p_of: dict[tuple[str, int], float] = {}
    if diffs:
        r = st.permutation_test((np.stack(diffs),), lambda x, axis=-1: _nanmean(x, axis=axis),
                                permutation_type="samples", vectorized=True, axis=-1, n_resamples=n_resamples,
                                batch=max(1, min(n_resamples, _BATCH_ELEMENTS // (n * len(diffs)))),
                                alternative="two-sided", rng=np.random.default_rng(random_state))
        p_of = {key: min(1.0, float(pv)) for key, pv in zip(diff_of, np.atleast_1d(r.pvalue))}
    stats: dict[str, dict[str, MetricStats]] = {v: {} for v in variants}
    for m in metrics:
        mean, std, ci, dci, per_seed, defined, diff = partial[m]
        p = [p_of.get((m, i)) for i in range(len(variants))]
        p_holm = [None, *holm(p[1:])]
        for i, v in enumerate(variants):
            stats[v][m] = MetricStats(mean=mean[i], std=std[i], ci_low=ci[i][0], ci_high=ci[i][1],
                                      per_seed=per_seed[i], n_defined=defined[i], diff=diff[i],
                                      diff_ci_low=dci[i][0], diff_ci_high=dci[i][1], p=p[i], p_holm=p_holm[i])
    return AblationSummary(variants=tuple(variants), metrics=tuple(metrics), primary=primary,
                           seeds={v: tuple(s) for v, s in seeds.items()}, record_ids=tuple(order), stats=stats,
                           bootstrap=bootstrap, n_resamples=n_resamples, confidence_level=confidence_level,
                           alpha=alpha, random_state=random_state, notes=tuple(notes))


# ------------------------------------------------------------------------------------ tables
def ablation_columns(summary: AblationSummary, axes: Sequence[str] = ()) -> list[str]:
    """CSV header: axes, ``variant``, ``n_seeds``, ``n_records``; per metric ``_mean, _std, _ci_low,
    _ci_high``; per metric ``_diff, _diff_ci_low, _diff_ci_high, _p, _p_holm``; ``p_vs_baseline``,
    ``p_vs_baseline_holm`` (the primary metric's ``_p`` and ``_p_holm``)."""
    cols = list(axes) + ["variant", "n_seeds", "n_records"]
    for m in summary.metrics:
        cols += [f"{m}_mean", f"{m}_std", f"{m}_ci_low", f"{m}_ci_high"]
    for m in summary.metrics:
        cols += [f"{m}_diff", f"{m}_diff_ci_low", f"{m}_diff_ci_high", f"{m}_p", f"{m}_p_holm"]
    return cols + ["p_vs_baseline", "p_vs_baseline_holm"]


def ablation_rows(summary: AblationSummary, axes: Mapping[str, Mapping[str, Any]] | None = None,
                  extra: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One dict per variant, keys :func:`ablation_columns` (``None`` = undefined / baseline) plus ``extra``.

    ``axes``: ``variant -> {axis: value}`` (e.g. ``{"fusion": "cmha"}``); ``extra``: ``variant ->
    {column: value}`` appended as is (e.g. corpus BLEU).
    """
    axes = axes or {}
    names = list(dict.fromkeys(a for v in summary.variants for a in axes.get(v, {})))
    rows = []
    for v in summary.variants:
        row: dict[str, Any] = {a: axes.get(v, {}).get(a) for a in names}
        row.update(variant=v, n_seeds=len(summary.seeds[v]), n_records=len(summary.record_ids))
        for m in summary.metrics:
            s = summary.stats[v][m]
            row.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_ci_low": s.ci_low, f"{m}_ci_high": s.ci_high})
        for m in summary.metrics:
            s = summary.stats[v][m]
            row.update({f"{m}_diff": s.diff, f"{m}_diff_ci_low": s.diff_ci_low, f"{m}_diff_ci_high": s.diff_ci_high,
                        f"{m}_p": s.p, f"{m}_p_holm": s.p_holm})
        prim = summary.stats[v][summary.primary]
        row.update(p_vs_baseline=prim.p, p_vs_baseline_holm=prim.p_holm)
        row.update((extra or {}).get(v, {}))
        rows.append(row)
    return rows


def _f(x: Any, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _fp(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def _cell(s: MetricStats) -> str:
    txt = _f(s.mean) + ("" if s.std is None else f" ± {_f(s.std)}")
    return txt + ("" if s.ci_low is None else f" [{_f(s.ci_low)}, {_f(s.ci_high)}]")


def ablation_markdown(summary: AblationSummary, axes: Mapping[str, Mapping[str, Any]] | None = None,
                      title: str = "Ablation") -> str:
    """``ablation.md``: per variant and metric ``mean ± std [ci]``, the primary metric's difference to
    the baseline with its CI, and ``p (Holm)``."""
    axes = axes or {}
    names = list(dict.fromkeys(a for v in summary.variants for a in axes.get(v, {})))
    pm = summary.primary
    ns = sorted({len(s) for s in summary.seeds.values()})
    pct = f"{summary.confidence_level:.0%}"
    lines = [f"# {title}", "",
             f"Per variant and metric: mean ± std over seeds ({'/'.join(map(str, ns))} seeds; std with ddof=1)"
             + (f" and the {pct} paired percentile bootstrap CI over the {len(summary.record_ids)} common test records "
                f"({summary.n_resamples} joint resamples of records). Δ{pm}: difference to the baseline "
                f"`{summary.baseline}` with its CI; p: two-sided paired sign-flip permutation test on {pm}, "
                "Holm-adjusted across variants in parentheses." if summary.bootstrap else
                f" on the {len(summary.record_ids)} common test records (bootstrap off)."), ""]
    cols = names + ["variant"] + list(summary.metrics) + ([f"Δ{pm} [{pct} CI]", f"p {pm} (Holm)"]
                                                          if summary.bootstrap else [])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v in summary.variants:
        cells = [str(axes.get(v, {}).get(a, "")) for a in names] + [v]
        cells += [_cell(summary.stats[v][m]) for m in summary.metrics]
        if summary.bootstrap:
            s = summary.stats[v][pm]
            if v == summary.baseline:
                cells += ["(baseline)", "—"]
            else:
                d = f"{s.diff:+.4f}" if s.diff is not None else "n/a"
                if s.diff_ci_low is not None:
                    d += f" [{s.diff_ci_low:+.4f}, {s.diff_ci_high:+.4f}]"
                cells += [d, f"{_fp(s.p)} ({_fp(s.p_holm)})"]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.notes:
        lines += [""] + [f"Note: {n}." for n in summary.notes]
    return "\n".join(lines) + "\n"


def write_ablation(out_dir: str | os.PathLike[str], summary: AblationSummary,
                   axes: Mapping[str, Mapping[str, Any]] | None = None,
                   extra: Mapping[str, Mapping[str, Any]] | None = None, *,
                   title: str = "Ablation") -> tuple[Path, Path]:
    """Write ``ablation.csv`` (:func:`ablation_rows`; empty cell = undefined) and ``ablation.md``
    atomically into ``out_dir``; return their paths."""
    out = Path(out_dir)
    rows = ablation_rows(summary, axes, extra)
    names = list(dict.fromkeys(a for v in summary.variants for a in (axes or {}).get(v, {})))
    cols = ablation_columns(summary, names)
    cols += [k for k in dict.fromkeys(k for r in rows for k in r) if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    csv_path, md_path = out / "ablation.csv", out / "ablation.md"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(md_path, ablation_markdown(summary, axes, title))
    return csv_path, md_path


# ------------------------------------------------------------------------------------ report
def noise_sentences(summary: AblationSummary, metrics: Sequence[str] | None = None) -> list[str]:
    """Sentences for ``report.md``: which differences to the baseline are distinguishable from noise.

    A difference is distinguishable when its Holm-adjusted p-value (across the non-baseline
    variants, per metric) is below ``summary.alpha``; each sentence gives the difference, its
    (unadjusted) bootstrap CI and both p-values. ``metrics`` defaults to the primary metric.
    """
    metrics = [summary.primary] if metrics is None else list(metrics)
    base, others = summary.baseline, summary.variants[1:]
    if not summary.bootstrap:
        return ["No confidence intervals or tests: the bootstrap was turned off."]
    if not others:
        return [f"Only the baseline variant `{base}` was run; there is nothing to compare."]
    pct = f"{summary.confidence_level:.0%}"
    out = [(f"Each variant is compared with the baseline `{base}` on the {len(summary.record_ids)} test records "
           f"common to all variants: a two-sided paired sign-flip permutation test on the per-record difference of "
           f"the seed-averaged score ({summary.n_resamples} resamples), Holm-corrected across the {len(others)} "
           f"compared variants, and a {pct} paired bootstrap CI of the difference. A difference counts as "
           f"distinguishable from noise when the Holm-adjusted p is below {summary.alpha:g}. The CIs cover test-set "
           "sampling only; training noise shows in the std over seeds.")]
    out += [f"Note: {n}." for n in summary.notes]
    for m in metrics:
        yes, no = [], []
        for v in others:
            s = summary.stats[v][m]
            if s.diff is None or s.p is None:
                no.append(f"`{v}` cannot be compared on {m} (the metric is undefined on every record)")
                continue
            ci = "" if s.diff_ci_low is None else f", {pct} CI [{s.diff_ci_low:+.4f}, {s.diff_ci_high:+.4f}]"
            txt = f"`{v}` ({m} {s.diff:+.4f}{ci}, p = {_fp(s.p)}, Holm-adjusted p = {_fp(s.p_holm)})"
            (yes if s.p_holm is not None and s.p_holm < summary.alpha else no).append(txt)
        if yes:
            out.append(f"Distinguishable from noise on {m}: " + "; ".join(yes) + ".")
        if no:
            out.append(f"Not distinguishable from noise on {m}: " + "; ".join(no) + ".")
    return out
