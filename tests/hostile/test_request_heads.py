"""Request heads as the registry port's HTTP parser (h11) reads them, from a plain socket:
a connection waits outside the protocol only until its head is whole, and a head ended
with bare line feeds (which h11 accepts: printf piped to netcat, hand-written clients)
is whole too. Otherwise such a client waited the whole keep-alive timeout for nothing,
and one that half-closed after its request was reset instead of answered."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.node import start_node
from tests.support.processes import stop

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
