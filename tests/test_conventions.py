"""The naming conventions the code settled on stay settled: merges of parallel work
brought the old names back more than once (a `*Options` in a benchmark, a logger
named by hand), and nothing but a reader noticed.

- A module logs through ``log = logging.getLogger(__name__)``: one name to grep, and
  the logger's name is the module's (``meshmirror.access``, the access log's channel,
  is the one named logger, passed to its middleware).
- Config types end in ``Config``, never ``Options``.
- A leading underscore means "this module's own": no other module imports it, tests
  and benchmarks included (they reach behaviour through the public names, or the
  helper is public where it is shared).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("meshmirror", "tests", "benchmarks")
GENERATED = ROOT / "meshmirror" / "containerd" / "proto"


def sources() -> Iterator[tuple[str, ast.Module]]:
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            if GENERATED in path.parents:
                continue
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def module_name(relative: str) -> str:
    return relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for relative, tree in sources():
        own = module_name(relative)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.module is None or node.level:
                continue
            if node.module.split(".")[0] not in TREES or node.module == own:
                continue
            found += [f"{relative}:{node.lineno}: {node.module}.{alias.name}"
                      for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_no_module_imports_from_a_test_module() -> None:
    """A helper two test files share lives in a helper module (tests/support/ or the
    folder's own), so running or moving one test file never drags another's tests in."""
    found = []
    for relative, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            found += [f"{relative}:{node.lineno}: {module}" for module in modules
                      if module.split(".")[0] in TREES
                      and module.rsplit(".", 1)[-1].startswith("test_")]
    assert not found, "imports from test modules:\n" + "\n".join(found)


def test_modules_log_through_log_named_after_the_module() -> None:
    found = []
    for relative, tree in sources():
        if not relative.startswith("meshmirror/"):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "getLogger"):
                continue
            arg = node.args[0] if node.args else None
            by_module = isinstance(arg, ast.Name) and arg.id == "__name__"
            named = isinstance(arg, ast.Constant) and arg.value in (
                "meshmirror.access", "hypercorn.error")
            if not (by_module or named or arg is None):
                found.append(f"{relative}:{node.lineno}: getLogger({ast.unparse(arg)})")
        for statement in tree.body:
            if (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call)
                    and ast.unparse(statement.value) == "logging.getLogger(__name__)"):
                names = [ast.unparse(target) for target in statement.targets]
                if names != ["log"]:
                    found.append(f"{relative}:{statement.lineno}: {names[0]} = ...")
    assert not found, "loggers not named log = getLogger(__name__):\n" + "\n".join(found)


def test_config_types_end_in_config() -> None:
    found = [f"{relative}:{node.lineno}: {node.name}"
             for relative, tree in sources() if relative.startswith("meshmirror/")
             for node in ast.walk(tree)
             if isinstance(node, ast.ClassDef) and node.name.endswith("Options")]
    assert not found, "config types named *Options (use *Config):\n" + "\n".join(found)
