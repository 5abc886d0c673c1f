"""Private names of Ray, Optuna and MLflow that loopgolf uses, checked against the installed versions.

pyproject.toml bounds these libraries below their next major version, but a minor release
may still rename or drop a private name. Every one the code relies on is listed in
CONTRACT, with a check that resolves it in the installed version: when an upgrade drops
one, its test fails naming the name, the library version and the file that uses it. A scan
of the orchestrator's source fails when the code starts using a private name that the list
does not hold, or stops using one that it does, so the list stays exactly the code's.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from tests.conftest import REPO

LIBRARIES = ("ray", "optuna", "mlflow")


@dataclasses.dataclass(frozen=True)
class Private:
    name: str  # as the scan reports it: a dotted module, or an attribute name
    library: str
    used_in: str
    check: Callable[[], bool]  # True when the installed library still has it


def _module_has(module: str, attribute: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return hasattr(importlib.import_module(module), attribute)
        except ImportError:
            return False

    return check


def _class_assigns(module: str, cls: str, attribute: str) -> Callable[[], bool]:
    """The installed class still sets `self.<attribute>` (attributes made in setup methods, not __init__)."""

    def check() -> bool:
        source = inspect.getsource(getattr(importlib.import_module(module), cls))
        return f"self.{attribute} =" in source or f"self.{attribute}:" in source

    return check


# None today: the searcher, the MLflow runs and Ray's start-up use public APIs only (issue 13).
# A private name the code starts to use goes here, with a check.
CONTRACT: list[Private] = []


def test_the_checks_tell_a_present_name_from_a_missing_one() -> None:
    """So that an entry added to CONTRACT can fail: each kind of check, on a name Ray has and one it lacks."""
    auth = "ray._private.authentication.authentication_token_setup"
    assert _module_has(auth, "maybe_enable_token_auth_if_token_available")()
    assert not _module_has(auth, "no_such_function")() and not _module_has("ray._no_such_module", "x")()
    assert _class_assigns("ray.tune.search.searcher", "Searcher", "_metric")()
    assert not _class_assigns("ray.tune.search.searcher", "Searcher", "_no_such_attribute")()


# ------------------------------------------------------------------------------ the scan


def _imports_a_library(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n.split(".")[0] in LIBRARIES for n in names):
            return True
    return False


def _is_private_attribute(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")


def _inherited_privates(cls: ast.ClassDef) -> set[str]:
    """`self._x` read in a class but never assigned in it: a base class's private attribute."""
    read, assigned = set(), set()
    for node in ast.walk(cls):
        if _is_private_attribute(node) and isinstance(node.value, ast.Name) and node.value.id == "self":
            (assigned if isinstance(node.ctx, ast.Store) else read).add(node.attr)
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    return read - assigned - methods


def private_uses(source: str) -> set[str]:
    """Private names a module reaches in other packages: modules it imports, attributes of objects
    other than self, and base-class attributes read through self."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found |= {m for m in modules if any(p.startswith("_") and not p.startswith("__") for p in m.split("."))}
        if _is_private_attribute(node) and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            found.add(node.attr)
        if isinstance(node, ast.ClassDef) and node.bases:
            found |= _inherited_privates(node)
    return found


def test_the_scan_finds_each_kind_of_private_use() -> None:
    source = """
import ray._private.x
from optuna._hidden import y
class Mine(Base):
    def __init__(self):
        self._own = 1
    def _helper(self):
        return self._own + self._inherited + study._storage.get() + self.__dunder
"""
    assert private_uses(source) == {"ray._private.x", "optuna._hidden", "_inherited", "_storage"}


def test_the_contract_lists_exactly_the_private_names_the_code_uses_and_each_still_resolves() -> None:
    """The scan against CONTRACT, then each listed name against the installed library. The
    second half runs over CONTRACT, empty today: it is here, not a test of its own, so that
    no test passes by checking nothing, and an entry added to CONTRACT is checked at once."""
    uses: dict[str, set[str]] = {}
    for path in sorted((REPO / "loopgolf").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if _imports_a_library(ast.parse(source)):
            for name in private_uses(source):
                uses.setdefault(name, set()).add(str(path.relative_to(REPO / "loopgolf")))
    listed = {p.name: p.used_in for p in CONTRACT}
    unlisted = {name: sorted(files) for name, files in uses.items() if name not in listed}
    assert not unlisted, f"private names used but not in tests/test_contracts.py's CONTRACT: {unlisted}"
    stale = sorted(name for name in listed if name not in uses)
    assert not stale, f"CONTRACT lists private names the code no longer uses (remove them): {stale}"
    wrong = {name: sorted(uses[name]) for name, where in listed.items() if where not in uses[name]}
    assert not wrong, f"CONTRACT names the wrong file for: {wrong}"
    gone = [
        f"{p.library} {version(p.library)} no longer has {p.name!r}, which loopgolf/{p.used_in} uses"
        for p in CONTRACT
        if not p.check()
    ]
    assert not gone, "; ".join(gone) + ": port that code to the new version, then update CONTRACT"


def test_pyproject_bounds_each_library_below_its_next_major_version() -> None:
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads(Path(REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    requirements = {Requirement(d).name: Requirement(d) for d in deps}
    for library in LIBRARIES:
        installed = version(library)
        next_major = f"{int(installed.split('.')[0]) + 1}"
        spec = requirements[library].specifier
        assert installed in spec, f"{library} {installed} is installed but pyproject.toml asks for {spec}"
        assert f"<{next_major}" in {str(s) for s in spec}, f"{library}: expected an upper bound <{next_major}"
