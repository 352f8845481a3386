"""The chart README's values table, generated from values.yaml in helm-docs style.

A value is documented by a ``# -- description`` comment right above it; the
comment may go on over further ``#`` lines. The table lists each documented
key with its type and default. ``python -m tests.helm.values_table --write``
(or ``scripts/helm-values-table``) rewrites the table in helm/meshmirror/README.md
between its two marker comments; tests/helm/test_readme.py keeps it in sync.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "meshmirror"
START = "<!-- values-table:start (scripts/helm-values-table writes this part) -->"
END = "<!-- values-table:end -->"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?:\s|$)")


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def documented_keys(text: str) -> dict[str, str]:
    """Dotted key -> description, for every key with a ``# --`` comment above it."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped.removeprefix("# --").strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped.removeprefix("#").strip())
            continue
        match = _KEY.match(line)
        if match is None:
            if not stripped:
                pending = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if pending is not None:
            found[".".join(k for _, k in stack)] = " ".join(p for p in pending if p)
        pending = None
    return found


def _lookup(values: Any, key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def rows(values_path: Path = CHART / "values.yaml") -> list[Row]:
    text = values_path.read_text()
    values = yaml.safe_load(text)
    return [Row(key, _type(_lookup(values, key)),
                json.dumps(_lookup(values, key), separators=(",", ":")), description)
            for key, description in documented_keys(text).items()]


def table(values_path: Path = CHART / "values.yaml") -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{r.key}` | {r.type} | `{cell(r.default)}` | {cell(r.description)} |"
              for r in rows(values_path)]
    return "\n".join(lines) + "\n"


def with_table(readme: str, generated: str) -> str:
    """The README text with the part between the markers replaced by ``generated``."""
    head, sep, rest = readme.partition(START)
    if not sep or END not in rest:
        raise ValueError(f"README lacks the markers {START!r} ... {END!r}")
    return head + START + "\n\n" + generated + "\n" + END + rest.split(END, 1)[1]


def main(argv: list[str]) -> int:
    readme = CHART / "README.md"
    if argv in (["--write"], ["--check"]):
        updated = with_table(readme.read_text(), table())
    if argv == ["--write"]:
        readme.write_text(updated)
        return 0
    if argv == ["--check"]:
        if updated != readme.read_text():
            print(f"{readme} is out of date: run scripts/helm-values-table", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
