"""Contract test kit for plugin authors.

Subclass one base class per plugin and let pytest collect it::

    # tests/test_contract.py of your distribution
    from medtvt_core.testing import EncoderContract

    class TestNoteEncoder(EncoderContract):
        plugin_name = "note-bow"          # found through the ``medtvt`` entry points

Each check of the kind (:data:`medtvt_core.testing.checks.CHECKS`) becomes one test. Set
``plugin_objects = (module,)`` to test a plugin module that is not installed as an entry point.
``medtvt plugins check KIND NAME`` runs the same checks from the command line. The guide, with
what each check calls: docs/plugins.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..plugins import Catalog, build_catalog, get_catalog
from ..registry import PluginSpec
from .checks import CHECKS, check_plugin

__all__ = [
    "CHECKS", "check_plugin", "PluginContract", "ModalityContract", "EncoderContract",
    "FusionContract", "RewardContract", "LLMContract",
]


class PluginContract:
    """Base: set ``kind`` (done by the subclasses below) and ``plugin_name``."""

    kind: ClassVar[str]
    plugin_name: ClassVar[str]
    plugin_objects: ClassVar[tuple[Any, ...]] = ()

    @classmethod
    def catalog(cls) -> Catalog:
        if cls.plugin_objects:
            return build_catalog(cls.plugin_objects, autoload=False)
        return get_catalog()

    @classmethod
    def spec(cls) -> PluginSpec[Any]:
        return cls.catalog()[cls.kind].spec(cls.plugin_name)

    def pytest_generate_tests(self, metafunc: Any) -> None:
        # pytest calls a class-level pytest_generate_tests: one test per contract check.
        if "contract_check" in metafunc.fixturenames:
            metafunc.parametrize("contract_check", list(CHECKS[self.kind]))

    def test_contract(self, contract_check: str) -> None:
        problems = check_plugin(self.spec(), only=contract_check)
        assert not problems, "\n".join(problems)


class ModalityContract(PluginContract):
    kind = "modalities"


class EncoderContract(PluginContract):
    kind = "encoders"


class FusionContract(PluginContract):
    kind = "fusion"


class RewardContract(PluginContract):
    kind = "rewards"


class LLMContract(PluginContract):
    kind = "llms"
