"""The architecture, checked: the imports of spectra_cli follow the layers, form no cycle, and share no private
name; the lower layers do not load the CLI or rendering libraries; no module grows past ~500 lines.

Layers, top to bottom (docs/architecture.md): ``cli`` → ``flows`` → ``report`` / ``gate`` → ``spectral`` /
``checkpoint``, with ``errors``, ``results`` and ``options`` beneath them all. Every import counts, at module
level or inside a function (a lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spectra_cli"
MAX_LINES = 500

#: layer → the layers it must never import
FORBIDDEN = {
    "cli": set(),
    "flows": {"cli"},
    "report": {"cli", "flows"},
    "gate": {"cli", "flows"},
    "spectral": {"cli", "flows", "report", "gate"},
    "checkpoint": {"cli", "flows", "report", "gate"},
    "base": {"cli", "flows", "report", "gate"},
    "package": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in ("cli", "flows", "report", "gate", "spectral", "checkpoint"):
        return parts[1]
    if parts[1] == "__main__":
        return "cli"
    return "base"  # errors, results, options


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the spectra_cli module imported (a package's __init__ when a name comes from it)
    names: tuple[str, ...]  # the names taken from it (``from target import a, b``), else ()
    line: int


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from _walk(other)
            continue
        yield child
        yield from _walk(child)


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spectra_cli":
                    out.append(Import(module, _existing(alias.name), (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "spectra_cli":
                continue
            names: list[str] = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # ``from spectra_cli.cli import analyze``: the submodule itself
                    out.append(Import(module, sub, (), node.lineno))
                else:
                    names.append(alias.name)
            if names:
                out.append(Import(module, _existing(base), tuple(names), node.lineno))
    return out


def _existing(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


GRAPH = {m: imports_of(m) for m in MODULES}


def _private_uses(module: str) -> list[tuple[str, str, str]]:
    """``alias._name`` where ``alias`` is another spectra_cli module imported by this one (as good as importing
    the private name)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    aliases: dict[str, str] = {}
    for node in _walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectra_cli"):
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("spectra_cli.") and a.asname:
                    aliases[a.asname] = a.name
    found = []
    for node in _walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
            found.append((module, node.attr, aliases[node.value.id]))
    return found


def test_the_walker_sees_the_imports_it_should() -> None:
    """The walker itself: it finds a known import of each kind (so an empty graph cannot pass the tests below)."""
    targets = {i.target for i in GRAPH["spectra_cli.cli.analyze"]}
    assert {"spectra_cli.cli.options", "spectra_cli.flows.analyze", "spectra_cli.report.render"} <= targets
    assert "spectra_cli.flows.analyze" in {i.target for i in GRAPH["spectra_cli"]}  # inside a function
    assert all(i.target != "spectra_cli.flows.analyze" or i.names == ("AnalyzeOptions", "run_analyze")
               for i in GRAPH["spectra_cli"])  # fmt: skip  # the TYPE_CHECKING import is not counted
    assert len(MODULES) > 60


def test_layers_import_only_downwards() -> None:
    wrong = [
        f"{i.source}:{i.line} ({layer(i.source)}) imports {i.target} ({layer(i.target)})"
        for imports in GRAPH.values() for i in imports if layer(i.target) in FORBIDDEN[layer(i.source)]
    ]  # fmt: skip
    assert not wrong, "imports against the layers (cli → flows → report/gate → spectral/checkpoint):\n" + "\n".join(wrong)


def _strongly_connected(edges: dict[str, list[str]]) -> list[frozenset[str]]:
    """Tarjan's strongly connected components with more than one module: each is one or more import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _edges() -> dict[str, list[str]]:
    """Module → the modules it imports. ``from spectra_cli import __version__`` is metadata, not a dependency on
    the package's facade (``spectra_cli.analyze``), so dunder-only imports are left out."""
    return {m: sorted({i.target for i in GRAPH[m] if i.target != m
                       and not (i.names and all(n.startswith("__") for n in i.names))})
            for m in MODULES}  # fmt: skip


def test_no_import_cycle() -> None:
    found = set(_strongly_connected(_edges()))
    new = [" ↔ ".join(sorted(c)) for c in found]  # (cli/report.py ↔ cli/analyze.py was one, until report/views)
    assert not new, "modules that import each other (directly or round a cycle):\n" + "\n".join(new)


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": []}
    assert _strongly_connected(edges) == [frozenset("abc")]


def _private_imports() -> set[tuple[str, str, str]]:
    """(importing module, private name, module it comes from) for every private name taken across modules."""
    found = {(i.source, n, i.target) for imports in GRAPH.values() for i in imports if i.target != i.source
             for n in i.names if n.startswith("_") and not n.startswith("__")}  # fmt: skip
    return found | {use for m in MODULES for use in _private_uses(m)}


def test_no_private_name_is_imported_from_another_module() -> None:
    found = _private_imports()
    new = [f"{src} takes {name} from {dst}" for src, name, dst in sorted(found)]
    assert not new, "private names used across modules (make them public, or move them):\n" + "\n".join(new)


def test_core_layers_do_not_import_cli_or_rendering() -> None:
    """spectral/ and checkpoint/ (and a flow) load neither typer, rich nor matplotlib: neither in their source
    nor, transitively, when imported."""
    heavy = ("typer", "rich", "matplotlib")
    wrong = []
    for module, path in MODULES.items():
        if layer(module) not in ("spectral", "checkpoint"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            wrong += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in heavy]
    assert not wrong, "\n".join(wrong)
    core = [m for m in MODULES if layer(m) in ("spectral", "checkpoint")] + ["spectra_cli.flows.analyze"]
    code = f"import sys\nfor m in {core!r}:\n    __import__(m)\nprint([m for m in {heavy!r} if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def _long_modules() -> list[str]:
    return [f"{m} ({n} lines)" for m, p in MODULES.items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]  # fmt: skip


def test_no_module_is_over_500_lines() -> None:
    long = _long_modules()
    assert not long, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(long)
