"""Writing a benchmark's figures into RESULTS.md.

Most benchmarks append a dated section per run, so earlier runs stay for
comparison. The simulator-style ones keep exactly one current section between
HTML comment markers, because their figures are deterministic for a seed and
a new run replaces, rather than adds to, the last one.
"""

from __future__ import annotations

from pathlib import Path


def replace_marked_section(results: Path, marker: str, section: str) -> None:
    """Put ``section`` between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``
    in ``results``, replacing what was there, or append it with the markers."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    results.write_text(text)
