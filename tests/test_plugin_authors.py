"""A plugin author's path end to end, and the mistakes that used to break runs.

* ``medtvt plugins new`` writes a distribution per kind; pip installs them (a real install into a
  target directory on ``PYTHONPATH``: entry-point discovery sees their dist-info); each passes the
  contract kit through its own pytest file and all five train together in a short demo run, named
  with distribution and version in metrics.json and report.md.
* Each typical mistake, planted in a copy of a template, is reported in one line naming the plugin:
  by the kit (in-process) or by the CLI (a run, an evaluation, ``plugins check``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from test_orchestrator import TINY_SETS, _env, _show, ok, one_line_error

MEDTVT = Path(sys.executable).with_name("medtvt")
#: kind of ``plugins new`` -> the name given to the template in these tests
AUTHORED = {"reward": "answer-count", "encoder": "ecg-cnn1d", "fusion": "gate-mix", "llm": "tiny-qwen2",
            "modality": "vitals"}


def _new(kind: str, name: str, out: Path) -> Path:
    from medtvt_cli.main import cli

    res = CliRunner().invoke(cli, ["plugins", "new", kind, name, "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def _pip_target(dists: list[Path], target: Path) -> None:
    """pip-install ``dists`` into ``target`` offline, without dependencies (medtvt is already installed)."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--no-compile", "--disable-pip-version-check", "--target", str(target), *map(str, dists)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, _show(r)


def _env_with(*sites: Path, **extra: str) -> dict[str, str]:
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.update(extra)
    return env


def _plant(path: Path, edits: list[tuple[str, str]]) -> None:
    text = path.read_text()
    for old, new in edits:
        assert old in text, f"the template changed: {old!r} not in {path}"
        text = text.replace(old, new, 1)
    path.write_text(text)


# --------------------------------------------------------------------------- the author's path
@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """The five templates written by ``medtvt plugins new`` and pip-installed into one target directory."""
    root = tmp_path_factory.mktemp("authored")
    dists = [_new(kind, name, root / f"medtvt-{name}") for kind, name in AUTHORED.items()]
    site = root / "site"
    _pip_target(dists, site)
    assert sorted(p.name for p in site.glob("*.dist-info")) == sorted(f"medtvt_{n.replace('-', '_')}-0.1.0.dist-info"
                                                                      for n in AUTHORED.values())
    return root, site


def test_templates_pass_the_kit_from_their_own_tests(installed):
    root, site = installed
    tests = [str(root / f"medtvt-{n}" / "tests") for n in AUTHORED.values()]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "--import-mode=importlib", *tests], capture_output=True, text=True, cwd=root,
                       env=_env_with(site), timeout=600)
    assert r.returncode == 0, _show(r)
    # one test per kit check (rewards 3, encoders 4, fusion 4, LLMs 3, modalities 3) + the templates' own tests
    assert re.search(r"\b23 passed\b", r.stdout), _show(r)


