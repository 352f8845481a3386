"""docs/architecture.md's package map and layer list, generated from the code itself.

A hand-kept map drifted: modules were added without a row, a module that became a
package kept its old name, and layers the import contract gained were missing. So the
map is read from the tree (one row per module, its docstring's first paragraph) and the
layers from pyproject.toml's ``[tool.importlinter]`` contract. ``python -m
tests.docs.architecture_map --write`` (or ``scripts/architecture-map``) rewrites the
two parts between their marker comments; the prose around them stays hand-written, and
tests/docs/test_architecture_map.py fails when either part is stale.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "meshmirror"
PAGE = ROOT / "docs" / "architecture.md"
# Generated code: one row for the folder, none for its files.
GENERATED = ("containerd/proto",)
MAP = ("module-map", "scripts/architecture-map writes this part")
LAYERS = ("layers", "scripts/architecture-map writes this part")


def contract() -> tuple[list[str], list[str]]:
    """The layers, top to bottom, and the leaf modules the layers contract leaves out."""
    config: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for found in config["tool"]["importlinter"]["contracts"]:
        if found["type"] == "layers":
            return list(found["layers"]), list(found.get("exhaustive_ignores", []))
    raise ValueError("pyproject.toml has no layers contract")


def summary(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line, in Markdown."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if not doc:
        raise ValueError(f"{path.relative_to(PACKAGE.parent)} has no docstring: say why it exists")
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return first.replace("``", "`").replace("|", "\\|")


def _top(relative: str) -> str:
    return relative.split("/", 1)[0].removesuffix(".py")


def modules() -> list[str]:
    """Every module as a path below meshmirror/, packages as ``name/``, in layer order."""
    layers, leaves = contract()
    rank: dict[str, int] = {}
    for depth, line in enumerate(reversed(layers)):
        for name in line.split("|"):
            rank[name.strip()] = depth
    for name in leaves:
        rank[name] = len(layers)
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "__init__.py" or any(relative.startswith(g) for g in GENERATED):
            continue
        found.append(relative.removesuffix("__init__.py"))
    found += [g + "/" for g in GENERATED]
    unplaced = sorted({_top(m) for m in found} - rank.keys())
    if unplaced:
        raise ValueError(f"modules in no layer of pyproject.toml's contract: {unplaced}")
    return sorted(found, key=lambda m: (rank[_top(m)], _top(m), m))


def module_map() -> str:
    lines = ["| module | what it is for |", "|---|---|"]
    for module in modules():
        source = PACKAGE / module / "__init__.py" if module.endswith("/") else PACKAGE / module
        what = ("generated from containerd's API by `scripts/gen-protos`"
                if module.rstrip("/") in GENERATED else summary(source))
        lines.append(f"| `{module}` | {what} |")
    return "\n".join(lines) + "\n"


def layer_list() -> str:
    layers, leaves = contract()
    listed = ", ".join(f"`{leaf}`" for leaf in leaves)
    return ("```\n" + "\n".join(layers) + "\n```\n\n"
            f"Leaf modules, usable from any layer, import nothing else of meshmirror: {listed}.\n")


def _markers(part: tuple[str, str]) -> tuple[str, str]:
    return f"<!-- {part[0]}:start ({part[1]}) -->", f"<!-- {part[0]}:end -->"


def with_part(page: str, part: tuple[str, str], generated: str) -> str:
    """The page with the text between a part's markers replaced by ``generated``."""
    start, end = _markers(part)
    head, sep, rest = page.partition(start)
    if not sep or end not in rest:
        raise ValueError(f"{PAGE.name} lacks the markers {start!r} ... {end!r}")
    return head + start + "\n\n" + generated + "\n" + end + rest.split(end, 1)[1]


def regenerated(page: str) -> str:
    return with_part(with_part(page, MAP, module_map()), LAYERS, layer_list())


def main(argv: list[str]) -> int:
    page = PAGE.read_text()
    if argv == ["--write"]:
        PAGE.write_text(regenerated(page))
        return 0
    if argv == ["--check"]:
        if regenerated(page) != page:
            print(f"{PAGE} is out of date: run scripts/architecture-map", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(module_map() + "\n" + layer_list())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
