"""The user docs hang together: the index links every page, the README starts a user
there, and the Spegel table is the one `meshmirror migrate-values` applies."""

from __future__ import annotations

import re
from pathlib import Path

from meshmirror.migrate import RULES

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


def test_readme_starts_a_user_in_docs() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "](docs/README.md)" in readme[:1500]
    assert "](docs/getting-started.md)" in readme[:1500]


def test_relative_links_resolve() -> None:
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links missing {target}"


def spegel_table() -> str:
    lines = ["| Spegel value | meshmirror value | Notes |", "|---|---|---|"]
    for key, rule in RULES.items():
        target = f"`{rule.target}`" if rule.target else "—"
        note = rule.why
        if rule.keeps_own_default and rule.target:
            note = (note + "; " if note else "") + (
                "Spegel's default is not carried: meshmirror's own applies")
        lines.append(f"| `{key}` | {target} | {note} |")
    return "\n".join(lines) + "\n"


def test_migration_page_lists_every_spegel_value() -> None:
    assert spegel_table() in (DOCS / "migrating-from-spegel.md").read_text(), (
        "docs/migrating-from-spegel.md's table differs from meshmirror/migrate.py's RULES")
