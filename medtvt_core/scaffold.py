"""``medtvt plugins new KIND NAME``: a ready plugin distribution from the templates in
``medtvt_core/templates`` (package data): ``pyproject.toml`` with the ``medtvt`` entry point, the
plugin module, a contract test on the kit and a README.  See docs/plugins.md."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from .errors import ConfigError
from .plugins import get_catalog

__all__ = ["KINDS", "new_plugin"]

#: ``plugins new`` kind -> (registry kind, noun, how a demo run uses it)
KINDS: dict[str, tuple[str, str, str]] = {
    "reward": ("rewards", "reward", "medtvt run --preset demo --rewards format,jaccard,{{name}}"),
    "encoder": ("encoders", "encoder", "medtvt run --preset demo --set encoders.ecg.name={{name}}"),
    "fusion": ("fusion", "fusion", "medtvt run --preset demo --fusion {{name}}"),
    "llm": ("llms", "LLM", "medtvt run --preset demo --set llm.name={{name}}"),
    "modality": ("modalities", "modality",
                 "medtvt run --preset demo --modalities ecg,cxr,lab,{{name}} --set encoders.{{name}}.name={{name}}-mlp"
                 "   # records refer to files in their \"{{name}}\" field"),
}
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


def _render(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    return text


def new_plugin(kind: str, name: str, out: Path | None = None) -> Path:
    """Write the distribution ``medtvt-<name>`` for a plugin of ``kind`` into ``out`` (default
    ``./medtvt-<name>``, which must not exist or be empty); returns its directory."""
    if kind not in KINDS:
        raise ConfigError(f"plugins new: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if not _NAME.match(name) or len(name) > 40:
        raise ConfigError(f"plugins new: name {name!r} must be lowercase letters and digits joined by '-' or '_' "
                          f"(at most 40 characters), e.g. answer-count")
    registry, noun, run = KINDS[kind]
    cat = get_catalog()  # an installed name would make both plugins fail to load (names are unique per kind)
    for reg, taken in ((registry, name), *((("encoders", f"{name}-mlp"),) if kind == "modality" else ())):
        if taken in cat[reg]:
            raise ConfigError(f"plugins new: a {reg} plugin named {taken!r} is already installed (distribution "
                              f"{cat[reg].spec(taken).dist}); choose another name")
    snake = name.replace("-", "_")
    values = {"name": name, "kind": kind, "registry": registry, "noun": noun, "dist": f"medtvt-{name.replace('_', '-')}",
              "package": f"medtvt_{snake}", "func": f"{snake}_reward",
              "Class": "".join(p.capitalize() for p in re.split(r"[-_]", name))}
    values["run"] = _render(run, values)
    out = Path(out) if out is not None else Path.cwd() / values["dist"]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"plugins new: {out} exists and is not an empty directory; choose another --out")
    root = resources.files("medtvt_core") / "templates"
    files = {
        "pyproject.toml": root / "pyproject.toml.tmpl",
        "README.md": root / "README.md.tmpl",
        f"{values['package']}/__init__.py": root / "__init__.py.tmpl",
        f"{values['package']}/plugin.py": root / kind / "plugin.py.tmpl",
        "tests/test_contract.py": root / kind / "test_contract.py.tmpl",
    }
    for rel, src in files.items():
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(_render(src.read_text(encoding="utf-8"), values), encoding="utf-8")
    return out