@pytest.fixture(scope="module")
def demo_run(installed, cohort, tmp_path_factory) -> Path:
    """All five installed plugins in one short demo run (SFT, RFT, evaluation)."""
    _, site = installed
    work = tmp_path_factory.mktemp("authored-run")
    data = work / "data"
    shutil.copytree(cohort, data)
    (data / "vitals").mkdir()
    for split in ("qa/disease_train.json", "qa/disease_test.json"):  # the new modality's files and field
        recs = json.loads((data / split).read_text())
        for i, r in enumerate(recs):
            (data / "vitals" / f"{r['id']}.txt").write_text(", ".join(str(60 + (i * 7 + k) % 50) for k in range(6)))
            r["vitals"] = [f"vitals/{r['id']}.txt"]
            r["messages"][0]["content"] += " Vital signs: <vitals>"
        (data / split).write_text(json.dumps(recs))
    out = work / "run"
    sets = [*TINY_SETS, "sft.max_steps=2", "rft.max_steps=1", "eval.metrics=[bleu]", f"data.root={data}",
            # other plugins by name: the preset's options of ecgfm-ked / llama-lora are dropped
            "encoders.ecg.name=ecg-cnn1d", "encoders.vitals.name=vitals-mlp", "llm.name=tiny-qwen2"]
    r = subprocess.run([str(MEDTVT), "run", "--preset", "demo", "--quiet", "--modalities", "ecg,cxr,lab,vitals",
                        "--fusion", "gate-mix", "--rewards", "format,answer-count", "--stages", "sft,rft", "--out",
                        str(out), *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, env=_env_with(site), timeout=900)
    ok(r)
    return out


def test_templates_train_in_a_demo_run(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    used = {(p["role"], p["name"]): (p["distribution"], p["version"]) for p in metrics["plugins"]}
    for role, name in (("modality", "vitals"), ("encoder of vitals", "vitals-mlp"), ("encoder of ecg", "ecg-cnn1d"),
                       ("fusion", "gate-mix"), ("LLM", "tiny-qwen2"), ("reward", "answer-count")):
        dist = "medtvt-" + ("vitals" if name == "vitals-mlp" else name)
        assert used[(role, name)] == (dist, "0.1.0"), used
    assert used[("encoder of cxr", "vit")] == ("medtvt", "0.1.0") and used[("reward", "format")][0] == "medtvt"
    hist = json.loads((demo_run / "history.json").read_text())
    assert "rewards/answer-count/mean" in hist["rft"][0]
    for stage in ("sft", "rft"):
        value = metrics["stages"][stage]["reward"]["answer-count"]
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    report = (demo_run / "report.md").read_text()
    assert "| encoder of ecg | `ecg-cnn1d` | medtvt-ecg-cnn1d | 0.1.0 |" in report
    assert "| LLM | `tiny-qwen2` | medtvt-tiny-qwen2 | 0.1.0 |" in report


# --------------------------------------------------------------------------- mistakes, through the CLI
BROKEN = {  # name -> (template kind, edits of plugin.py)
    "slow-import": ("reward", [("from typing import Any\n", "from typing import Any\nimport time\n\ntime.sleep(0.8)\n")]),
    "broken-import": ("reward", [("from typing import Any\n", "from typing import Any\n\nimport medtvt_no_such_module\n")]),
    "solution-reward": ("reward", [('kwargs["answer"]', 'kwargs["solution"]')]),
    "raising-encoder": ("encoder", [("            return self.backbone(x.float())",
                                     "            raise RuntimeError('weights not loaded')\n"
                                     "            return self.backbone(x.float())")]),
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    dists = []
    for name, (kind, edits) in BROKEN.items():
        d = _new(kind, name, root / f"medtvt-{name}")
        _plant(d / f"medtvt_{name.replace('-', '_')}" / "plugin.py", edits)
        dists.append(d)
    _pip_target(dists, root / "site")
    return root / "site"


def _medtvt(*args: object, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(MEDTVT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _done(p: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    so, se = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, so, se)


def test_cli_names_the_failing_plugin(broken_site, cohort, tmp_path):
    env = _env_with(broken_site)
    # the runs load the plugins installed before plus the two they use (not the import-time mistakes)
    only = ",".join(ep.name for ep in importlib.metadata.entry_points(group="medtvt"))
    quiet = _env_with(broken_site, MEDTVT_PLUGINS=f"{only},solution-reward,raising-encoder")
    fast = [*TINY_SETS, f"data.root={cohort}", "llm.options.pretrain_steps=0", "eval.limit=2"]
    procs = {
        "slow": _medtvt("plugins", "check", "rewards", "slow-import", env=env),
        "broken": _medtvt("plugins", "check", "rewards", "broken-import", env=env),
        # a reward reading TRL's column name, which medtvt does not pass: RFT stops in one line
        "rft": _medtvt("run", "--preset", "demo", "--quiet", "--stages", "rft", "--rewards", "format,solution-reward",
                       "--out", tmp_path / "rft", *[a for s in fast for a in ("--set", s)], env=quiet),
        # an encoder raising while the run fills the feature cache
        "cache": _medtvt("run", "--preset", "demo", "--quiet", "--stages", "sft", "--out", tmp_path / "cache",
                         *[a for s in [*fast, "encoders.ecg.name=raising-encoder"] for a in ("--set", s)], env=quiet),
    }
    res = {k: _done(p) for k, p in procs.items()}
    slow = res["slow"]
    assert slow.returncode == 0, _show(slow)
    warn = [ln for ln in slow.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warn) == 1 and "reward 'slow-import' (medtvt-slow-import 0.1.0)" in warn[0], _show(slow)
    took = float(re.search(r"took ([0-9.]+) s to import \(bound 0.5 s\)", warn[0]).group(1))
    assert took >= 0.8, warn
    one_line_error(res["broken"], "unknown rewards plugin 'broken-import'",
                   "plugin 'broken-import' from distribution 'medtvt-broken-import' failed to load: "
                   "ModuleNotFoundError: No module named 'medtvt_no_such_module'", "medtvt_broken_import/plugin.py:")
    train_ids = {r["id"] for r in json.loads((cohort / "qa/disease_train.json").read_text())}
    line = one_line_error(res["rft"], "reward 'solution-reward' (medtvt-solution-reward 0.1.0) raised KeyError: "
                                      "'solution' on record ")
    assert line.rsplit(" ", 1)[-1] in train_ids, line
    one_line_error(res["cache"], "encoder 'raising-encoder' (medtvt-raising-encoder 0.1.0) raised RuntimeError: "
                               "weights not loaded on a batch of ")


# --------------------------------------------------------------------------- mistakes, through the kit
def _planted(kind: str, name: str, edits: list[tuple[str, str]], tmp_path: Path, *, failures: bool = False):
    """The template of ``kind`` named ``name`` with ``edits``, registered by hand (not installed)."""
    from medtvt_core.plugins import build_catalog

    d = _new(kind, name, tmp_path / name)
    path = d / f"medtvt_{name.replace('-', '_')}" / "plugin.py"
    _plant(path, edits)
    spec = importlib.util.spec_from_file_location(f"_planted_{name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cat = build_catalog([module], autoload=False)
    assert failures or not cat.failures, cat.failures
    return cat


_SCORE = "out.append(1.0 if pred is not None and len(pred) == len(gold) else 0.0)"
KIT_MISTAKES = [
    # (id, kind, registry, edits, the one line the kit must print; None: passes)
    ("reward-ok", "reward", "rewards", [], None),
    ("reward-nan", "reward", "rewards", [(_SCORE, 'out.append(float("nan"))')],
     "returned nan for record contract-0; rewards must be finite and in its declared range [0, 1]"),
    ("reward-minus-inf", "reward", "rewards", [(_SCORE, 'out.append(float("-inf"))')], "returned -inf for record"),
    ("reward-out-of-range", "reward", "rewards", [(_SCORE, "out.append(5.0)")],
     "returned 5.0 for record contract-0; rewards must be finite and in its declared range [0, 1]"),
    ("reward-reads-solution", "reward", "rewards", [('kwargs["answer"]', 'kwargs["solution"]')],
     "raised KeyError: 'solution' on record contract-0"),
    ("reward-raises-on-one-record", "reward", "rewards",
     [("        gold = answer_set(reference)", "        if 'Pneumonia' in reference:\n"
                                               "            raise ValueError('cannot score pneumonia')\n"
                                               "        gold = answer_set(reference)")],
     "raised ValueError: cannot score pneumonia on record contract-6"),
    ("reward-wrong-count", "reward", "rewards", [("    return out\n", "    return out[1:]\n")],
     "returned 7 values for 8 completions (a list)"),
    ("reward-returns-text", "reward", "rewards", [(_SCORE, "out.append('1.0')")], "returned str '1.0' for record"),
    ("reward-bad-range", "reward", "rewards", [("RANGE = (0.0, 1.0)", "RANGE = (1.0, 0.0)")], "range must be (lo, hi)"),
    ("encoder-ok", "encoder", "encoders", [], None),
    ("encoder-shape-only-under-contract-options", "encoder", "encoders",
     [("self.feature_shape = (int(steps), cfg.channels)", "self.feature_shape = (16, 16)")],
     "with its default options, encode() gave (1, 63, 64) per sample but feature_shape is (16, 16)"),
    ("encoder-nan", "encoder", "encoders", [("return self.backbone(x.float()).transpose(1, 2).contiguous()",
                                             "return self.backbone(x.float()).transpose(1, 2) * float('nan')")],
     "encode() gave"),
    ("fusion-ok", "fusion", "fusion", [], None),
    ("fusion-leaks-masked-modality", "fusion", "fusion",
     [("out = torch.where(keep[:, :, None, None], out, out.new_zeros(()))", "")],
     "output tokens of a masked modality are not zero"),
    ("modality-ok", "modality", "modalities", [], None),
    ("modality-shape-not-a-tuple", "modality", "modalities", [("return (self.config.n_values,)", "return [self.config.n_values]")],
     "sample_shape must be a tuple of positive ints, got [6] (list)"),
]


@pytest.mark.parametrize("case", KIT_MISTAKES, ids=[c[0] for c in KIT_MISTAKES])
def test_kit_reports_each_mistake_in_one_line(case, tmp_path, one_torch_thread):
    from medtvt_core.testing import check_plugin

    cid, kind, registry, edits, needle = case
    name = f"my-{kind}"
    cat = _planted(kind, name, edits, tmp_path, failures=True)
    if cid == "reward-bad-range":  # refused at registration: a load failure naming the plugin
        assert [str(f) for f in cat.failures if name in str(f) and needle in str(f)], cat.failures
        return
    assert not cat.failures, cat.failures
    problems = check_plugin(cat[registry].spec(name))
    if needle is None:
        assert problems == []
        return
    assert all("\n" not in p for p in problems), problems
    assert any(p.startswith(f"{name}: ") and needle in p for p in problems), problems


def test_kit_warns_on_a_slow_import():
    from medtvt_core.registry import Registry
    from medtvt_core.testing.checks import PluginImportTimeWarning, check_plugin
    from medtvt_plugins.rewards.builtin import format_reward

    spec = Registry("rewards").register("slow", format_reward, plugin="slow", dist="medtvt-slow", import_s=0.9)
    with pytest.warns(PluginImportTimeWarning, match=r"reward 'slow' \(medtvt-slow\): its module 'slow' took 0.90 s"):
        assert check_plugin(spec) == []  # a warning, not a failure


def test_run_time_errors_name_the_plugin(tmp_path):
    """RFT's and evaluation's scoring, and the feature cache's encoding, stop with one PluginError line."""
    from medtvt_core.data.cache import encode_frozen
    from medtvt_core.errors import PluginError
    from medtvt_core.plugin_calls import call_rewards
    from medtvt_core.run.evaluation import mean_rewards
    from medtvt_core.config import RewardRef

    cat = _planted("reward", "nan-reward", [(_SCORE, 'out.append(float("nan") if "Sepsis" in reference else 1.0)')],
                   tmp_path)
    spec = cat.rewards.spec("nan-reward")
    sepsis, flu = "<answer> Sepsis </answer>", "<answer> Pneumonia </answer>"
    records = [{"id": "p1", "prompt": "q", "reference": flu, "prediction": flu},
               {"id": "p2", "prompt": "q", "reference": sepsis, "prediction": sepsis}]
    with pytest.raises(PluginError, match=r"^reward 'nan-reward' \(registered by hand\) returned nan for record p2;"):
        mean_rewards(records, [RewardRef(name="nan-reward")], catalog=cat)  # evaluation: never a NaN in metrics.json
    with pytest.raises(PluginError, match=r"returned nan for record p2;"):  # RFT's keyword arguments
        call_rewards([spec], ["q", "q"], [flu, sepsis], answer=[flu, sepsis], ids=["p1", "p2"],
                     completion_ids=[[1], [2]], trainer_state=None)
    enc_cat = _planted("encoder", "bad-encoder", [("            return self.backbone(x.float())",
                                                   "            raise RuntimeError('no weights')\n"
                                                   "            return self.backbone(x.float())")], tmp_path)
    enc = enc_cat.encoders.get("bad-encoder")(samples=64, channels=8)
    with pytest.raises(PluginError, match=r"^encoder BadEncoderEncoder \(.*\) raised RuntimeError: no weights on "
                                          r"input ecg/p1$") as err:
        encode_frozen(enc, torch.zeros(1, 12, 64), ["ecg/p1"])
    assert isinstance(err.value.__cause__, RuntimeError)
    # feature_shape right only under contract_options: the cache names the encoder, not a stale cache
    shape_cat = _planted("encoder", "shape-encoder", [("self.feature_shape = (int(steps), cfg.channels)",
                                                       "self.feature_shape = (16, 16)")], tmp_path)
    enc = shape_cat.encoders.get("shape-encoder")()  # the defaults a run gets: 1000 samples, 64 channels
    with pytest.raises(PluginError, match=r"^encoder ShapeEncoderEncoder \(.*\): encode\(\) returned \(2, 63, 64\) for "
                                          r"a batch of 2 inputs \(ecg/p1, \.\.\.\), but its feature_shape \(16, 16\) "
                                          r"promises \(2, 16, 16\)$"):
        encode_frozen(enc, torch.zeros(2, 12, 1000), ["ecg/p1", "ecg/p2"])


def test_swapping_a_plugin_by_name_resets_its_options(tmp_path):
    """--set, a config file and an ablation grid: the preset's ecgfm-ked/llama-lora options are dropped."""
    from medtvt_core.build import validated_options
    from medtvt_core.config import resolve_config
    from medtvt_core.run.ablation import parse_grid

    cat = _planted("encoder", "ecg-cnn1d", [], tmp_path)
    file = tmp_path / "swap.yaml"
    file.write_text("preset: demo\nencoders:\n  ecg: {name: ecg-cnn1d}\nllm: {name: other-llm}\n")
    (axis, values), = parse_grid(["encoders.ecg.name=ecgfm-ked,ecg-cnn1d"])
    routes = {
        "--set": resolve_config(preset="demo", sets=["encoders.ecg.options.channels=8", "encoders.ecg.name=ecg-cnn1d"]),
        "config file": resolve_config(config_file=file),
        "ablate --grid": resolve_config(preset="demo", sets=[f"{axis}={values[1]}"]),
    }
    for route, cfg in routes.items():
        want = {"channels": 8} if route == "--set" else {}
        assert cfg.encoders["ecg"].name == "ecg-cnn1d" and cfg.encoders["ecg"].options == want, route
        validated_options("encoders", "ecg-cnn1d", cfg.encoders["ecg"].options, "encoders.ecg", cat)
    assert routes["config file"].llm.options == {}
    # the same name keeps (and merges) the options; the grid's baseline keeps the preset's
    same = resolve_config(preset="demo", sets=["encoders.ecg.name=ecgfm-ked"])
    assert same.encoders["ecg"].options == {"variant": "tiny"}
    assert resolve_config(preset="demo", sets=[f"{axis}={values[0]}"]).encoders["ecg"].options == {"variant": "tiny"}


def test_cli_one_line_and_traceback_under_verbose(monkeypatch):
    import medtvt_cli.common as common
    from medtvt_core.errors import PluginError

    @click.group(cls=common._Group)
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        try:
            {}["solution"]
        except KeyError as exc:
            raise PluginError("reward 'x' (medtvt-x 0.1.0) raised KeyError: 'solution' on record p1") from exc

    res = CliRunner().invoke(group, ["boom"])
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        "error: reward 'x' (medtvt-x 0.1.0) raised KeyError: 'solution' on record p1"]
    monkeypatch.setattr(common, "VERBOSE", True)
    res = CliRunner().invoke(group, ["boom"])
    assert res.exit_code == 2 and "Traceback" in res.stderr and "KeyError: 'solution'" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("error: reward 'x'")


def test_plugins_list_aligns_long_names():
    from medtvt_cli.main import cli

    res = CliRunner().invoke(cli, ["plugins", "list"])
    rows = [re.match(r"^  (\S+)( +)(\S+)", ln) for ln in res.stdout.splitlines() if ln.startswith("  ")]
    assert any(len(m.group(1)) > 14 for m in rows)  # jaccard-normalized
    assert len({len(m.group(1)) + len(m.group(2)) for m in rows}) == 1, res.stdout


def test_plugins_new_refuses_taken_and_bad_names(tmp_path):
    from medtvt_cli.main import cli

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    for args, needle in ((["reward", "format"], "a rewards plugin named 'format' is already installed (distribution medtvt)"),
                         (["modality", "ecg"], "a modalities plugin named 'ecg' is already installed"),
                         (["reward", "Answer Count"], "must be lowercase letters and digits"),
                         (["reward", "fresh", "--out", str(tmp_path / "full")], "exists and is not an empty directory")):
        res = CliRunner().invoke(cli, ["plugins", "new", *args])
        assert res.exit_code == 2 and res.stderr.splitlines() == [res.stderr.strip()] and needle in res.stderr, res.stderr
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"
