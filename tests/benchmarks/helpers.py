"""Checking that a write to RESULTS.md touched only what it owns."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.results import RESULTS, TARGETS, begin_marker, end_marker


def copy_of_results(tmp_path: Path) -> Path:
    """A scratch copy of the real RESULTS.md: tests must never write into the real one."""
    copy = tmp_path / "RESULTS.md"
    shutil.copyfile(RESULTS, copy)
    return copy


def _span(text: str, name: str) -> tuple[int, int]:
    start = text.index(begin_marker(name)) + len(begin_marker(name)) + 1
    return start, text.index(end_marker(name), start)


def block(text: str, name: str) -> str:
    """The body between ``name``'s markers."""
    start, stop = _span(text, name)
    return text[start:stop]


def without_blocks(text: str, *names: str) -> str:
    """``text`` with the bodies of ``names``' blocks emptied (markers kept)."""
    for name in names:
        start, stop = _span(text, name)
        text = text[:start] + text[stop:]
    return text


def assert_only_block_changed(before: str, after: str, name: str) -> None:
    """Everything but ``name``'s block and the top table, which follows it, is unchanged."""
    assert without_blocks(after, name, TARGETS) == without_blocks(before, name, TARGETS)
    assert after.count(begin_marker(name)) == 1 and after.count(end_marker(name)) == 1
