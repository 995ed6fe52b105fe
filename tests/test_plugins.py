"""Plugin discovery and registries."""

import importlib.metadata as md
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from medtvt_core import hookimpl
from medtvt_core import plugins as plugmod
from medtvt_core.errors import DuplicatePluginError, UnknownPluginError
from medtvt_core.plugins import build_catalog, get_catalog
from medtvt_core.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_tuple_matches_entry_points():
    from medtvt_plugins import BUILTIN_PLUGINS

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["medtvt"]
    assert dict(BUILTIN_PLUGINS) == declared
    installed = {ep.name: ep.value for ep in md.entry_points(group="medtvt") if ep.dist and ep.dist.name == "medtvt"}
    assert installed == declared, "reinstall the package: installed entry points differ from pyproject.toml"


def test_every_builtin_loads_without_failure():
    cat = get_catalog()
    assert [f for f in cat.failures if f.dist == "medtvt"] == []
    assert {"ecg", "cxr", "lab"} <= set(cat.modalities.list())
    assert {"ecgfm-ked", "vit", "symile"} <= set(cat.encoders.list())
    assert {"mpl", "cmha", "cao", "none"} <= set(cat.fusion.list())
    assert {"format", "jaccard"} <= set(cat.rewards.list())
    assert "llama-lora" in cat.llms.list()
    for spec in cat.encoders.specs():
        assert spec.dist, spec


def test_unknown_name_lists_available_and_nearest():
    reg = Registry("fusion")
    for n in ("mpl", "cmha", "cao"):
        reg.register(n, object(), dist="medtvt")
    with pytest.raises(UnknownPluginError) as ei:
        reg.get("mlp")
    msg = str(ei.value)
    assert "unknown fusion plugin 'mlp'" in msg and "cao, cmha, mpl" in msg and "did you mean 'mpl'" in msg
    assert "\n" not in msg
    assert reg.list("c*") == ["cao", "cmha"]


class _PluginA:
    @staticmethod
    @hookimpl
    def medtvt_register_rewards(register):
        register("same", lambda prompts, completions, **kw: [0.0] * len(completions))


class _PluginB:
    @staticmethod
    @hookimpl
    def medtvt_register_rewards(register):
        register("same", lambda prompts, completions, **kw: [1.0] * len(completions))


def _fake_ep(name, value, dist_name):
    ep = md.EntryPoint(name=name, value=value, group="medtvt")
    return ep, dist_name


def test_duplicate_name_names_both_distributions(monkeypatch):
    mod_a = type(sys)("fake_plugin_a")
    mod_a.medtvt_register_rewards = _PluginA.medtvt_register_rewards
    mod_b = type(sys)("fake_plugin_b")
    mod_b.medtvt_register_rewards = _PluginB.medtvt_register_rewards
    monkeypatch.setitem(sys.modules, "fake_plugin_a", mod_a)
    monkeypatch.setitem(sys.modules, "fake_plugin_b", mod_b)
    eps = [md.EntryPoint("a", "fake_plugin_a", "medtvt"), md.EntryPoint("b", "fake_plugin_b", "medtvt")]
    monkeypatch.setattr(plugmod, "iter_entry_points", lambda: eps)
    monkeypatch.setattr(plugmod, "_dist_of", lambda ep: {"a": "dist-alpha", "b": "dist-beta"}[ep.name])
    with pytest.raises(DuplicatePluginError) as ei:
        build_catalog()
    msg = str(ei.value)
    assert "'same'" in msg and "dist-alpha" in msg and "dist-beta" in msg


def test_broken_plugin_is_reported_and_others_work(monkeypatch):
    mod_a = type(sys)("fake_plugin_ok")
    mod_a.medtvt_register_rewards = _PluginA.medtvt_register_rewards
    monkeypatch.setitem(sys.modules, "fake_plugin_ok", mod_a)
    eps = [md.EntryPoint("broken", "no_such_module_xyz.sub", "medtvt"), md.EntryPoint("ok", "fake_plugin_ok", "medtvt")]
    monkeypatch.setattr(plugmod, "iter_entry_points", lambda: eps)
    monkeypatch.setattr(plugmod, "_dist_of", lambda ep: "dist-" + ep.name)
    cat = build_catalog()
    assert cat.rewards.list() == ["same"]
    (fail,) = cat.failures
    assert fail.plugin == "broken" and fail.dist == "dist-broken" and "ModuleNotFoundError" in fail.error
    assert "failed to load" in str(fail)


def test_allow_list_and_no_autoload(monkeypatch):
    monkeypatch.setenv("MEDTVT_PLUGINS", "rewards")
    cat = build_catalog()
    assert cat.rewards.list() and not cat.encoders.list()
    monkeypatch.delenv("MEDTVT_PLUGINS")
    monkeypatch.setenv("MEDTVT_DISABLE_PLUGIN_AUTOLOAD", "1")
    cat = build_catalog([_PluginB])
    assert cat.rewards.list() == ["same"] and not cat.fusion.list()
    assert cat.rewards.spec("same").dist == "<manual>"


def test_cli_lists_builtins_and_example_plugin():
    out = subprocess.run([sys.executable, "-m", "medtvt_cli.main", "plugins", "list", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    names = {k: {s["name"]: s["distribution"] for s in data[k]} for k in ("modalities", "encoders", "fusion", "rewards", "llms")}
    assert names["encoders"]["ecgfm-ked"] == "medtvt"
    assert names["fusion"]["mpl"] == "medtvt"
    # The third-party example distribution (examples/medtvt-notes), pip-installed by CI.
    assert names["modalities"].get("note") == "medtvt-notes"
    assert names["encoders"].get("note-hash") == "medtvt-notes"
