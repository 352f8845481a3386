"""Request heads as the registry port's HTTP parser (h11) reads them, from a plain socket:
a connection waits outside the protocol only until its head is whole, and a head ended
with bare line feeds (which h11 accepts: printf piped to netcat, hand-written clients)
is whole too. Otherwise such a client waited the whole keep-alive timeout for nothing,
and one that half-closed after its request was reset instead of answered. A client that
half-closes after its requests is answered and let go at once, not held for the
keep-alive timer."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.metrics import read_metric
from tests.support.node import start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real]

# Far below the 75 s keep-alive timeout a head that is never seen whole waits for.
ANSWER_TIMEOUT_S = 10.0


def _answer(host: str, port: int, head: bytes, half_close: bool) -> bytes:
    with socket.create_connection((host, port), timeout=ANSWER_TIMEOUT_S) as sock:
        sock.sendall(head)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        try:
            return sock.recv(64)
        except OSError as err:
            return repr(err).encode()


@pytest.mark.parametrize("half_close", [False, True], ids=["open", "half-closed"])
def test_a_head_ended_with_bare_line_feeds_is_answered(half_close: bool,
                                                       tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    node = start_node(f"oci:{store}", tmp_path / "node.log")
    try:
        host, port = node.address.rsplit(":", 1)
        for head in (b"GET /v2/ HTTP/1.0\n\n", b"GET /v2/ HTTP/1.1\nHost: x\n\n",
                     b"GET /v2/ HTTP/1.1\r\nHost: x\n\r\n",
                     b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"):
            answer = _answer(host, int(port), head, half_close)
            assert answer.startswith(b"HTTP/1.1 200"), (head, answer)
    finally:
        stop(node.proc)


# Well below the 75 s keep-alive timer a connection whose client has gone must not wait.
CLOSE_BOUND_S = 15.0


@pytest.mark.parametrize("requests", [1, 2], ids=["one", "pipelined"])
def test_a_client_that_half_closes_after_its_requests_is_answered_and_let_go(
        requests: int, tmp_path: Path) -> None:
    """The client's end can reach the node with its request (even in the same read), so
    the request is still in progress when the node sees it: the connection must close
    once the answer is out rather than start the keep-alive timer for nobody."""
    store = tmp_path / "store"
    store.mkdir()
    node = start_node(f"oci:{store}", tmp_path / "node.log")
    socks: list[socket.socket] = []
    try:
        host, port = node.address.rsplit(":", 1)
        for _ in range(5):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
            sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
        answers = [b""] * len(socks)

        def all_closed() -> bool:
            done = True
            for i, sock in enumerate(socks):
                sock.setblocking(False)
                try:
                    while data := sock.recv(1 << 16):
                        answers[i] += data
                    continue  # the end: the node closed it
                except BlockingIOError:
                    done = False
                except OSError:
                    continue
            return done

        wait_until(all_closed, CLOSE_BOUND_S, "the node to close every half-closed connection")
        assert [a.count(b"HTTP/1.1 200") for a in answers] == [requests] * len(socks), answers
        wait_until(lambda: read_metric(node.metrics, "meshmirror_http_connections",
                                       server="registry") == 0, CLOSE_BOUND_S,
                   "the open-connections gauge to reach 0")
    finally:
        for sock in socks:
            sock.close()
        stop(node.proc)
