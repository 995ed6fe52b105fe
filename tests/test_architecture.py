"""The layout's rules, read from the source with ``ast``: no import cycle among the project's modules
(function-level imports count: a cycle hidden in a function is still two rooms leaning on each other),
and one home for an atomic write."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> installed package name (pyproject.toml's package-dir)
PACKAGES = {"medtvt_core": "medtvt_core", "plugins": "medtvt_plugins", "cli": "medtvt_cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = [pkg, *f.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (anywhere in the file, relative imports resolved)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                # importing a.b.c runs a and a.b too, but a package __init__ importing its own
                # children is how packages work: only the named module counts
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    assert len(graph) > 60 and "medtvt_core.model.modeling" in graph["medtvt_core.model.factory"]
    assert cycles(graph) == []


def test_the_core_names_no_plugin_and_the_model_does_not_import_the_run_layer():
    graph = import_graph()
    core = [m for m in graph if m.startswith("medtvt_core")]
    assert not [(m, t) for m in core for t in graph[m] if t.startswith(("medtvt_plugins", "medtvt_cli"))]
    below = [m for m in core if m.startswith(("medtvt_core.model", "medtvt_core.build", "medtvt_core.contracts",
                                              "medtvt_core.data", "medtvt_core.training"))]
    assert not [(m, t) for m in below for t in graph[m] if t.startswith("medtvt_core.run")]


def test_one_home_for_atomic_writes():
    """Every temp-file-then-rename goes through medtvt_core.io (os.replace appears nowhere else)."""
    hits = [f"{f.relative_to(ROOT)}:{n.lineno}" for f in _modules().values() if f.name != "io.py"
            for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("replace", "rename")
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "os"]
    assert hits == []


#: Where an import may sit inside a function, and why (issue "One room per concept"): a heavy or optional
#: third-party package the module's callers do not all need, or a light entry point kept light.
LAZY_PACKAGES = {
    # seconds of import or an optional extra; plugin modules do no heavy work at import (docs/plugins.md)
    "transformers", "accelerate", "trl", "peft", "tokenizers", "quicktok", "torch", "torchvision", "timm",
    "matplotlib", "scipy", "sklearn", "pandas", "nltk", "rouge_score", "bert_score", "sacrebleu", "safetensors",
    "wfdb", "soundfile", "PIL", "tensorboard", "gradio", "fastapi", "starlette", "uvicorn",
    "xgrammar",  # imports torch and transformers; only constrained decoding needs it
}
#: file (or folder) -> the project modules it may import inside a function
LAZY_PROJECT = {
    # the commands' run modules import transformers, peft and TRL (measured: `import medtvt_cli.main` 1.9 s,
    # the run modules 4.3 s more), which `medtvt --help`, `medtvt config` and `medtvt data` do not need
    "cli/": ("medtvt_core.run.",),
    # the evaluate-based metric modules import transformers; the protocols load them on first use
    "medtvt_core/metrics/__init__.py": (".modules",),
    # the contracts import torch; the plugin manager is imported by light modules (config, the CLI)
    "medtvt_core/plugins.py": (".contracts",),
}


def function_level_imports() -> list[tuple[str, int, str]]:
    """(file, line, module) of every import inside a function in the project's packages."""
    out = []
    for f in _modules().values():
        rel = str(f.relative_to(ROOT))
        for fn in ast.walk(ast.parse(f.read_text(), rel)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, ast.Import):
                        out += [(rel, n.lineno, a.name) for a in n.names]
                    elif isinstance(n, ast.ImportFrom) and n.module is None:  # from . import sub
                        out += [(rel, n.lineno, "." * n.level + a.name) for a in n.names]
                    elif isinstance(n, ast.ImportFrom):
                        out.append((rel, n.lineno, "." * n.level + n.module))
    return sorted(set(out))


def test_imports_inside_functions_only_for_heavy_packages_or_light_entry_points():
    found = function_level_imports()
    assert any(m.split(".")[0] == "trl" for _, _, m in found)  # the walk sees them
    bad = [f"{f}:{line} {m}" for f, line, m in found
           if m.split(".")[0] not in LAZY_PACKAGES
           and not any(f.startswith(p) and (m in ok or m.startswith(tuple(x for x in ok if x.endswith("."))))
                       for p, ok in LAZY_PROJECT.items())]
    assert bad == []
