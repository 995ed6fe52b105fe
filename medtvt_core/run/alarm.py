"""The reward-hacking alarm: the training objective improves while a held-out metric falls.

Over the last K validations ``v_0 .. v_{K-1}`` of a stage (``validation.alarm_window``):

* the training signal is the mean logged training ``reward`` (RFT; higher is better) or ``loss``
  (PT/SFT; lower is better) over the steps ``(v_0, v_1]`` and over ``(v_{K-2}, v_{K-1}]``; it
  *improves* when the later mean is better than the earlier one;
* the held-out change is ``metric(v_{K-1}) - metric(v_0)`` on the validation records
  (``validation.alarm_metric``: per-record F1, answer rate, weighted reward or one reward), with
  the paired percentile bootstrap CI over records of :func:`medtvt_core.stats.summarize_ablation`
  (the two validations as two variants scored on the same records); it *falls by more than its
  bootstrap noise* when the whole CI lies below 0.

The alarm is raised when both hold.  Fewer than K validations, fewer than ``MIN_RECORDS``
records, or no training signal in either interval: no verdict (said so in words).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..stats import summarize_ablation

MIN_RECORDS = 5  # a percentile bootstrap over fewer records has too few distinct resamples to mean much


def validations(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation entries of a stage's history, in step order (one per step: the latest wins)."""
    by_step = {h["step"]: h for h in history if "val_f1" in h}
    return [by_step[s] for s in sorted(by_step)]


def _train_mean(history: Sequence[dict[str, Any]], key: str, lo: int, hi: int) -> float | None:
    vals = [h[key] for h in history if key in h and h[key] is not None and "val_f1" not in h and lo < h["step"] <= hi]
    return sum(vals) / len(vals) if vals else None


def reward_hacking_alarm(history: Sequence[dict[str, Any]], *, stage: str, metric: str = "f1", window: int = 3,
                         confidence_level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The verdict on the last ``window`` validations of ``history`` (module doc): a dict with
    ``raised`` (bool or None when no verdict), ``message`` (one paragraph, numbers included) and the
    numbers themselves."""
    vals = validations(history)
    key = "reward" if any("reward" in h and "val_f1" not in h for h in history) else "loss"
    what = "training reward" if key == "reward" else "training loss"
    out: dict[str, Any] = {"stage": stage, "metric": metric, "window": window, "train_signal": key, "raised": None}
    if len(vals) < max(window, 3):
        out["message"] = (f"No reward-hacking verdict for {stage.upper()}: {len(vals)} validation(s), the alarm needs "
                          f"{max(window, 3)}.")
        return out
    w = vals[-window:]
    first, last = w[0], w[-1]
    t0 = _train_mean(history, key, w[0]["step"], w[1]["step"])
    t1 = _train_mean(history, key, w[-2]["step"], w[-1]["step"])
    a, b = first["val_records"][metric], last["val_records"][metric]
    common = [r for r in a if r in b]
    out.update(steps=[h["step"] for h in w], train_first=t0, train_last=t1, n_records=len(common))
    if t0 is None or t1 is None:
        out["message"] = (f"No reward-hacking verdict for {stage.upper()}: no {what} was logged between validations "
                          f"{w[0]['step']}-{w[1]['step']} or {w[-2]['step']}-{w[-1]['step']}.")
        return out
    if len(common) < MIN_RECORDS:
        out["message"] = (f"No reward-hacking verdict for {stage.upper()}: {len(common)} validation record(s), the "
                          f"bootstrap needs {MIN_RECORDS}.")
        return out
    scores = {"first": {0: {metric: {r: a[r] for r in common}}}, "last": {0: {metric: {r: b[r] for r in common}}}}
    s = summarize_ablation(scores, metrics=[metric], primary=metric, n_resamples=n_resamples,
                           confidence_level=confidence_level, random_state=seed, min_records=MIN_RECORDS)
    st0, st1 = s.stats["first"][metric], s.stats["last"][metric]
    improves = t1 > t0 if key == "reward" else t1 < t0
    falls = st1.diff_ci_high is not None and st1.diff_ci_high < 0
    out.update(metric_first=st0.mean, metric_last=st1.mean, diff=st1.diff, ci=[st1.diff_ci_low, st1.diff_ci_high],
               confidence_level=confidence_level, raised=bool(improves and falls))
    pct = f"{confidence_level:.0%}"
    ci = "no interval" if st1.diff_ci_low is None else f"{pct} paired bootstrap CI [{st1.diff_ci_low:+.4f}, {st1.diff_ci_high:+.4f}]"
    span = f"steps {w[0]['step']}-{w[-1]['step']}"
    nums = (f"the {what} went {t0:.4f} -> {t1:.4f} ({t1 - t0:+.4f}; mean over steps {w[0]['step']}-{w[1]['step']} vs "
            f"{w[-2]['step']}-{w[-1]['step']}) and held-out {metric} {_f(st0.mean)} -> {_f(st1.mean)} "
            f"({_f(st1.diff, '+')}, {ci}, {len(common)} validation records)")
    if out["raised"]:
        out["message"] = (f"REWARD-HACKING ALARM ({stage.upper()}, {span}): the {what} "
                          f"{'rose' if key == 'reward' else 'fell'} while held-out {metric} fell by more than its "
                          f"bootstrap noise: {nums}. The model is getting better at the training objective and worse "
                          f"at the task; inspect the rewards (a gameable term?) and prefer an earlier checkpoint.")
    else:
        why = ("the held-out change is within its bootstrap noise or up" if not falls
               else f"the {what} did not improve")
        out["message"] = f"No reward-hacking alarm ({stage.upper()}, {span}): {why}; {nums}."
    return out


def _f(x: float | None, sign: str = "") -> str:
    return "n/a" if x is None else f"{x:{sign}.4f}"


def alarms_over_training(history: Sequence[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    """The raised verdicts of every window the stage went through (each validation, as it happened)."""
    vals = validations(history)
    out = []
    for v in vals[2:]:
        upto = [h for h in history if h.get("step", 0) <= v["step"]]
        verdict = reward_hacking_alarm(upto, **kw)
        if verdict["raised"]:
            out.append(verdict)
    return out
