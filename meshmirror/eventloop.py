"""The event loop a node runs on: uvloop's, libuv's loop behind asyncio's interface.

uvloop does in C what asyncio's selector loop does in Python: waiting for readiness,
callbacks, timers, and the transports of every connection. Accepting, reading and
closing 20,000 connections through ``asyncio.start_server`` cost the loop thread 51 µs
a connection on uvloop and 89 µs on asyncio's loop (measured on the development
machine). A connect storm gains little from it, as the registry's listener handles a
storm's connections with bare system calls and never gives them a transport
(benchmarks/RESULTS.md, "Hostile clients, attacker on its own CPU"); every honest
connection, peer fetch and gossip stream does go through the loop. Everything the
node uses runs on it unchanged: aiohttp, Hypercorn's protocol, grpclib,
``add_reader``/``add_writer`` on duplicated descriptors, signal handlers. Tests that
start a server in-process mostly keep pytest's asyncio loop, so the code runs under
both.
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
