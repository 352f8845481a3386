"""The user docs hang together: the index links every page, the README starts a user
there, the Spegel table is the one `meshmirror migrate-values` applies, and the release
they tell a user to install is the chart's version."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

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


def test_published_versions_named_in_docs_are_the_charts() -> None:
    # scripts/release refuses a tag the chart's version does not match; the pages that
    # say what to install must move with it, or a user installs the previous release.
    version = yaml.safe_load((DOCS.parent / "helm" / "meshmirror" / "Chart.yaml")
                             .read_text())["version"]
    pages = [*DOCS.glob("*.md"), DOCS.parent / "README.md",
             DOCS.parent / "helm" / "meshmirror" / "README.md"]
    named = re.compile(r"charts/meshmirror\s+(?:\\\s+)?--version\s+(\d[^\s`]*)"
                       r"|meshmirror/meshmirror:(\d[^\s\"`]*)|/meshmirror:(\d[^\s\"`]*)")
    found = 0
    for page in pages:
        for match in named.finditer(page.read_text()):
            found += 1
            assert next(g for g in match.groups() if g) == version, (
                f"{page.relative_to(DOCS.parent)} names release {match.group(0)!r}; "
                f"the chart is {version}")
    assert found >= 3
