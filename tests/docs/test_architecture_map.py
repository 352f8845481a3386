"""docs/architecture.md's package map and layer list are the code's, not a memory of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs import architecture_map


def test_architecture_page_is_current() -> None:
    page = architecture_map.PAGE.read_text()
    assert architecture_map.regenerated(page) == page, (
        "docs/architecture.md is stale: run scripts/architecture-map")


def test_every_module_has_a_row() -> None:
    page = architecture_map.PAGE.read_text()
    for path in architecture_map.PACKAGE.rglob("*.py"):
        module = path.relative_to(architecture_map.PACKAGE).as_posix()
        if module == "__init__.py" or module.startswith(architecture_map.GENERATED):
            continue
        assert f"| `{module.removesuffix('__init__.py')}` |" in page, module


def test_a_module_added_without_regenerating_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "meshmirror"
    (package / "mirror").mkdir(parents=True)
    (package / "mirror" / "__init__.py").write_text('"""The mirror."""\n')
    (package / "peering.py").write_text('"""Peering."""\n')
    monkeypatch.setattr(architecture_map, "PACKAGE", package)
    page = architecture_map.regenerated(architecture_map.PAGE.read_text())
    (package / "mirror" / "newthing.py").write_text('"""Something new, and why."""\n')
    updated = architecture_map.regenerated(page)
    assert updated != page
    assert "| `mirror/newthing.py` | Something new, and why. |" in updated


def test_a_module_without_a_docstring_or_a_layer_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "meshmirror"
    package.mkdir()
    monkeypatch.setattr(architecture_map, "PACKAGE", package)
    (package / "peering.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no docstring"):
        architecture_map.module_map()
    (package / "peering.py").write_text('"""Peering."""\n')
    (package / "elsewhere.py").write_text('"""Nowhere in the contract."""\n')
    with pytest.raises(ValueError, match="elsewhere"):
        architecture_map.module_map()
