"""One trial of one fault of benchmarks/fault_matrix.py, so the runner keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import fault_matrix

pytestmark = [pytest.mark.real]


def test_one_corrupt_peer_trial_pulls_through_the_mirror(tmp_path: Path) -> None:
    results = fault_matrix.run(1, ["corrupt_peer"], tmp_path)
    (trial,) = results["corrupt_peer"]
    assert trial.ok, trial.output
    assert fault_matrix.mirror_caused_failures(results["corrupt_peer"]) == 0
    assert "corrupt_peer" in fault_matrix.report(results).render()
