"""The house rules, checked: no import cycles inside the package, no upward imports, public names resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "trace_transfer"

# A concept may import the concepts listed to its right, never one to its left: results flow down
# (training returns results, the report draws them; the CLI sits on top of everything).
LAYERS = [
    ("cli",),
    ("plan",),
    ("pipeline",),
    ("report",),
    ("surgery",),
    ("refine",),  # picks target units inside transfer's budgets from a probe-style signal
    ("probe", "transfer", "cka"),
    ("train", "scoring"),
    ("evaluation",),
    ("models", "rules", "coreset"),
    ("data",),
    ("checkpoint", "config", "registry", "devices"),
    ("errors", "_version"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every trace_transfer module this file imports (module level and inside functions)."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule sub; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles inside trace_transfer: {cycles}"


def _concept(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_flow_down():
    rank = {c: i for i, layer in enumerate(LAYERS) for c in layer}
    graph = _graph()
    concepts = {_concept(m) for m in graph} - {"", "__main__"}
    assert concepts <= set(rank), f"place these concepts in LAYERS: {sorted(concepts - set(rank))}"
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if _concept(m) in rank and _concept(t) in rank and _concept(m) != _concept(t)
        and rank[_concept(t)] < rank[_concept(m)]
    )
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_top_level_is_small():
    flat = sorted(p.name for p in PKG.glob("*.py"))
    private = [n for n in flat if n.startswith("_") and n not in ("__init__.py", "__main__.py", "_version.py")]
    assert not private, f"private helpers belong inside the package they serve: {private}"
    assert len(flat) <= 10, flat


@pytest.mark.parametrize("name", sorted(importlib.import_module("trace_transfer")._PUBLIC))
def test_public_names_resolve(name):
    import trace_transfer

    assert getattr(trace_transfer, name) is not None
