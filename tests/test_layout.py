"""The package's import graph: data flows one way, and no module imports itself back.

    checkpoints -> methods -> engine -> {evaluation, zoo} -> search -> export -> run

Every ``evomerge`` import is counted, including those inside functions (a deferred import
is still a dependency). ``errors`` and ``locks`` are the ground floor, used by all.
"""
from __future__ import annotations

import ast
from pathlib import Path

import evomerge

ROOT = Path(evomerge.__file__).resolve().parent
FLOOR = {"errors", "locks", "conf"}
# each package, and the packages it may import (besides the floor)
ALLOWED = {
    "checkpoints": set(),
    "methods": {"checkpoints"},
    "engine": {"checkpoints", "methods"},
    "evaluation": set(),
    "zoo": {"checkpoints", "evaluation"},
    "search": {"checkpoints", "methods", "engine", "evaluation", "zoo"},
    "export": {"checkpoints", "methods", "engine", "search"},
    "run": {"checkpoints", "methods", "engine", "evaluation", "zoo", "search", "export"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str | None:  # the module an imported name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names if a.name.startswith("evomerge")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.startswith("evomerge"):
                    found |= {owner(f"{base}.{a.name}") or owner(base) for a in node.names}
        edges[name] = {m for m in found if m and m != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_module_imports_itself_back():
    assert _cycles(_graph()) == []


def test_data_flows_one_way_between_packages():
    wrong = []
    for module, targets in _graph().items():
        room = _room(module)
        if room in FLOOR or room == "":
            continue
        assert room in ALLOWED, f"package evomerge.{room} has no place in the layout: add it to ALLOWED and the README"
        for t in targets:
            there = _room(t)
            if there != room and there not in FLOOR and there not in ALLOWED[room]:
                wrong.append(f"{module} imports {t}")
    assert wrong == []


def test_no_subpackage_imports_its_parent_back():
    """search/cluster may use search's modules, or search may use cluster's, not both."""
    edges = _graph()
    packages = {m for m, p in _modules().items() if p.name == "__init__.py" and m.count(".") >= 2}
    for sub in packages:
        parent = sub.rpartition(".")[0]
        inside = {m for m in edges if m == sub or m.startswith(sub + ".")}
        beside = {m for m in edges if m.rpartition(".")[0] == parent and m not in inside and m != parent}
        up = any(t in beside for m in inside for t in edges[m])
        down = any(t in inside for m in beside for t in edges[m])
        assert not (up and down), f"{sub} and the modules of {parent} import each other"
