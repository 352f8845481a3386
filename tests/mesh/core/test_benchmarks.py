"""The simulator benchmark runs end to end at a tiny size and rejects bad arguments."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_mesh_sim_runs_a_small_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    mesh_sim = _load("mesh_sim")
    assert mesh_sim.main(["--sizes", "8", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| 8 |" in out and "false deaths" in out


@pytest.mark.parametrize("sizes", ["x", "2", ""])
def test_mesh_sim_rejects_bad_sizes(sizes: str) -> None:
    mesh_sim = _load("mesh_sim")
    with pytest.raises(SystemExit) as exc:
        mesh_sim.main(["--sizes", sizes, "--no-write"])
    assert exc.value.code == 2


def test_side_by_side_rejects_bad_node_counts() -> None:
    bench = _load("mesh_vs_kinship")
    for argv in (["--nodes", "2"], ["--nodes", "60"], ["--nodes", "5", "--kills", "4"]):
        with pytest.raises(SystemExit) as exc:
            bench.main([*argv, "--no-write"])
        assert exc.value.code == 2


def test_marked_section_is_replaced_not_appended() -> None:
    from benchmarks.results import replace_marked_section

    text = "# Benchmark results\n\n## Other\nkept\n"
    text = replace_marked_section(text, "sim", "run 1", "Sim")
    text = replace_marked_section(text, "sim", "run 2", "Sim")
    assert "run 1" not in text and text.count("run 2") == 1
    assert text.startswith("# Benchmark results\n\n## Other\nkept\n\n## Sim\n")
    assert text.count("<!-- BEGIN sim -->") == 1 and text.count("<!-- END sim -->") == 1
