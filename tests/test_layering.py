"""Imports point one way, with no circles.

The layers, bottom up: trial/ (one configuration; no Ray, Optuna or MLflow), search_spaces/,
orchestrator/ (which may use both), analysis/ (which reads the ledger's schema from
orchestrator/ledger_schema.py and nothing else of it), and cli.py above all of them. Function-local
imports count as imports: a lazy import up a layer is still an arrow the wrong way.

    python -m pytest tests/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loopgolf"
SWEEP_STACK = ("ray", "optuna", "mlflow")
# layer -> what it must not import
FORBIDDEN = {
    "trial": ("loopgolf.search_spaces", "loopgolf.orchestrator", "loopgolf.analysis", "loopgolf.cli", *SWEEP_STACK),
    "search_spaces": ("loopgolf.orchestrator", "loopgolf.analysis", "loopgolf.cli", *SWEEP_STACK),
    "orchestrator": ("loopgolf.analysis", "loopgolf.cli"),
    "analysis": ("loopgolf.cli", "ray", "mlflow"),
}
# the one arrow from analysis into orchestrator: the ledger's schema and file names
ANALYSIS_MAY_READ = ("loopgolf.orchestrator.ledger_schema",)


def imported_modules(source: str) -> set[str]:
    """Every module an import statement names, at top level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_graph() -> dict[str, set[str]]:
    """loopgolf module -> the loopgolf modules it imports (a `from x import name` of a submodule counts)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_modules(path.read_text(encoding="utf-8")):
            while imported and imported not in files:  # `loopgolf.x.y.Name` -> the module loopgolf.x.y
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported != "loopgolf":
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imported_modules_sees_lazy_imports() -> None:
    source = "import os\ndef f():\n    from loopgolf.search_spaces import budget\n"
    assert {"os", "loopgolf.search_spaces", "loopgolf.search_spaces.budget"} <= imported_modules(source)


def test_cycles_finds_a_circle_and_only_it() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_layer_imports_nothing_above_it() -> None:
    bad = []
    for layer, forbidden in FORBIDDEN.items():
        files = sorted((PACKAGE / layer).glob("*.py"))
        assert files, layer
        for path in files:
            for name in imported_modules(path.read_text(encoding="utf-8")):
                if any(name.startswith(a) for a in ANALYSIS_MAY_READ) and layer == "analysis":
                    continue
                if any(name == f or name.startswith(f"{f}.") for f in forbidden):
                    bad.append(f"{layer}/{path.name}: {name}")
    assert not bad, sorted(bad)


def test_analysis_reads_only_the_ledger_of_the_orchestrator() -> None:
    graph = package_graph()
    arrows = {t for m, targets in graph.items() if m.startswith("loopgolf.analysis") for t in targets
              if t.startswith("loopgolf.orchestrator")}  # fmt: skip
    assert arrows <= set(ANALYSIS_MAY_READ), sorted(arrows)


def test_no_two_modules_import_each_other_in_a_circle() -> None:
    assert cycles(package_graph()) == []


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in conftest.py or a helper module (tests/trial/makers.py, ...): importing a
    test module runs its module-level set-up and ties two test files' fates together."""
    tests = Path(__file__).resolve().parent
    offenders = sorted(
        f"{path.relative_to(tests)} imports {name}"
        for path in tests.rglob("*.py")
        for name in imported_modules(path.read_text(encoding="utf-8"))
        if name.startswith("tests.") and ".test_" in name
    )
    assert offenders == []
