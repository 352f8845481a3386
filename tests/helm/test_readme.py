"""The chart README's values table is what values.yaml's comments generate, and
every value in values.yaml is documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.helm import values_table

README = values_table.CHART / "README.md"
VALUES = values_table.CHART / "values.yaml"


def test_readme_values_table_is_current() -> None:
    readme = README.read_text()
    assert values_table.with_table(readme, values_table.table()) == readme, (
        "helm/meshmirror/README.md's values table is out of date: run scripts/helm-values-table")


def test_every_value_is_documented() -> None:
    """A key is documented itself or sits under a documented key (resources.limits)."""
    documented = set(values_table.documented_keys(VALUES.read_text()))

    def undocumented(value: Any, path: str) -> list[str]:
        if path in documented:
            return []
        if isinstance(value, dict) and value:
            return [k for key, sub in value.items()
                    for k in undocumented(sub, f"{path}.{key}" if path else key)]
        return [path]

    assert undocumented(yaml.safe_load(VALUES.read_text()), "") == []


def test_generator_reads_multi_line_comments_and_nesting(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("# a header, not a description\n\n"
                      "a:\n  # -- first line\n  # second | line\n  b: 1\n  c: x\n"
                      "# -- top\nd: [1]\n")
    rows = values_table.rows(values)
    assert [(r.key, r.type, r.default, r.description) for r in rows] == [
        ("a.b", "int", "1", "first line second | line"), ("d", "list", "[1]", "top")]
    assert "second \\| line" in values_table.table(values)
