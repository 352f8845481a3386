"""The registry server's bounds, in-process with a plain Starlette app: a response nobody
reads is dropped and its body closed, a connect-and-close frees its descriptor at once,
and the connection cap makes new clients wait instead of failing while idle ones go; on
the registry port's per-source accept queues (`serving`) and on a lone listener."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from meshmirror import eventloop
from meshmirror.registry import server as server_module
from meshmirror.registry.server import (
    ServerConfig,
    ServerMetrics,
    bind_listener,
    connection_cap,
    serve,
)
from meshmirror.registry.serveroptions import BACKLOG, SOURCE_BACKLOG
from meshmirror.registry.steering import bind_listeners, own_addresses, source_queue
from tests.hostile.clients import closed_by_server, get_from, open_fds, timed_get, unread_get
from tests.support.ports import loopback_host

PIECE = 128 * 1024
SNDBUF = 16 * 1024


class BodyApp:
    """``/blob`` streams 128 MiB in pieces and records when its body iterator is closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

        async def blob(request: Request) -> Response:
            return StreamingResponse(self._body())

        async def base(request: Request) -> Response:
            return PlainTextResponse("{}")

        async def sized(request: Request) -> Response:
            return Response(b"x" * int(request.query_params["size"]))

        self.app = Starlette(routes=[Route("/blob", blob), Route("/v2/", base),
                                     Route("/sized", sized)])

    async def _body(self) -> AsyncIterator[bytes]:
        try:
            for _ in range(1024):
                yield b"x" * PIECE
        finally:
            self.closed.set()


def answered(sock: socket.socket) -> bool:
    """Whether bytes of the answer wait in ``sock``, without taking them."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


async def serving(options: ServerConfig,
                  body: Callable[[str, int, BodyApp], Awaitable[None]],
                  sndbuf: int | None = None) -> None:
    """Serves on the per-source queues a node's registry port has, with no address of
    its own: the test's clients (127.0.0.1) are a source queue's, with its accept rate,
    as a pod's would be."""
    app = BodyApp()
    host = loopback_host()
    listeners, unsteered = bind_listeners(host, 0, BACKLOG, (), SOURCE_BACKLOG)
    assert unsteered is None
    for sock in listeners.sockets:
        if sndbuf is not None:  # accepted sockets inherit it, and the kernel stops tuning it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    port = listeners.sockets[0].getsockname()[1]
    shutdown = asyncio.Event()
    task = asyncio.create_task(serve(app.app, listeners, shutdown, options))
    try:
        await body(host, port, app)
    finally:
        shutdown.set()
        await asyncio.wait_for(task, options.graceful_timeout + 10)


async def test_a_response_nobody_reads_is_dropped_and_its_body_closed() -> None:
    async def check(host: str, port: int, app: BodyApp) -> None:
        stalled = unread_get(host, port, "/blob")
        try:
            # 0.5 s without progress, found within a quarter more: 20 s is generous.
            await asyncio.wait_for(app.closed.wait(), 20)
            await until(lambda: closed_by_server(stalled), 20, "the server closes the socket")
            status, _ = await asyncio.to_thread(timed_get, f"http://{host}:{port}/v2/", 10)
            assert status == 200
        finally:
            stalled.close()

    await serving(ServerConfig(send_timeout=0.5), check)


async def test_a_closed_connection_with_unsent_bytes_does_not_linger() -> None:
    """A response that fits in the buffers ends the request, and the close that follows
    (``Connection: close``, or an idle keep-alive connection) waits for the client to
    read what is left. One that never reads must not keep the descriptor."""
    async def check(host: str, port: int, app: BodyApp) -> None:
        await asyncio.sleep(0.1)
        baseline = open_fds(os.getpid())
        clients = []
        # The server's send buffer is fixed small (below), so these responses leave a
        # rest of up to 64 KiB, the transport's high-water mark, in our own buffer:
        # the response ends without waiting, and only the close would wait.
        for i, size in enumerate(range(SNDBUF * 3, SNDBUF * 3 + 100 * 1024, 4 * 1024)):
            mode = ("close", "keep-alive")[i % 2]
            clients.append(unread_get(host, port, f"/sized?size={size}", mode))
        try:
            await until(lambda: all(answered(sock) for sock in clients), 30,
                        "every client to be answered")
            # Each side of each connection is a descriptor here; the server's go.
            await until(lambda: open_fds(os.getpid()) <= baseline + len(clients) + 2, 30,
                        "the server to close every connection its client left unread")
        finally:
            for sock in clients:
                sock.close()

    await serving(ServerConfig(send_timeout=1.0, keep_alive_timeout=1.0), check,
                  sndbuf=SNDBUF)


