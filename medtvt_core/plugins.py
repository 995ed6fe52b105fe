"""Plugin discovery: pluggy manager fed from the ``medtvt`` entry-point group.

Built-in plugins are entry points of the ``medtvt`` distribution itself, exactly like
third-party ones.  Switches (mirroring pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``):

* ``MEDTVT_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry point; register plugins by hand with
  :func:`build_catalog(plugins=[module, ...])`.
* ``MEDTVT_PLUGINS=name1,name2``: allow-list of entry-point names to load.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import time
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import DuplicatePluginError
from .registry import KINDS, Registry

ENTRY_POINT_GROUP = "medtvt"
_HOOK_OF_KIND = {kind: f"medtvt_register_{kind}" for kind in KINDS}


@dataclass(frozen=True)
class PluginLoadFailure:
    """A plugin that failed to import or register; the others keep working."""

    plugin: str
    dist: str
    error: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from distribution {self.dist!r} failed to load: {self.error}{self.location}"

    @property
    def location(self) -> str:
        """`` (at file:line)`` of the innermost frame outside the import machinery, '' when unknown."""
        lines = [ln.strip() for ln in self.traceback.splitlines() if ln.strip().startswith('File "')]
        lines = [ln for ln in lines if "<frozen importlib" not in ln and "importlib/" not in ln
                 and "importlib/metadata" not in ln]
        if not lines:
            return ""
        path, _, rest = lines[-1][len('File "'):].partition('", line ')
        return f" (at {path}:{rest.split(',')[0]})"


@dataclass
class Catalog:
    """All registries plus the load failures seen while filling them."""

    registries: dict[str, Registry[Any]] = field(default_factory=lambda: {k: Registry(k) for k in KINDS})
    failures: list[PluginLoadFailure] = field(default_factory=list)
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution
    import_s: dict[str, float] = field(default_factory=dict)  # entry-point name -> seconds to import

    def __post_init__(self) -> None:
        for reg in self.registries.values():
            reg.load_failures = self.failures  # unknown-name errors then show why a plugin is missing

    @property
    def modalities(self) -> Registry[Any]:
        return self.registries["modalities"]

    @property
    def encoders(self) -> Registry[Any]:
        return self.registries["encoders"]

    @property
    def fusion(self) -> Registry[Any]:
        return self.registries["fusion"]

    @property
    def rewards(self) -> Registry[Any]:
        return self.registries["rewards"]

    @property
    def llms(self) -> Registry[Any]:
        return self.registries["llms"]

    def __getitem__(self, kind: str) -> Registry[Any]:
        return self.registries[kind]

    def as_dict(self) -> dict[str, Any]:
        return {
            "plugins": [{"name": n, "distribution": d} for n, d in sorted(self.plugins.items())],
            **{kind: [s.as_dict() for s in reg.specs()] for kind, reg in self.registries.items()},
            "failures": [{"plugin": f.plugin, "distribution": f.dist, "error": f.error} for f in self.failures],
        }


def _dist_of(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def iter_entry_points() -> list[md.EntryPoint]:
    return sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (_dist_of(ep) != "medtvt", ep.name))


def build_catalog(
    plugins: Iterable[ModuleType | object] | None = None,
    *,
    autoload: bool | None = None,
    allow: Iterable[str] | None = None,
) -> Catalog:
    """Load plugins and fill one registry per kind.

    ``plugins``: extra objects registered by hand (name "manual:<module>", dist "<manual>").
    ``autoload``: load entry points (default: unless ``MEDTVT_DISABLE_PLUGIN_AUTOLOAD`` is set).
    ``allow``: entry-point names to load (default: ``MEDTVT_PLUGINS`` or all).
    """
    if autoload is None:
        autoload = not os.environ.get("MEDTVT_DISABLE_PLUGIN_AUTOLOAD")
    if allow is None and os.environ.get("MEDTVT_PLUGINS"):
        allow = [a.strip() for a in os.environ["MEDTVT_PLUGINS"].split(",") if a.strip()]
    allowed = set(allow) if allow is not None else None

    catalog = Catalog()
    pm = get_plugin_manager()
    sources: list[tuple[str, str, object]] = []
    if autoload:
        # Plugins import the contracts (torch, pydantic): import them first, so each plugin's import
        # time (Catalog.import_s, checked by the contract kit) is its own work only; here, not at the
        # top, so that importing this module alone (for the hook specs or the entry-point list) does not
        # import torch.
        from . import contracts  # noqa: F401

        for ep in iter_entry_points():
            if allowed is not None and ep.name not in allowed:
                continue
            dist = _dist_of(ep)
            t0 = time.perf_counter()
            try:
                obj = ep.load()
                catalog.import_s[ep.name] = time.perf_counter() - t0
            except Exception as exc:  # a broken plugin must not take the others down
                catalog.failures.append(
                    PluginLoadFailure(ep.name, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                )
                continue
            sources.append((ep.name, dist, obj))
    for obj in plugins or ():
        sources.append((f"manual:{getattr(obj, '__name__', type(obj).__name__)}", "<manual>", obj))

    for name, dist, obj in sources:
        try:
            pm.register(obj, name=name)
        except Exception as exc:  # e.g. a hookimpl whose arguments do not match its spec
            catalog.failures.append(PluginLoadFailure(name, dist, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            continue
        catalog.plugins[name] = dist

    # Call each plugin's hookimpl on its own so every registered name records its plugin and
    # distribution (needed for the duplicate-name error); pluggy validated the impls above.
    for kind, hook_name in _HOOK_OF_KIND.items():
        reg = catalog.registries[kind]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            pname_, dist_ = impl.plugin_name, catalog.plugins.get(impl.plugin_name, "?")

            def register(pname: str, pobj: Any, config: Any = None, description: str | None = None,
                         _reg=reg, _n=pname_, _d=dist_, **extra: Any):
                return _reg.register(pname, pobj, config=config, description=description, plugin=_n, dist=_d,
                                     import_s=catalog.import_s.get(_n), **extra)

            try:
                impl.function(register=register)
            except DuplicatePluginError:
                raise
            except Exception as exc:
                catalog.failures.append(
                    PluginLoadFailure(pname_, dist_, f"{hook_name}: {type(exc).__name__}: {exc}", traceback.format_exc())
                )
    return catalog


_CATALOG: Catalog | None = None


def get_catalog(*, refresh: bool = False) -> Catalog:
    """The process-wide catalog, built on first use."""
    global _CATALOG
    if _CATALOG is None or refresh:
        _CATALOG = build_catalog()
    return _CATALOG
