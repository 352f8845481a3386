"""RESULTS.md as a current record: a write replaces one block and the summary follows it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from benchmarks.results import (
    RESULTS,
    TARGETS,
    BenchRun,
    Section,
    Table,
    Target,
    cluster_sizes,
    refresh_targets,
    replace_marked_section,
    write_section,
)
from tests.benchmarks.helpers import (
    assert_only_block_changed,
    block,
    copy_of_results,
    without_blocks,
)


def _current_targets(latest: float | None) -> list[Target]:
    """bench_peer_hop's targets as RESULTS.md lists them now (``latest`` replaces the first
    one's figure), so an unchanged rewrite is byte-identical whatever the last run gave."""
    targets = []
    for line in block(RESULTS.read_text(), TARGETS).splitlines():
        if "(#peer-hop-streaming-throughput)" in line:
            what, wanted, figure = (cell.strip() for cell in line.split("|")[1:4])
            bound, goal = wanted.split()
            targets.append(Target(what, bound, float(goal.rstrip("x")),
                                  float(figure.rstrip("x"))))
    if latest is not None:
        targets[0] = Target(targets[0].what, targets[0].bound, targets[0].goal, latest)
    return targets


def _section(name: str = "bench_peer_hop", latest: float | None = None) -> Section:
    return Section(
        name=name, title="Fake", command=f"python -m benchmarks.{name}", date="2030-01-01T00:00Z",
        load="(1/5/15 min) 0.10 / 0.20 / 0.30 before, 0.40 / 0.50 / 0.60 after",
        setup="Fake figures.", tables=[Table(("a", "b"), [("1", "2")])], notes=["a note"],
        targets=_current_targets(latest))


def test_replacing_a_block_leaves_every_other_byte_alone(tmp_path: Path) -> None:
    before = copy_of_results(tmp_path).read_text()
    after = replace_marked_section(before, "bench_router", "new body")
    assert block(after, "bench_router") == "new body\n"
    assert without_blocks(after, "bench_router") == without_blocks(before, "bench_router")


def test_a_section_with_unchanged_targets_changes_only_its_own_block(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    write_section(_section(), results)
    after = results.read_text()
    assert "a note" in block(after, "bench_peer_hop") and "a note" not in before
    # Same targets, same latest figures: the top table is byte-identical too.
    assert without_blocks(after, "bench_peer_hop") == without_blocks(before, "bench_peer_hop")


def test_a_section_s_new_figures_reach_the_top_table(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    write_section(_section(latest=1.1), results)
    after = results.read_text()
    assert_only_block_changed(before, after, "bench_peer_hop")
    summary = block(after, TARGETS)
    assert (f"| {_current_targets(None)[0].what} | >= 1x | 1.10x | yes | "
            "[Peer-hop streaming throughput](#peer-hop-streaming-throughput) |") in summary
    assert summary.count("\n") == block(before, TARGETS).count("\n")


def test_rewriting_twice_gives_the_same_file(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    write_section(_section(), results)
    once = results.read_text()
    write_section(_section(), results)
    assert results.read_text() == once


def test_a_new_benchmark_is_appended_under_its_heading_and_listed(tmp_path: Path) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    write_section(_section("bench_new"), results)
    after = results.read_text()
    assert without_blocks(after, TARGETS).startswith(without_blocks(before, TARGETS).rstrip())
    assert after.rstrip().endswith("<!-- END bench_new -->")
    assert "## Fake\n\n<!-- BEGIN bench_new -->" in after
    assert "[Fake](#fake)" in block(after, TARGETS)


def test_a_missing_file_is_created_with_the_top_table_first(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    write_section(_section(), results)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n<!-- BEGIN targets -->\n| target |")
    assert text.index("<!-- END targets -->") < text.index("## Fake")


def test_the_real_top_table_is_in_sync_with_the_sections() -> None:
    text = RESULTS.read_text()
    assert refresh_targets(text) == text


def test_every_link_in_the_top_table_names_a_heading() -> None:
    text = RESULTS.read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", text, re.MULTILINE)}
    links = re.findall(r"\]\(#([^)]+)\)", block(text, TARGETS))
    assert links and set(links) <= anchors


def test_results_names_no_file_outside_the_repository() -> None:
    assert "RECIPES" not in RESULTS.read_text() and "DESIGN.md" not in RESULTS.read_text()


@pytest.mark.parametrize(("bound", "latest", "met"), [
    (">=", 0.5, True), (">=", 0.49, False), ("<=", 2.0, True), ("<=", 2.01, False)])
def test_target_met(bound: str, latest: float, met: bool) -> None:
    goal = 0.5 if bound == ">=" else 2.0
    assert Target("x", bound, goal, latest).met is met


def test_target_rejects_an_unknown_bound() -> None:
    with pytest.raises(ValueError, match="bound"):
        Target("x", "<", 1, 0)


def test_a_block_without_its_end_marker_is_an_error() -> None:
    with pytest.raises(ValueError, match="without"):
        replace_marked_section("<!-- BEGIN x -->\nbody\n", "x", "new")


def test_a_bench_run_prints_always_and_writes_only_where_and_when_told(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = copy_of_results(tmp_path)
    before = results.read_text()
    section = _section("bench_fake_run")
    printed = BenchRun(argparse.ArgumentParser(), ["--results", str(results), "--no-write"])
    assert printed.args.results == results and not printed.writes
    assert printed.load_before.count("/") == 2  # the 1/5/15-minute load at its start
    printed.publish(section)
    assert section.render() in capsys.readouterr().out
    assert results.read_text() == before
    BenchRun(argparse.ArgumentParser(), ["--results", str(results)]).publish(section)
    assert block(results.read_text(), "bench_fake_run").strip() == section.render()
    assert BenchRun(argparse.ArgumentParser(), []).args.results == RESULTS


def test_cluster_sizes_are_ascii_whole_numbers_at_least_the_least() -> None:
    assert cluster_sizes(least=3)(" 50, 100,,1000 ") == [50, 100, 1000]
    for bad in ("", ",", "2", "50,x", "50,\u00b2", "-5", "5.0"):
        with pytest.raises(argparse.ArgumentTypeError, match="at least 3"):
            cluster_sizes(least=3)(bad)
