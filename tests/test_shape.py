"""The package's shape, read from its source: no import cycle inside ``nla_serve`` (imports made
inside functions and under TYPE_CHECKING count: a lazy import hides a cycle, it does not remove
it), no module over 450 lines and no function over 100. A package ``__init__`` that re-exports
its own children is not a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "server" / "nla_serve"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 100


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name if is_pkg else name.rsplit(".", 1)[0]
            if node.level:
                base = ".".join(base.split(".")[: len(base.split(".")) - (node.level - 1)])
                full = base + ("." + node.module if node.module else "")
            else:
                full = node.module or ""
            targets = [full] + [f"{full}.{a.name}" for a in node.names]
        else:
            continue
        deps.update(t for t in targets if t in known and t != name)
    return deps


def cycles(graph: dict[str, set[str]], packages: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), but a package with only
    its own children."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

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
            pkgs = [c for c in comp if c in packages]
            own = len(pkgs) == 1 and all(c == pkgs[0] or c.startswith(pkgs[0] + ".") for c in comp)
            if len(comp) > 1 and not own:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    packages = {name for name, path in mods.items() if path.name == "__init__.py"}
    assert cycles(graph, packages) == []


def test_the_cycle_check_finds_a_lazy_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": set()}
    assert cycles(graph, set()) == [["p.a", "p.b"]]


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_and_function_sizes(name):
    src = modules()[name].read_text()
    assert src.count("\n") <= MAX_MODULE_LINES, f"{name} has {src.count(chr(10))} lines"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(src))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
