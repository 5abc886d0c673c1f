"""The documents stand alone: no path outside the repository, and every module they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCUMENTS = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("examples/*.yaml"), REPO / "cluster.yaml"])
PACKAGES = ("trial", "search_spaces", "orchestrator", "analysis")


def _layout_modules(text: str) -> set[str]:
    """Module paths (relative to loopgolf/) of the layout tree in docs/architecture.md."""
    tree = text.split("```")[1]  # the first code block is the layout
    modules, package = set(), None
    for line in tree.splitlines():
        if match := re.match(r"^  (\w+)/\s", line + " "):
            package = match.group(1) if match.group(1) in PACKAGES else None
        elif match := re.match(r"^    (\w+\.py)\s", line + " "):
            assert package, f"module {match.group(1)} outside a package in the layout"
            modules.add(f"{package}/{match.group(1)}")
        elif match := re.match(r"^  (\w+\.py)\s", line + " "):
            modules.add(match.group(1))
    return modules


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_documents_name_no_folder_outside_the_repository(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    outside = re.findall(r"(?<![\w.])\.\./[\w./-]*|/work/[\w./-]*|shared folder", text)
    assert not outside, f"{document.name} refers outside the repository: {outside}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_a_document_names_exists(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    named = set(re.findall(rf"\b((?:{'|'.join(PACKAGES)})/\w+\.py)\b", text))
    if document.name == "architecture.md":
        layout = _layout_modules(text)
        packages = {m.split("/")[0] for m in layout if "/" in m}
        assert packages == set(PACKAGES), f"the layout tree parsed to packages {packages}: is its format unchanged?"
        named |= layout
    missing = sorted(m for m in named if not (REPO / "loopgolf" / m).is_file())
    assert not missing, f"{document.name} names modules that do not exist: {missing}"


def test_the_layout_lists_every_module() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    present = {
        str(p.relative_to(REPO / "loopgolf")) for p in (REPO / "loopgolf").rglob("*.py") if p.name != "__init__.py"
    }
    assert sorted(present - _layout_modules(text)) == [], "docs/architecture.md's layout misses these modules"