async def test_a_slow_reader_that_keeps_reading_is_not_cut_off() -> None:
    async def check(host: str, port: int, app: BodyApp) -> None:
        reader = unread_get(host, port, "/blob")
        try:
            received = 0
            # 6 s, four send timeouts, a few KiB at a time: the kernel's send buffer
            # may not wake the server's writer for seconds, the client's acks do count.
            for _ in range(60):
                await asyncio.sleep(0.1)
                reader.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    received += len(reader.recv(256 * 1024))
            assert received >= PIECE and not app.closed.is_set()
            assert not closed_by_server(reader)
        finally:
            reader.close()

    await serving(ServerConfig(send_timeout=1.5), check)


async def test_connect_and_close_frees_the_descriptor_at_once() -> None:
    """Hypercorn's own server kept each one for the 75 s keep-alive timer."""
    async def check(host: str, port: int, app: BodyApp) -> None:
        await asyncio.sleep(0.1)
        baseline = open_fds(os.getpid())

        def storm() -> None:
            for _ in range(500):
                with socket.create_connection((host, port), timeout=10):
                    pass

        await asyncio.to_thread(storm)
        await until(lambda: open_fds(os.getpid()) <= baseline + 2, 20,
                    "every connection's descriptor to be closed")

    await serving(ServerConfig(), check)


async def test_at_the_cap_new_clients_wait_and_idle_ones_go() -> None:
    cap, hostile = 8, 30

    async def check(host: str, port: int, app: BodyApp) -> None:
        await asyncio.sleep(0.1)
        baseline = open_fds(os.getpid())
        held = [socket.create_connection((host, port), timeout=10) for _ in range(hostile)]
        try:
            peak = 0
            honest = asyncio.ensure_future(
                asyncio.to_thread(timed_get, f"http://{host}:{port}/v2/", 60))
            while not honest.done():
                peak = max(peak, open_fds(os.getpid()) - baseline - hostile)
                await asyncio.sleep(0.02)
            status, _ = await honest
            assert status == 200
            # Accepted at most the cap (+1: the honest client's own socket).
            assert peak <= cap + 1, peak
            await until(lambda: all(closed_by_server(s) for s in held), 60,
                        "idle connections to be closed under pressure")
        finally:
            for s in held:
                s.close()

    await serving(ServerConfig(max_connections=cap), check)


@pytest.mark.parametrize("sources", [1, 40])
async def test_a_pod_holding_connections_leaves_slots_for_the_node_and_other_queues(
        sources: int) -> None:
    """The accept rate bounds how fast a source queue opens connections, not how many it
    keeps: a pod holding unread responses (each kept for the send timeout) filled the
    whole cap from one source, and the node's own containerd (the reserved queue) and
    every other pod waited until the send timeout freed a slot. Pods in many queues
    (40 addresses) can fill the source queues' share, never the reserved one."""
    cap = 32
    app = BodyApp()
    host = loopback_host()
    own = own_addresses([host])
    listeners, unsteered = bind_listeners(host, 0, BACKLOG, own, SOURCE_BACKLOG)
    assert unsteered is None
    port = listeners.sockets[0].getsockname()[1]
    attackers = [loopback_host() for _ in range(sources)]
    neighbour = next(source for source in (loopback_host() for _ in range(100))
                     if source_queue(ipaddress.ip_address(source), own)
                     != source_queue(ipaddress.ip_address(attackers[0]), own))
    shutdown = asyncio.Event()
    task = asyncio.create_task(serve(app.app, listeners, shutdown,
                                     ServerConfig(max_connections=cap, send_timeout=120)))
    held: list[socket.socket] = []
    try:
        held += [unread_get(host, port, "/blob", source=attackers[n % sources])
                 for n in range(max(cap, 2 * sources))]
        await until(lambda: sum(answered(s) for s in held) >= 2, 10,
                    "the attacker's first responses to be held")
        await asyncio.sleep(0.5)
        for source in (host, "127.0.0.1", neighbour)[:3 if sources == 1 else 2]:
            status, _ = await asyncio.to_thread(get_from, source, host, port, "/v2/", 5)
            assert status == 200, source
        assert sum(answered(s) for s in held) < cap
    finally:
        for sock in held:
            sock.close()
        shutdown.set()
        await asyncio.wait_for(task, 20)


