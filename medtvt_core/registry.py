"""Thin name -> plugin registries (fvcore/timm style): register, get, list with a filter."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

from pydantic import BaseModel

from .errors import DuplicatePluginError, PluginContractError, UnknownPluginError

T = TypeVar("T")

KINDS = ("modalities", "encoders", "fusion", "rewards", "llms")


@dataclass(frozen=True)
class PluginSpec(Generic[T]):
    """One registered plugin: the object, its config model and where it came from."""

    name: str
    kind: str
    obj: T
    config: type[BaseModel] | None = None
    description: str = ""
    plugin: str = ""  # entry-point name (or module) that registered it
    dist: str = ""  # distribution that ships it, e.g. "medtvt" or "medtvt-notes"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. a reward's range=(lo, hi)
    import_s: float | None = None  # seconds its entry point took to import (None: registered by hand)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "plugin": self.plugin,
            "distribution": self.dist,
            "object": f"{getattr(self.obj, '__module__', '?')}.{getattr(self.obj, '__qualname__', repr(self.obj))}",
        }
        if self.import_s is not None:
            out["import_s"] = round(self.import_s, 3)
        out.update(self.extra)
        return out


def _reward_range(name: str, r: Any) -> tuple[float | None, float | None] | None:
    """A reward's declared ``range=(lo, hi)`` (``None`` for an unbounded side, or ``None`` for both)."""
    if r is None:
        return None
    ok = isinstance(r, (tuple, list)) and len(r) == 2 and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v) for v in r)
    if not ok or (r[0] is not None and r[1] is not None and r[0] >= r[1]):
        raise PluginContractError(f"rewards plugin {name!r}: range must be (lo, hi) with lo < hi "
                                   f"(None: unbounded), got {r!r}")
    return (None if r[0] is None else float(r[0]), None if r[1] is None else float(r[1]))


class Registry(Generic[T]):
    """A dict of :class:`PluginSpec` with loud errors on unknown or duplicate names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, PluginSpec[T]] = {}
        # The catalog's load failures (shared list): an unknown name may be a plugin that failed to import.
        self.load_failures: list[Any] = []

    def register(
        self,
        name: str,
        obj: T,
        *,
        config: type[BaseModel] | None = None,
        description: str | None = None,
        plugin: str = "",
        dist: str = "",
        import_s: float | None = None,
        **extra: Any,
    ) -> PluginSpec[T]:
        if not isinstance(name, str) or not name:
            raise DuplicatePluginError(f"{self.kind}: plugin name must be a non-empty string, got {name!r} from {dist or plugin or '?'}")
        if name in self._specs:
            old = self._specs[name]
            raise DuplicatePluginError(
                f"{self.kind} plugin name {name!r} is claimed twice: by {old.plugin!r} from distribution "
                f"{old.dist or '?'!r} and by {plugin!r} from distribution {dist or '?'!r}"
            )
        if config is not None and not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise DuplicatePluginError(f"{self.kind} plugin {name!r}: config must be a pydantic model class, got {config!r}")
        if self.kind == "rewards" and "range" in extra:
            extra["range"] = _reward_range(name, extra["range"])
        doc = description if description is not None else (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
        spec = PluginSpec(name=name, kind=self.kind, obj=obj, config=config, description=doc, plugin=plugin, dist=dist, extra=extra,
                           import_s=import_s)
        self._specs[name] = spec
        return spec

    def spec(self, name: str) -> PluginSpec[T]:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownPluginError(self.unknown_message(name)) from None

    def get(self, name: str) -> T:
        return self.spec(name).obj

    def unknown_message(self, name: str) -> str:
        names = sorted(self._specs)
        near = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        avail = ", ".join(names) if names else "(none registered)"
        failed = "".join(f"; {f}" for f in self.load_failures)
        return f"unknown {self.kind} plugin {name!r}; available: {avail}{hint}{failed}"

    def list(self, filter: str | None = None) -> list[str]:
        """Sorted names, optionally filtered by a glob pattern (``"ecg*"``)."""
        names = sorted(self._specs)
        return [n for n in names if filter is None or fnmatch.fnmatch(n, filter)]

    def specs(self) -> list[PluginSpec[T]]:
        return [self._specs[n] for n in self.list()]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._specs)
