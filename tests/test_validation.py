"""Validation during training, the best checkpoint and the reward-hacking alarm (issue 22)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medtvt_core.config import RewardRef
from medtvt_core.run.alarm import alarms_over_training, reward_hacking_alarm
from medtvt_core.run.validation import ValidationCallback, best_validation, carve_validation, validate


# --------------------------------------------------------------------------- the split
def test_validation_split_is_seeded_disjoint_and_independent_of_order():
    recs = [SimpleNamespace(id=f"p{i}-disease") for i in range(400)]
    rest, val = carve_validation(recs, 0.1, seed=0)
    assert {id(r) for r in rest}.isdisjoint({id(r) for r in val}) and len(rest) + len(val) == 400
    assert 25 <= len(val) <= 55  # ~40 expected
    _, val2 = carve_validation(recs[::-1], 0.1, seed=0)
    assert {r.id for r in val2} == {r.id for r in val}  # the file order does not matter
    assert {r.id for r in carve_validation(recs, 0.1, seed=1)[1]} != {r.id for r in val}  # the seed does


# --------------------------------------------------------------------------- the alarm rule
def _history(train, f1_per_validation, every=4, key="reward"):
    """Training logs every step (``train[s-1]`` at step s) and a validation every ``every`` steps."""
    hist = [{"step": s, key: v} for s, v in enumerate(train, start=1)]
    for k, f1 in enumerate(f1_per_validation):
        ids = [f"r{i}" for i in range(len(f1))]
        hist.append({"step": k * every, "val_f1": float(np.mean(f1)), "val_records": {"f1": dict(zip(ids, f1))}})
    return sorted(hist, key=lambda h: (h["step"], "val_f1" in h))


def test_alarm_when_training_reward_rises_and_held_out_f1_falls_beyond_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.9, 30)
    f1s = [base, base - 0.05 + rng.normal(0, 0.02, 30), base - 0.2 + rng.normal(0, 0.05, 30)]
    train = list(np.linspace(1.0, 1.8, 8))
    v = reward_hacking_alarm(_history(train, f1s), stage="rft", window=3, n_resamples=2000)
    assert v["raised"] is True and v["steps"] == [0, 4, 8]
    # the numbers, against an independent oracle: scipy's percentile bootstrap of the paired mean difference
    from scipy import stats

    d = f1s[-1] - f1s[0]
    ci = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=2000, rng=np.random.default_rng(1))
    assert v["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert v["ci"][0] == pytest.approx(ci.confidence_interval.low, abs=0.01)
    assert v["ci"][1] == pytest.approx(ci.confidence_interval.high, abs=0.01) and v["ci"][1] < 0
    assert v["train_first"] == pytest.approx(np.mean(train[:4])) and v["train_last"] == pytest.approx(np.mean(train[4:]))
    msg = v["message"]
    assert msg.startswith("REWARD-HACKING ALARM (RFT, steps 0-8)")
    assert f"{v['diff']:+.4f}" in msg and f"{v['train_first']:.4f}" in msg and "30 validation records" in msg


def test_no_alarm_on_noise_on_a_falling_reward_or_on_too_little_data():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.4, 0.9, 30)
    noisy = [base, base + rng.normal(0, 0.05, 30), base + rng.normal(0, 0.05, 30)]
    rising = list(np.linspace(1.0, 1.8, 8))
    v = reward_hacking_alarm(_history(rising, noisy), stage="rft")
    assert v["raised"] is False and v["ci"][0] < 0 < v["ci"][1] and "within its bootstrap noise" in v["message"]
    falling_f1 = [base, base - 0.1, base - 0.2]
    v = reward_hacking_alarm(_history(rising[::-1], falling_f1), stage="rft")
    assert v["raised"] is False and "did not improve" in v["message"]
    # SFT: the training signal is the loss (lower is better): a falling loss with falling F1 is an alarm
    v = reward_hacking_alarm(_history(rising[::-1], falling_f1, key="loss"), stage="sft")
    assert v["raised"] is True and "training loss fell" in v["message"]
    assert reward_hacking_alarm(_history(rising, falling_f1[:2]), stage="rft")["raised"] is None
    few = [f[:4] for f in falling_f1]
    assert "needs 5" in reward_hacking_alarm(_history(rising, few), stage="rft")["message"]


# --------------------------------------------------------------------------- a gamed reward, trained
def _upper(proc, text):
    ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    return sum(t >= len(proc.tokenizer) // 2 for t in ids) / max(len(ids), 1)


@pytest.fixture
def task_rewards(monkeypatch):
    """Test reward plugins in the process's catalog: ``task`` (the held-out objective: the share of
    tokens from the lower half of the vocabulary, about half for the untrained model) and ``gamed``
    (a reward built to be gamed: it pays for upper-half tokens, i.e. for more of what it counts,
    as a list-size bonus pays for more diagnoses; maximising it destroys the task)."""
    import medtvt_core.plugins as plugins
    from medtvt_core import hookimpl

    box: dict = {}

    def task(prompts, completions, **kw):
        return [1.0 - _upper(box["proc"], c) for c in completions]

    def gamed(prompts, completions, **kw):
        return [_upper(box["proc"], c) for c in completions]

    class Plugin:
        @hookimpl
        def medtvt_register_rewards(self, register):
            register("task", task)
            register("gamed", gamed)

    monkeypatch.setattr(plugins, "_CATALOG", plugins.build_catalog(plugins=[Plugin()]))
    return box, task, gamed


def _train_with_validation(cohort, tmp_path, box, reward, steps=8):
    from test_grpo import _tiny, _trainer

    model, proc, ds = _tiny(cohort, train_extras=True)
    box["proc"] = proc
    rest, val = carve_validation(ds.records, 0.45, seed=0)
    train_ds, val_ds = ds.subset(rest), ds.subset(val)
    saved = []

    def run(m, step):
        rng = torch.get_rng_state()
        e = validate(m, proc, val_ds, rewards=[RewardRef(name="task")], max_new_tokens=8, batch_size=32, samples=4,
                     temperature=1.0, top_p=1.0, seed=0, step=step)
        assert torch.equal(rng, torch.get_rng_state())  # validating leaves training's random stream alone
        return e

    live = []  # what the run's log would say, as it happens

    def on_validation(history):
        v = reward_hacking_alarm(history, stage="rft", metric="reward_sampled", window=3, seed=0)
        if v["raised"]:
            live.append(v)

    cb = ValidationCallback(eval_steps=4, run=run, stage_dir=tmp_path, metric="val_reward_sampled",
                            save=lambda m, p: saved.append(p.name), is_main=True, barrier=lambda: None,
                            on_validation=on_validation)
    tr = _trainer(model, proc, train_ds, tmp_path, [reward], max_steps=steps, batch_size=2, grad_accum=1,
                  num_generations=4, lr=3e-2, beta=0.0, max_completion_length=8)
    tr.add_callback(cb)
    tr.train()
    return tr.state.log_history, len(val), saved, live


def test_gamed_reward_raises_the_alarm_and_the_task_reward_does_not(cohort, tmp_path, task_rewards, one_torch_thread):
    """Robust by construction, not by luck: all seeds fixed; the gamed reward and the task are exact
    opposites on every token, so whatever GRPO learns from one moves the other the other way; the
    margins (training reward +0.2, CI below 0) were far exceeded when measured (see the asserts'
    messages), and the honest run trains on the task itself, so its held-out metric cannot fall
    for the reason the alarm looks for."""
    box, task, gamed = task_rewards
    hist, n_val, saved, live = _train_with_validation(cohort, tmp_path / "gamed", box, gamed)
    vals = [h for h in hist if "val_f1" in h]
    assert [h["step"] for h in vals] == [0, 4, 8] and n_val >= 5
    # held out: the task reward of 4 sampled reports per validation record (at temperature 1 the untrained
    # model writes about half lower-half tokens; its greedy reports repeat one upper-half token)
    kw = dict(stage="rft", metric="reward_sampled", window=3, seed=0)
    raised = alarms_over_training(hist, **kw)
    # the log said so as it happened (it had seen the training logs up to the step before the validation)
    assert len(raised) == 1 and [a["steps"] for a in live] == [raised[0]["steps"]]
    v = raised[0]
    assert v["train_last"] - v["train_first"] > 0.2 and v["diff"] < -0.2, v["message"]
    assert "REWARD-HACKING ALARM (RFT, steps 0-8)" in v["message"] and "held-out reward_sampled" in v["message"]
    # the best checkpoint by the held-out task reward is an early one: saved at its step, not after
    best = best_validation(hist, "val_reward_sampled")
    assert saved and saved[-1] == f"best-{best['step']}" and best["val_reward_sampled"] > vals[-1]["val_reward_sampled"]

    hist, _, _, live = _train_with_validation(cohort, tmp_path / "honest", box, task)
    assert not alarms_over_training(hist, **kw) and not live
    v = reward_hacking_alarm(hist, **kw)
    assert v["raised"] is False and v["train_last"] > v["train_first"], v["message"]  # the reward rose here too


# --------------------------------------------------------------------------- the run
def test_run_validates_keeps_the_best_step_and_resumes(tmp_path, tiny_config):
    """A tiny RFT run (the demo's rewards) validated every step: history, metrics.json, report.md,
    final = the best step, last = the last; no alarm; an interrupted run resumed from its step-2
    checkpoint chooses the same step with the same numbers."""
    import shutil

    from medtvt_core.config import resolve_config
    from medtvt_core.run.orchestrator import Run

    out = tmp_path / "run"
    cfg = resolve_config(config_file=tiny_config, sets=[
        "stages=[rft]", "evaluate=false", "validation.fraction=0.4", "rft.eval_steps=1", "rft.max_steps=3",
        "rft.metric_for_best_model=val_reward_sampled", f"output_dir={out}"])
    Run(cfg, progress=False, echo=lambda s: None).execute()
    m = json.loads((out / "metrics.json").read_text())["validation"]["rft"]
    hist = json.loads((out / "history.json").read_text())["rft"]
    vals = [h for h in hist if "val_f1" in h]
    assert [h["step"] for h in vals] == m["steps"] == [0, 1, 2, 3]
    assert m["split"]["n_records"] == vals[0]["val_n"] >= 5 and m["split"]["fraction"] == 0.4
    assert {"val_f1", "val_answer_rate", "val_reward", "val_reward/format", "val_reward/jaccard",
            "val_reward_sampled", "val_f1/Sepsis"} <= vals[-1].keys()
    chosen = m["chosen"]
    best = max((h for h in vals if h["step"] > 0), key=lambda h: (h["val_reward_sampled"], -h["step"]))
    assert chosen["step"] == best["step"] and chosen["val_f1"] == best["val_f1"] and "highest" in chosen["why"]
    assert (out / "rft" / "final").is_dir() and (out / "rft" / "last").is_dir()
    assert not list((out / "rft").glob("best-*"))
    # the demo's rewards on an untrained model: no alarm (no verdict, or a verdict of silence)
    assert m["alarm"]["raised"] is not True and m["alarms_during_training"] == []
    report = (out / "report.md").read_text()
    assert "## Validation during RFT" in report and (out / "validation_rft.png").is_file()
    assert f"`rft/final` is the model of step {chosen['step']}" in report and m["alarm"]["message"] in report

    # interrupted after the step-2 checkpoint: what a kill at step 3 leaves
    final = out / "rft" / "final"
    if chosen["step"] <= 2:
        shutil.copytree(final, out / "rft" / f"best-{chosen['step']}")
    for p in (final, out / "rft" / "last", out / "rft" / "checkpoint-3", out / "metrics.json"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    Run(cfg, resume=True, progress=False, echo=lambda s: None).execute()
    m2 = json.loads((out / "metrics.json").read_text())["validation"]["rft"]
    assert m2["chosen"]["step"] == chosen["step"] and m2["steps"] == m["steps"]
    assert m2["val_f1"] == pytest.approx(m["val_f1"])
    assert (out / "rft" / "final").is_dir() and (out / "rft" / "last").is_dir()


def test_validation_from_rft_prompts_leaves_sfts_records_alone(tmp_path, tiny_config):
    """``validation.source: rft_prompts`` (the demo's): the split comes only from the records
    ``data.rft_holdout`` gives RFT, so SFT's records are exactly those of a run without validation;
    ``train`` takes it from every training record first. The rule restated: sha256 of
    'validation:<seed>:<id>' below the fraction, among RFT's records (sha256 'holdout:<id>' below rft_holdout)."""
    import hashlib

    from medtvt_core.config import resolve_config
    from medtvt_core.errors import ConfigError
    from medtvt_core.run.orchestrator import Run

    def u(text: str) -> float:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64

    def splits(*sets: str) -> Run:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = resolve_config(config_file=tiny_config, sets=["stages=[sft,rft]", "data.rft_holdout=0.5", "seed=3",
                                                            f"output_dir={out}", *sets])
        run = Run(cfg, progress=False, echo=lambda s: None)
        run.setup()
        return run

    plain = splits()
    ids = lambda ds: [r.id for r in ds.records]  # noqa: E731
    sft_plain, rft_plain = ids(plain.stage_split("sft")), ids(plain.stage_split("rft"))
    run = splits("validation.fraction=0.3", "validation.source=rft_prompts", "rft.eval_steps=1")
    assert ids(run.stage_split("sft")) == sft_plain
    want_val = [i for i in rft_plain if u(f"validation:3:{i}") < 0.3]
    assert want_val and ids(run.splits["val"]) == want_val
    assert ids(run.stage_split("rft")) == [i for i in rft_plain if i not in want_val]
    every = splits("validation.fraction=0.3", "validation.source=train", "rft.eval_steps=1")  # SFT loses some too
    train_ids = sft_plain + rft_plain
    assert set(ids(every.splits["val"])) == {i for i in train_ids if u(f"validation:3:{i}") < 0.3}
    assert set(ids(every.stage_split("sft"))) < set(sft_plain)
    with pytest.raises(ConfigError, match="needs data.rft_holdout > 0"):
        resolve_config(config_file=tiny_config, sets=["validation.fraction=0.3", "validation.source=rft_prompts",
                                                      "rft.eval_steps=1", "data.rft_holdout=0"])


def test_validation_from_the_datasets_own_split_costs_no_stage_a_record(tmp_path, tiny_config):
    """``validation.source: file`` (the demo's): the split is ``data.val_file`` whole, here the synthetic
    cohort's validation patients; SFT and RFT train on exactly the records of a run without validation."""
    from medtvt_core.config import resolve_config
    from medtvt_core.data.synth import synthesize
    from medtvt_core.errors import ConfigError
    from medtvt_core.run.orchestrator import Run

    root = tmp_path / "cohort"
    synthesize(root, n_patients=24, seed=0, val_patients=6, workers=1)

    def splits(*sets: str) -> Run:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = resolve_config(config_file=tiny_config, sets=["stages=[sft,rft]", "data.rft_holdout=0.5",
                                                            f"data.root={root}", f"output_dir={out}", *sets])
        run = Run(cfg, progress=False, echo=lambda s: None)
        run.setup()
        return run

    ids = lambda ds: [r.id for r in ds.records]  # noqa: E731
    plain = splits()
    assert "val" not in plain.splits
    run = splits("validation.source=file", "data.val_file=qa/disease_val.json", "rft.eval_steps=1")
    for stage in ("sft", "rft"):
        assert ids(run.stage_split(stage)) == ids(plain.stage_split(stage))
    val = json.loads((root / "qa" / "disease_val.json").read_text())
    assert ids(run.splits["val"]) == [r["id"] for r in val] and len(val) == 6
    assert not set(ids(run.splits["val"])) & {r.id for s in ("train", "test") for r in run.splits[s].records}
    with pytest.raises(ConfigError, match=r"data.val_file 'qa/none.json' \(validation.source=file\) does not exist "
                                          r"under .*cohort; .* or set rft.eval_steps=0"):
        splits("validation.source=file", "data.val_file=qa/none.json", "rft.eval_steps=1")
    test = json.loads((root / "qa" / "disease_test.json").read_text())
    (root / "qa" / "val_leaks.json").write_text(json.dumps(val + test[:2]))  # two test records validate
    with pytest.raises(ConfigError, match=r"data.val_file 'qa/val_leaks.json' shares 2 record id\(s\) with "
                                          r"data.test_file \(.*\); the validation split must hold records of its own"):
        splits("validation.source=file", "data.val_file=qa/val_leaks.json", "rft.eval_steps=1")
    with pytest.raises(ConfigError, match="validation.source=file needs data.val_file"):
        resolve_config(config_file=tiny_config, sets=["validation.source=file", "data.val_file=null"])
    with pytest.raises(ConfigError, match="eval_steps=1 needs a validation split"):
        resolve_config(config_file=tiny_config, sets=["validation.fraction=0", "rft.eval_steps=1"])


@pytest.mark.parametrize("sets, message", [
    (["data.val_file=qa/disease_test.json"], "data.val_file=qa/disease_test.json is also data.test_file"),
    (["data.val_file=qa/pt_ecg.json"], r"is also data.pt_files\[0\]"),
    (["validation.fraction=0.2"], "validation.fraction=0.2 with validation.source=file: the file is the whole split"),
    (["rft.metric_for_best_model=val_recall"], "rft.metric_for_best_model='val_recall'; allowed: val_f1, "),
    (["rft.eval_steps=0"], r"rft.metric_for_best_model needs rft.eval_steps > 0"),
])
def test_validation_options_that_cannot_work_are_refused_in_one_line(sets, message):
    """Checked on the demo preset (validation.source=file): each refusal names the option and what is allowed."""
    from medtvt_core.config import resolve_config
    from medtvt_core.errors import ConfigError

    base = ["rft.metric_for_best_model=val_f1"] if "rft.eval_steps=0" in sets else []
    with pytest.raises(ConfigError, match=message) as e:
        resolve_config(preset="demo", sets=[*base, *sets])
    assert "\n" not in str(e.value).strip()


def test_the_stage_store_tells_validation_splits_apart(tmp_path):
    """A stored stage is reused only by a run that validates on the same records the same way."""
    from medtvt_core.config import resolve_config
    from medtvt_core.run.orchestrator import stage_key

    def key(*sets: str) -> str:
        return stage_key(resolve_config(preset="demo", sets=list(sets)), "rft", tmp_path)

    demo = key()
    carved = ["validation.source=train", "validation.fraction=0.2"]
    keys = [demo, key(*carved), key("validation.source=rft_prompts", "validation.fraction=0.2"),
            key(*carved[:1], "validation.fraction=0.1"), key("data.val_file=qa/other_val.json"),
            key("validation.samples=4"), key("rft.metric_for_best_model=val_f1")]
    assert len(set(keys)) == len(keys)
    assert key() == demo and key("rft.eval_steps=0") == key("rft.eval_steps=0", "validation.samples=4")
    # what RFT's validations compute does not retrain PT and SFT, which validate nothing in the demo
    sft = lambda *sets: stage_key(resolve_config(preset="demo", sets=list(sets)), "sft", tmp_path)  # noqa: E731
    assert sft("validation.samples=4", "validation.alarm_window=5") == sft() != sft(*carved)
