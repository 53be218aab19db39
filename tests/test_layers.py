"""The package's layers (README, "The pipeline"): every import inside ``patchlab/``, at module level or inside a
function, goes to the same layer or a lower one, and no group of modules imports itself in a circle.

Imports under ``if TYPE_CHECKING:`` are exempt (they never run). ``import a.b.c`` / ``from a.b import c`` count as an
import of the module they name (``a.b.c``, or ``a.b`` when ``c`` is a name in it), not of the parent packages Python
runs on the way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "patchlab"

#: The layers, lowest first; a module belongs to the longest prefix listed (the README shows the same table).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("patchlab.errors", "patchlab.io", "patchlab.provenance", "patchlab.results",
                    "patchlab.progress", "patchlab.version", "patchlab.defaults",
                    "patchlab.schema", "patchlab.registry", "patchlab.distributed")),
    ("model", ("patchlab.pair", "patchlab.tiny")),
    ("interventions", ("patchlab.patching",)),
    ("experiments", ("patchlab.patching.sweep", "patchlab.patching.result", "patchlab.probes", "patchlab.unlearning",
                     "patchlab.analysis", "patchlab.zoo", "patchlab.meta_evaluation")),
    ("presentation", ("patchlab.reports",)),
    ("facade", ("patchlab",)),
    ("apps", ("patchlab.cli", "patchlab.cli_pairs", "patchlab.toy")),
)
#: The modules only apps may import.
APPS = ("patchlab.cli", "patchlab.cli_pairs", "patchlab.toy")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``'s layer (longest matching prefix)."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS (and the README)"
    return rank


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str) -> list[tuple[str, int]]:
    """``(imported patchlab module, line)`` for every import in ``module``, TYPE_CHECKING blocks excepted."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = _package(module).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(MODULES[module].read_text(), filename=str(MODULES[module])))
    return list(dict.fromkeys((target, line) for target, line in found
                              if target == "patchlab" or target.startswith("patchlab.")))


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_goes_up_a_layer():
    upward = [f"{m}:{line} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
              for m, targets in GRAPH.items() for t, line in targets if layer(t) > layer(m)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_library_never_imports_the_apps():
    offending = [f"{m}:{line} imports {t}" for m, targets in GRAPH.items() for t, line in targets
                 if not m.startswith(APPS) and t.startswith(APPS)]
    assert not offending, "the library imports cli / toy:\n" + "\n".join(offending)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` with more than one node, or one node importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle():
    graph = {m: {t for t, _ in targets if t in MODULES} for m, targets in GRAPH.items()}
    cycles = strongly_connected(graph)
    assert not cycles, "modules importing each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
    ({"a": {"a"}}, [["a"]]),
])
def test_cycle_finder(graph, expected):
    assert strongly_connected(graph) == expected


def test_import_walk_sees_function_level_and_facade_imports(tmp_path, monkeypatch):
    source = tmp_path / "patchlab" / "x.py"
    source.parent.mkdir()
    source.write_text("from typing import TYPE_CHECKING\nimport patchlab\nif TYPE_CHECKING:\n"
                      "    from patchlab.cli import quiet\n"
                      "def f():\n    from patchlab import toy\n    from patchlab.pair import ModelPair\n")
    monkeypatch.setitem(MODULES, "patchlab.x", source)
    monkeypatch.setitem(MODULES, "patchlab.toy", ROOT / "toy" / "__init__.py")
    assert imports("patchlab.x") == [("patchlab", 2), ("patchlab.toy", 6), ("patchlab.pair", 7)]
    assert layer("patchlab.pair.sequential") < layer("patchlab.patching.engine") < layer("patchlab.patching.sweep")