def test_the_cap_is_held_to_half_the_open_file_limit() -> None:
    assert connection_cap(4096, 1024) == 512
    assert connection_cap(100, 20_000) == 100
    assert connection_cap(4096) <= 4096


async def test_client_events_are_one_line_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = ServerMetrics(CollectorRegistry())
    summary = server_module._Summary("registry", metrics, interval=0.2)
    with caplog.at_level(logging.INFO, logger="meshmirror.registry.server"):
        for _ in range(10_000):
            summary.count("accept_failed", "EMFILE")
        await asyncio.sleep(0.5)
    records = [r for r in caplog.records if r.name == "meshmirror.registry.server"]
    assert len(records) == 1 and not records[0].exc_info
    assert records[0].fields["accept_failed_EMFILE"] == 10_000  # type: ignore[attr-defined]
    assert metrics.events.labels("registry", "accept_failed")._value.get() == 10_000


async def test_connections_waiting_for_a_head_are_counted_and_freed() -> None:
    """A connection with no whole request head yet has no transport or task (it waits on
    a reader callback), yet holds its slot, shows in the gauge, and is freed when its
    client goes; one that completes its head is then answered."""
    metrics = ServerMetrics(CollectorRegistry())

    def open_now() -> float:
        return next(sample.value for family in metrics.connections.collect()
                    for sample in family.samples if sample.labels == {"server": "registry"})

    app = BodyApp()
    host = loopback_host()
    sock = bind_listener(host, 0)
    port = sock.getsockname()[1]
    shutdown = asyncio.Event()
    task = asyncio.create_task(serve(app.app, sock, shutdown, ServerConfig(), metrics=metrics))
    try:
        silent = [socket.create_connection((host, port), timeout=10) for _ in range(3)]
        partial = socket.create_connection((host, port), timeout=10)
        partial.sendall(b"GET /v2/ HTTP/1.1\r\n")
        await until(lambda: open_now() == 4, 10, "four open connections")
        partial.sendall(f"Host: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.to_thread(partial.recv, 1 << 16)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        partial.close()
        for conn in silent:
            conn.close()
        await until(lambda: open_now() == 0, 10, "every connection to be freed")
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 15)


async def test_a_live_connection_closes_gracefully_after_its_answer() -> None:
    """Accepted connections inherit the listener's reset-at-close (cheap for a storm's dead
    ones); a live one must not keep it, or its close, with the end of the answer still
    in the send queue for a client that reads slowly, would throw that away."""
    size = 1024 * 1024

    async def check(host: str, port: int, app: BodyApp) -> None:
        def fetch() -> int:
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.settimeout(10)
            with conn:
                conn.connect((host, port))
                conn.sendall(f"GET /sized?size={size} HTTP/1.1\r\nHost: {host}\r\n"
                             "Connection: close\r\n\r\n".encode())
                received = b""
                while data := conn.recv(4096):
                    received += data
                return len(received.split(b"\r\n\r\n", 1)[1])

        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(fetch) == size

    await serving(ServerConfig(), check, sndbuf=64 * 1024)


@pytest.mark.parametrize("check", [
    test_a_response_nobody_reads_is_dropped_and_its_body_closed,
    test_a_closed_connection_with_unsent_bytes_does_not_linger,
    test_connect_and_close_frees_the_descriptor_at_once,
    test_at_the_cap_new_clients_wait_and_idle_ones_go,
    test_connections_waiting_for_a_head_are_counted_and_freed,
    test_a_live_connection_closes_gracefully_after_its_answer,
], ids=lambda check: check.__name__.removeprefix("test_"))
def test_the_bounds_hold_on_the_nodes_event_loop(
        check: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """The tests above run on pytest's asyncio loop; a node runs on uvloop
    (`meshmirror.eventloop`), whose readers, transports and sockets are its own."""
    eventloop.run(check())
