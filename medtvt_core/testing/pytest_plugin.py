"""Opt-in pytest plugin for plugin authors (like pytest's ``pytester``).

Enable with ``-p medtvt_core.testing.pytest_plugin`` or ``pytest_plugins = [...]`` in a
conftest.  It provides fixtures:

* ``medtvt_catalog``: the catalog built from installed entry points;
* ``medtvt_contract``: ``medtvt_contract(kind, name)`` returns the contract problems
  (an empty list when the plugin satisfies its contract);
* ``medtvt_isolated_catalog``: ``medtvt_isolated_catalog(*modules)`` builds a catalog from the
  given plugin modules only, with entry-point autoloading off.

and the option ``--medtvt-plugin KIND:NAME`` (repeatable) that adds the contract tests of
those installed plugins to the session.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from medtvt_core.plugins import build_catalog, get_catalog
from medtvt_core.testing.checks import CHECKS, check_plugin


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("medtvt")
    group.addoption("--medtvt-plugin", action="append", default=[], metavar="KIND:NAME",
                    help="run the medtvt contract checks on an installed plugin (repeatable)")


@pytest.fixture(scope="session")
def medtvt_catalog():
    return get_catalog()


@pytest.fixture
def medtvt_contract(medtvt_catalog) -> Callable[[str, str], list[str]]:
    def run(kind: str, name: str) -> list[str]:
        return check_plugin(medtvt_catalog[kind].spec(name))

    return run


@pytest.fixture
def medtvt_isolated_catalog():
    def make(*modules: Any):
        return build_catalog(modules, autoload=False)

    return make


class _ContractItem(pytest.Item):
    def __init__(self, *, kind: str, plugin: str, check: str, **kw: Any):
        super().__init__(**kw)
        self.kind, self.plugin, self.check = kind, plugin, check

    def runtest(self) -> None:
        problems = check_plugin(get_catalog()[self.kind].spec(self.plugin), only=self.check)
        if problems:
            raise AssertionError("\n".join(problems))

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        return str(excinfo.value)

    def reportinfo(self):
        return self.path, None, f"medtvt contract {self.kind}:{self.plugin}::{self.check}"


class _ContractCollector(pytest.Collector):
    def collect(self):
        for target in self.config.getoption("--medtvt-plugin"):
            kind, _, name = target.partition(":")
            if kind not in CHECKS or not name:
                raise pytest.UsageError(f"--medtvt-plugin {target!r}: expected KIND:NAME with KIND in {', '.join(CHECKS)}")
            for check in CHECKS[kind]:
                yield _ContractItem.from_parent(self, name=f"{kind}:{name}::{check}", kind=kind, plugin=name, check=check)


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    if not config.getoption("--medtvt-plugin"):
        return
    collector = _ContractCollector.from_parent(session, name="medtvt-contracts")
    items.extend(collector.collect())
