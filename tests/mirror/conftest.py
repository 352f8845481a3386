"""Fixtures every mirror test may ask for."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session like the one a node's mirror reaches its peers through (peering.py):
    bodies left as sent, so what is hashed is what the peer sent."""
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s
