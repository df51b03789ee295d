"""The package's import structure: no cycles, no private names across modules, and records
(candidates, spaces) that load without torch.

The graph is read from the source with ``ast``: every ``import`` in a module, lazy ones inside
functions included; only ``if TYPE_CHECKING:`` blocks (never executed) are left out. An import
of a submodule (``from nas.compress import huffman``) counts as an edge to that submodule."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nas"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _executed_imports(tree: ast.AST):
    """Import nodes outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        for node in _executed_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs or [base]
                if base.startswith("nas"):
                    private += [(mod, base, a.name) for a in node.names
                                if a.name.startswith("_") and not a.name.startswith("__")]
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_cycle():
    """The check itself: a cycle through an import inside a function is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    import nas.x\nif TYPE_CHECKING:\n    import nas.y\n")
    assert [n.names[0].name for n in _executed_imports(tree)] == ["nas.x"]


def test_no_private_name_is_imported_across_modules():
    _, private = _graph()
    assert private == []


def test_the_records_and_the_registry_sit_at_the_bottom():
    graph, _ = _graph()
    assert graph["nas.compress.registry"] == set()  # a leaf: imports nothing from nas
    assert graph["nas.errors"] == set()
    assert graph["nas.genes"] == set()  # how a method declares its genes
    assert graph["nas.methods"] <= {"nas.errors", "nas.genes"}  # the built-in configs
    assert graph["nas.config"] <= {"nas.errors", "nas.methods"}


@pytest.mark.parametrize("code", [
    "import nas.config; nas.config.Candidate()",
    "import nas.space; nas.space.load_space('default')",
    "import nas.space; nas.space.load_space('default28')",
    "from nas.config import Candidate; c = Candidate(); Candidate.from_json(c.to_json()).compression.summary()",
])
def test_reading_a_candidate_or_a_space_loads_no_torch(code):
    check = code + "; import sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('nas'))"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT.parent, timeout=120)
