"""Imports point one way: trial/ is the bottom layer and imports none of the layers above
it (search spaces, orchestrator, analysis) nor the sweep machinery (Ray, Optuna, MLflow).

    python -m pytest tests/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

TRIAL = Path(__file__).resolve().parents[1] / "loopgolf" / "trial"
FORBIDDEN = ("loopgolf.search_spaces", "loopgolf.orchestrator", "loopgolf.analysis", "ray", "optuna", "mlflow")


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


def test_imported_modules_sees_lazy_imports() -> None:
    source = "import os\ndef f():\n    from loopgolf.search_spaces import budget\n"
    assert {"os", "loopgolf.search_spaces", "loopgolf.search_spaces.budget"} <= imported_modules(source)


def test_trial_imports_nothing_above_it() -> None:
    files = sorted(TRIAL.glob("*.py"))
    assert files
    bad = {
        f"{path.name}: {name}"
        for path in files
        for name in imported_modules(path.read_text(encoding="utf-8"))
        if any(name == f or name.startswith(f"{f}.") for f in FORBIDDEN)
    }
    assert not bad, sorted(bad)
