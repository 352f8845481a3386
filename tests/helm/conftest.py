from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm import chart


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary; a clear failure (never a skip) when it is not installed."""
    try:
        return chart.helm_binary()
    except chart.HelmMissing as err:
        pytest.fail(str(err), pytrace=False)
