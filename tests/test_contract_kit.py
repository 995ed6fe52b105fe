"""The contract kit passes on every built-in and on the example plugin, and fails on broken ones."""

import textwrap
from pathlib import Path

import pytest
from medtvt_core.plugins import build_catalog, get_catalog
from medtvt_core.testing import EncoderContract, ModalityContract, check_plugin

_ALL = [(k, s.name) for k, reg in get_catalog().registries.items() for s in reg.specs()]


@pytest.mark.parametrize("kind,name", _ALL, ids=[f"{k}:{n}" for k, n in _ALL])
def test_installed_plugins_satisfy_contract(kind, name):
    spec = get_catalog()[kind].spec(name)
    assert check_plugin(spec) == []


class TestExampleNoteEncoder(EncoderContract):
    plugin_name = "note-hash"


class TestExampleNoteModality(ModalityContract):
    plugin_name = "note"


from broken_plugins import _Broken  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture
def broken():
    return build_catalog([_Broken], autoload=False)


def test_kit_catches_wrong_encoder_shape(broken):
    problems = check_plugin(broken.encoders.spec("wrong-shape"))
    assert any("encode() gave (2, 3, 8), expected (2, 4, 8)" in p for p in problems), problems


def test_kit_catches_fusion_leaking_masked_modality(broken):
    problems = check_plugin(broken.fusion.spec("leaky"))
    assert any("masked modality" in p for p in problems), problems


def test_kit_catches_reward_without_kwargs(broken):
    problems = check_plugin(broken.rewards.spec("no-kwargs"))
    assert any("**kwargs" in p for p in problems), problems


def test_kit_fails_a_plugin_authors_pytest_run(pytester):
    """A plugin author's test module built on the kit goes red on a broken plugin."""
    pytester.makepyfile(
        test_author=textwrap.dedent(
            """
            from medtvt_core.testing import FusionContract, EncoderContract
            from broken_plugins import _Broken as Broken

            class TestLeaky(FusionContract):
                plugin_name = "leaky"
                plugin_objects = (Broken,)

            class TestWrong(EncoderContract):
                plugin_name = "wrong-shape"
                plugin_objects = (Broken,)
            """
        )
    )
    pytester.syspathinsert(str(Path(__file__).parent))
    res = pytester.runpytest("-p", "medtvt_core.testing.pytest_plugin", "test_author.py", "-q")
    outcomes = res.parseoutcomes()
    assert outcomes.get("failed", 0) >= 2, res.stdout.str()
    res.stdout.fnmatch_lines(["*masked modality*"])
