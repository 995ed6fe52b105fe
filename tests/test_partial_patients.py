"""Partial patients: modality dropout presents a dropped modality exactly as inference presents an
absent one, keeps one modality, is deterministic and, off, changes nothing; the subset grammar, the
gate criterion and diagnose's one-line notice.  The end-to-end ``eval`` checks (subset table vs a
re-evaluation of a split with the modalities removed) are in test_orchestrator.py, on its run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medtvt_core.config import RunConfig, expand_subsets, resolve_config
from medtvt_core.build import build_readers as build_modalities
from medtvt_core.data import open_splits
from medtvt_core.data.synth import TEST_FILE, TRAIN_FILE
from medtvt_core.errors import ConfigError

MODS = ["ecg", "cxr", "lab"]


@pytest.fixture(scope="module")
def splits(cohort):
    readers = build_modalities(MODS)
    sp = open_splits(cohort, modalities=readers, train_file=TRAIN_FILE, test_file=TEST_FILE, persist_stats=False)
    return readers, sp


def _same_item(a, b) -> None:
    assert a["prompt"] == b["prompt"] and a["present"] == b["present"] and a["answer"] == b["answer"]
    assert sorted(a["inputs"]) == sorted(b["inputs"])
    for m in a["inputs"]:
        assert torch.equal(a["inputs"][m], b["inputs"][m])


def test_dropout_presents_a_dropped_modality_exactly_as_diagnose_presents_an_absent_one(splits, cohort):
    """A test record whose labs dropout leaves out, against ``medtvt diagnose``'s batch of the same
    patient given only its ECG and radiograph files: same prompt ids and attention mask, same modality
    mask and inputs."""
    from medtvt_core.model.processing import MedTVTProcessor
    from helpers import CORPUS

    readers, sp = splits
    test = sp["test"]
    drop = test.masked(dropout={"lab": 0.6}, salt="sft")
    idx = next(i for i in range(len(test)) if drop.absent_of(i) == {"lab"})
    rec = test.records[idx]
    batch = drop.collator()([drop[idx]])
    # the README's rule for an absent modality, restated
    assert "(lab not available)" in batch["prompts"][0] and "<lab>" not in batch["prompts"][0]

    import medtvt_plugins.llms.llama_lora as llama_lora
    from medtvt_core.build import build_llm_plugin
    from medtvt_core.plugins import build_catalog

    llm_plugin = build_llm_plugin({"name": "llama-lora", "options": {"variant": "tiny", "tokenizer_vocab_size": 400}},
                              build_catalog(plugins=[llama_lora], autoload=False))
    tok = llm_plugin.load_tokenizer(lambda: CORPUS + [r.question for r in test.records])
    ph = {m: type(readers[m]).placeholder for m in MODS}
    tok.add_special_tokens({"extra_special_tokens": list(ph.values())}, replace_extra_special_tokens=False)
    proc = MedTVTProcessor(tok, ph, 4, readers=readers)
    raw = json.loads((cohort / TEST_FILE).read_text())[idx]
    assert raw["id"] == rec.id if "id" in raw else True
    given = {"ecg": (str(cohort / raw["ECG"][0]), {}), "cxr": (str(cohort / raw["image"][0]), {})}
    inf = proc.read_patient(given, rec.question, modalities=MODS)

    # the model's batch, from the processor's call on each, for generation and for training
    a, b = proc(batch, answers=False), proc(inf, answers=False)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert torch.equal(a["modality_mask"], b["modality_mask"]) and a["modality_features"] == b["modality_features"] == {}
    train = proc(batch, answers=True, max_length=512)
    assert torch.equal(train["input_ids"][0, :a["input_ids"].shape[1]], a["input_ids"][0])  # one sample: no padding
    assert (train["labels"][0, :a["input_ids"].shape[1]] == -100).all() and (train["labels"][0] != -100).any()
    assert torch.equal(batch["modality_mask"], inf["modality_mask"])
    assert batch["modality_mask"].tolist() == [[True, True, False]]
    assert sorted(batch["modality_inputs"]) == sorted(inf["modality_inputs"]) == ["cxr", "ecg"]
    for m in ("ecg", "cxr"):
        assert torch.equal(batch["modality_inputs"][m], inf["modality_inputs"][m])


def test_dropout_keeps_one_modality_draws_at_its_rate_and_is_deterministic(splits):
    _, sp = splits
    train = sp["train"]
    n = len(train)
    state = torch.random.get_rng_state()
    high = train.masked(dropout={m: 0.95 for m in MODS}, salt="sft")
    seen = set()
    for ep in range(30):
        high.set_epoch(ep)
        for i in range(n):
            gone = high.absent_of(i)
            assert len(gone) < 3  # the floor: one modality kept
            seen.add(gone)
    # which modality the floor keeps is drawn, not always the same
    assert {frozenset(MODS) - g for g in seen if len(g) == 2} == {frozenset([m]) for m in MODS}
    # the rate, restated: each of three is dropped w.p. p, and when all three are, one of them is kept
    # uniformly, so P(m dropped) = p - p^3 / 3
    p = 0.3
    d = train.masked(dropout={m: p for m in MODS}, salt="sft")
    counts = {m: 0 for m in MODS}
    draws = 0
    for ep in range(60):
        d.set_epoch(ep)
        for i in range(n):
            for m in d.absent_of(i):
                counts[m] += 1
            draws += 1
    for m in MODS:
        assert abs(counts[m] / draws - (p - p**3 / 3)) < 0.05, (m, counts[m] / draws)
    # deterministic: a fresh copy with the same seed, epoch and salt draws the same; another salt or seed not
    again = train.masked(dropout={m: p for m in MODS}, salt="sft")
    again.set_epoch(59)
    assert [again.absent_of(i) for i in range(n)] == [d.absent_of(i) for i in range(n)]
    other = train.masked(dropout={m: p for m in MODS}, salt="rft")
    other.set_epoch(59)
    assert [other.absent_of(i) for i in range(n)] != [d.absent_of(i) for i in range(n)]
    assert torch.equal(state, torch.random.get_rng_state())  # never the global RNG
    # the item and the batch follow the draw
    it = d[0]
    assert {m for m, v in it["present"].items() if not v} == set(d.absent_of(0))
    with pytest.raises(ConfigError, match="not in use"):
        train.masked(dropout={"note": 0.2})


def test_dropout_off_changes_nothing(splits):
    _, sp = splits
    train = sp["train"]
    state = torch.random.get_rng_state()
    for i in range(3):
        base = train[i]
        _same_item(base, train.masked()[i])
        _same_item(base, train.masked(dropout={"ecg": 0.0, "cxr": 0.0}, salt="sft")[i])
    assert torch.equal(state, torch.random.get_rng_state())
    # the stage store key is the one of a config without the field, and eval settings never retrain
    from medtvt_core.run.orchestrator import stage_key

    root = sp["train"].root
    off = resolve_config(preset="demo", sets=["sft.modality_dropout={}", "rft.modality_dropout={}"])
    on = resolve_config(preset="demo")
    ev = resolve_config(preset="demo", sets=["eval.modalities=ecg+lab", "eval.modality_subsets=all-pairs"])
    assert stage_key(off, "pt", root) == stage_key(on, "pt", root)  # PT has no dropout in the demo
    assert stage_key(off, "sft", root) != stage_key(on, "sft", root)
    for s in ("pt", "sft", "rft"):
        assert stage_key(ev, s, root) == stage_key(on, s, root)


def test_config_fields_and_subset_grammar():
    demo, paper = resolve_config(preset="demo"), resolve_config(preset="paper")
    assert all(demo.sft.modality_dropout[m] > 0 for m in MODS) and demo.rft.modality_dropout
    assert not paper.pt.modality_dropout and not paper.sft.modality_dropout and not paper.rft.modality_dropout
    assert expand_subsets(["all-singles"], MODS) == [("ecg",), ("cxr",), ("lab",)]
    assert expand_subsets(["all-pairs", "lab+ecg", "ecg,lab"], MODS) == [("ecg", "cxr"), ("ecg", "lab"), ("cxr", "lab")]
    assert resolve_config(sets=["eval.modalities=lab+ecg"]).eval.modalities == ["lab", "ecg"]
    assert resolve_config(sets=["eval.modalities=all"]).eval.modalities is None
    assert resolve_config(sets=["eval.modality_subsets=ecg+lab,cxr"]).eval.modality_subsets == ["ecg+lab", "cxr"]
    # evaluation scores the model as it writes unless asked to decode as diagnose does (the report grammar)
    assert not any(resolve_config(preset=p).eval.constrained_decoding for p in ("demo", "study", "paper"))
    assert resolve_config(sets=["eval.constrained_decoding=true"]).eval.constrained_decoding is True
    for bad, needle in (("sft.modality_dropout={note: 0.1}", "not a modality of the run"),
                        ("rft.modality_dropout={ecg: 1.0}", "not a probability"),
                        ("eval.modality_subsets=ecg+xray", "not a subset"),
                        ("eval.modalities=ecg+ecg", "not a subset")):
        with pytest.raises(ConfigError, match=needle):
            resolve_config(sets=[bad])
    assert "modality_dropout" in RunConfig.model_fields["sft"].annotation.model_fields


def test_gate_check_criterion():
    from medtvt_core.run.attribution import gate_check, gate_sentence

    ds = [f"d{i}" for i in range(7)]
    drops = {d: {"ecg": 0.1 * i, "cxr": 0.05 * (6 - i), "lab": 0.02 * ((i * 3) % 7)} for i, d in enumerate(ds)}
    att = {"per_disease": {d: {"delta": v} for d, v in drops.items()}}
    # gates that follow the drops (a monotone map), not saturated: informative
    follow = {d: {m: 0.2 + 0.5 * x for m, x in v.items()} for d, v in drops.items()}
    g = gate_check(follow, att)
    assert g["informative"] and g["spearman_rho"] == pytest.approx(1.0) and g["pairs"] == 21
    assert gate_sentence(g).startswith("The CAO gates are informative")
    # saturated gates (the demo's CXR 1.0000 for every disease): not informative, said in words
    sat = {d: {"ecg": 0.999, "cxr": 1.0, "lab": 0.001 + 0.0001 * i} for i, d in enumerate(ds)}
    s = gate_check(sat, att)
    assert not s["informative"] and s["saturated_share"] == 1.0
    assert gate_sentence(s).startswith("The CAO gates are not informative")
    # gates reversed against the drops: rank correlation -1, not informative
    rev = {d: {m: 0.8 - 0.5 * x for m, x in v.items()} for d, v in drops.items()}
    assert gate_check(rev, att)["spearman_rho"] == pytest.approx(-1.0) and not gate_check(rev, att)["informative"]
    assert gate_check({}, att) is None


def test_diagnose_notice_follows_the_saved_dropout_flag():
    from medtvt_core.model import MedTVTConfig
    from medtvt_core.run.diagnose import missing_notice

    plain = MedTVTConfig(modalities=MODS)
    trained = MedTVTConfig.from_dict(MedTVTConfig(modalities=MODS, modality_dropout={"sft": {"ecg": 0.25}}).to_dict())
    assert not plain.trained_for_missing_modalities and trained.trained_for_missing_modalities
    model = SimpleNamespace(modalities=MODS, config=plain)
    note = missing_notice(model, {"cxr": None})
    assert note and "\n" not in note and "not trained for missing modalities" in note and "ecg, lab" in note
    assert missing_notice(model, {m: None for m in MODS}) is None
    assert missing_notice(SimpleNamespace(modalities=MODS, config=trained), {"cxr": None}) is None


def test_subset_table_over_seeds_is_mean_and_std():
    import statistics

    from medtvt_core.run.subsets import aggregate_subsets

    def res(f1_all, f1_ecg, ev):
        row = lambda f1, ev_f1: {"f1": f1, "answer_rate": 1.0, "reward": {"format": 1.0, "total": 1.5},  # noqa: E731
                                 "evidence_f1": ev_f1, "evidence_f1_all": 0.5}
        return {"subsets": ["all", "ecg"], "rows": {"all": row(f1_all, 0.5), "ecg": row(f1_ecg, ev)}}

    lines = aggregate_subsets({0: res(0.6, 0.4, 0.45), 1: res(0.7, 0.5, 0.55), 2: res(0.65, 0.3, 0.5)})
    ecg = next(ln for ln in lines if ln.startswith("| ecg |")).split(" | ")
    assert ecg[1] == f"{statistics.mean([0.4, 0.5, 0.3]):.3f} ± {statistics.stdev([0.4, 0.5, 0.3]):.3f}"
    assert ecg[-1].rstrip(" |") == f"{statistics.mean([-0.05, 0.05, 0.0]):.3f} ± {statistics.stdev([-0.05, 0.05, 0.0]):.3f}"


def test_constrained_decoding_is_refused_under_python_O():
    """xgrammar's transformers processor advances each row's parser inside an ``assert``: under ``python -O``
    it would silently stop constraining, so medtvt refuses it in one line instead."""
    import subprocess
    import sys

    code = ("from medtvt_core.model.generation import report_constraint\n"
            "from medtvt_core.errors import ConfigError\n"
            "try:\n    report_constraint(None, 10)\nexcept ConfigError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: constrained decoding does not work under python -O"), r.stdout
    assert len(r.stdout.strip().splitlines()) == 1
