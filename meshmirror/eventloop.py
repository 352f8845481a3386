"""The event loop a node runs on: uvloop's, libuv's loop behind asyncio's interface.

The node's own costs per connection are mostly the loop's: waiting for readiness,
accepting, transports. A connect storm (issue 23) is thousands of those a second,
and the honest connections queued behind it wait for the loop to get through them.
uvloop does that work in C: an accept, a read and a close cost the loop thread 51 µs
a connection where asyncio's selector loop took 89 µs (benchmarks/RESULTS.md, "Hostile
clients"). Everything else the node uses runs on it unchanged: aiohttp, Hypercorn's
protocol, grpc.aio, ``add_reader``/``add_writer`` on duplicated descriptors, signal
handlers. Tests that start a server in-process keep pytest's asyncio loop, so the
code runs under both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

__all__ = ["new_event_loop", "run"]

_T = TypeVar("_T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh loop of the kind every meshmirror loop is (the node's, the mesh thread's)."""
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on a `new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
