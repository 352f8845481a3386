from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshmirror.mesh.transport import MeshNode


@pytest.fixture
def nodes() -> Iterator[list[MeshNode]]:
    """In-process mesh nodes a test starts; each is stopped (without leaving) afterwards."""
    started: list[MeshNode] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop(leave=False, timeout=5)
