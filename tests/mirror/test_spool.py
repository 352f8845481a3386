"""SpoolBudget and SpoolFile on their own: accounting, ranges, release from anywhere."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshmirror.mirror.spool import SpoolBudget, check_spool_directory


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_write_reset_and_read_ranges(tmp_path: Path) -> None:
    budget = SpoolBudget(tmp_path, 100)
    spool = budget.reserve(10)
    assert spool is not None and budget.used == 10
    spool.write(b"garbage!!!")
    spool.reset()  # the first peer lied: start again
    spool.write(b"01234")
    spool.write(b"56789")
    with pytest.raises(ValueError, match="given 11"):
        spool.write(b"x")
    assert await read_all(spool.read(3, 7, chunk_size=2)) == b"3456"
    assert budget.used == 0, "reading to the end releases the spool"
    assert not os.listdir(tmp_path), "spool files have no name"


def test_budget_refuses_what_does_not_fit_and_gets_it_back(tmp_path: Path) -> None:
    budget = SpoolBudget(tmp_path, 100)
    first = budget.reserve(60)
    assert first is not None
    assert budget.reserve(41) is None
    second = budget.reserve(40)
    assert second is not None and budget.used == 100
    first.release()
    first.release()  # twice is harmless
    assert budget.used == 40
    del second
    gc.collect()
    assert budget.used == 0
    assert SpoolBudget(tmp_path, 0).reserve(1) is None


def test_release_inside_the_budget_lock_does_not_deadlock(tmp_path: Path) -> None:
    """A finalizer may run while the same thread holds the budget's lock."""
    budget = SpoolBudget(tmp_path, 100)
    spool = budget.reserve(30)
    assert spool is not None
    with budget._lock:
        spool.release()  # would block forever if release took the lock
    assert budget.used == 0


def test_missing_directory_means_no_spool(tmp_path: Path) -> None:
    assert SpoolBudget(tmp_path / "missing", 100).reserve(10) is None
    with pytest.raises(OSError, match="not a directory"):
        check_spool_directory(tmp_path / "missing")
    check_spool_directory(tmp_path)
    with pytest.raises(ValueError, match="negative"):
        SpoolBudget(tmp_path, -1)
