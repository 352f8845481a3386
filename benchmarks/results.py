"""Writing a benchmark's figures into RESULTS.md.

RESULTS.md is a record of the current figures, not a log: each benchmark owns
one block between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` and a new
run replaces that block, so a reader never has to work out which of several
runs is the latest (earlier runs stay in git history). The section's heading
and any lasting explanation sit outside the block, so a re-run keeps them.

Each block ends with a small table of the targets it checks; the table at the
top of the file is regenerated from those on every write, so there is one
place for each figure and the summary cannot drift from the sections. Blocks
named ``tests_*`` hold figures printed by tests and are kept by hand in the same
shape.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshmirror.flags import decimal

RESULTS = Path(__file__).with_name("RESULTS.md")
TARGETS = "targets"
TARGET_HEADER = "| target | wanted | latest | met |"
_SUMMARY_HEADER = "| target | wanted | latest | met | section |"


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN {name} -->"


def end_marker(name: str) -> str:
    return f"<!-- END {name} -->"


def load_average() -> str:
    """The 1/5/15-minute load average: on a shared machine it says how far to trust a run."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def load_since(before: str) -> str:
    """A run's load as recorded in a section: ``before`` is ``load_average()`` at its start."""
    return f"(1/5/15 min) {before} before, {load_average()} after"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ")


@dataclass(frozen=True)
class Target:
    """One figure with a bound it should stay within, e.g. peer hop >= 0.5x Distribution."""

    what: str
    bound: str  # ">=" or "<="
    goal: float
    latest: float
    unit: str = "x"

    def __post_init__(self) -> None:
        if self.bound not in (">=", "<="):
            raise ValueError(f"bound must be '>=' or '<=', not {self.bound!r}")

    @property
    def met(self) -> bool:
        return self.latest >= self.goal if self.bound == ">=" else self.latest <= self.goal

    def row(self) -> str:
        met = "yes" if self.met else "**no**"
        return (f"| {self.what} | {self.bound} {self.goal:g}{self.unit} "
                f"| {self.latest:.2f}{self.unit} | {met} |")


@dataclass(frozen=True)
class Table:
    """A Markdown table: a header and rows of already formatted cells."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]

    def render(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        return "\n".join([line(self.header), "|" + "---|" * len(self.header),
                          *(line(row) for row in self.rows)])


@dataclass(frozen=True)
class Section:
    """One benchmark's latest run: how it was run, when, under what load, and its figures."""

    name: str  # the block's marker, the script's module name
    title: str  # the heading, used only when the file has no block of this name yet
    command: str
    date: str
    load: str  # as measured, e.g. "(1/5/15 min) 1.02 / 1.19 / 1.24 before, 1.69 / ... after"
    setup: str = ""
    tables: Sequence[Table] = ()
    notes: Sequence[str] = ()
    targets: Sequence[Target] = field(default_factory=tuple)

    def render(self) -> str:
        parts = [f"`{self.command}` — {self.date}; load average {self.load}."]
        if self.setup:
            parts.append(self.setup)
        parts += [table.render() for table in self.tables]
        if self.notes:
            parts.append("\n".join(f"- {note}" for note in self.notes))
        if self.targets:
            parts.append("\n".join([TARGET_HEADER, "|---|---|---|---|",
                                    *(t.row() for t in self.targets)]))
        return "\n\n".join(parts)


def replace_marked_section(text: str, name: str, body: str, title: str | None = None) -> str:
    """``text`` with the block ``name`` holding ``body``; everything else is left as it was.
    A block not yet in ``text`` is appended, under ``## title`` if given."""
    begin, end = begin_marker(name), end_marker(name)
    block = f"{begin}\n{body}\n{end}"
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            raise ValueError(f"{begin} without {end}")
        return text[:start] + block + text[stop + len(end):]
    heading = f"## {title}\n\n" if title else ""
    return text.rstrip("\n") + "\n\n" + heading + block + "\n"


def _anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


_BLOCK = re.compile(r"^<!-- BEGIN (\S+) -->\n(.*?)^<!-- END \1 -->$", re.MULTILINE | re.DOTALL)


def target_summary(text: str) -> str:
    """The top table: every block's target rows, each linked to the heading above its block."""
    rows: list[str] = []
    for block in _BLOCK.finditer(text):
        if block.group(1) == TARGETS:
            continue
        headings = re.findall(r"^## (.+)$", text[:block.start()], re.MULTILINE)
        link = f"[{headings[-1]}](#{_anchor(headings[-1])})" if headings else block.group(1)
        lines = block.group(2).splitlines()
        if TARGET_HEADER not in lines:
            continue
        for line in lines[lines.index(TARGET_HEADER) + 2:]:
            if not line.startswith("|"):
                break
            rows.append(f"{line} {link} |")
    return "\n".join([_SUMMARY_HEADER, "|---|---|---|---|---|", *rows])


def refresh_targets(text: str) -> str:
    """``text`` with the top table regenerated from the sections' own target tables; a
    file without one gets it right under its title."""
    if begin_marker(TARGETS) not in text:
        title, _, rest = text.partition("\n")
        empty = f"{begin_marker(TARGETS)}\n{end_marker(TARGETS)}"
        rest = rest.lstrip("\n")
        text = f"{title}\n\n{empty}\n\n{rest}"
    return replace_marked_section(text, TARGETS, target_summary(text))


def write_section(section: Section, results: Path = RESULTS) -> None:
    """Replace ``section``'s block in ``results`` (created if missing) and the top table."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    text = replace_marked_section(text, section.name, section.render(), section.title)
    results.write_text(refresh_targets(text))


def cluster_sizes(least: int) -> Callable[[str], list[int]]:
    """An argparse ``type`` for a simulator's ``--sizes``: comma-separated cluster sizes
    ("50,100,1000"), at least one, none below ``least``; anything else is a usage error."""
    def parse(text: str) -> list[int]:
        given = [decimal(part.strip()) for part in text.split(",") if part.strip()]
        sizes = [size for size in given if size is not None and size >= least]
        if not sizes or len(sizes) != len(given):
            raise argparse.ArgumentTypeError(f"want cluster sizes of at least {least}, "
                                             f"comma-separated, not {text!r}")
        return sizes

    return parse


class BenchRun:
    """A benchmark's run from its flags to its section, the same for every benchmark.

    Each takes ``--results`` (tests point it at a scratch copy) and ``--no-write``
    (print only), records the load average from the moment its flags are read
    (``load_before``, for `load_since` in its section), and prints its section
    before writing it.
    """

    def __init__(self, parser: argparse.ArgumentParser,
                 argv: Sequence[str] | None = None) -> None:
        parser.add_argument("--results", type=Path, default=RESULTS,
                            help="the file to write the section into (default: %(default)s)")
        parser.add_argument("--no-write", action="store_true", help="print the section only")
        self.args = parser.parse_args(argv)
        self.load_before = load_average()

    @property
    def writes(self) -> bool:
        return not self.args.no_write

    def publish(self, section: Section) -> None:
        """Print ``section``; write it into ``--results`` unless ``--no-write``."""
        print(section.render())
        if self.writes:
            write_section(section, self.args.results)
