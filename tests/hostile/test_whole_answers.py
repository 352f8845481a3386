"""Honest answers arrive whole however the client ends its side: the listener resets
connections at close (SO_LINGER 0, inherited by accepted sockets, so a storm's dead
connections cost no FIN exchange), and a live connection must have that switched off,
or the kernel would discard what it still has to send when the server closes.

Real node, raw sockets: a 24 MiB blob with ``Connection: close``, after a half-close, as
the last of pipelined requests, over HTTP/1.0; HEAD and error answers after a half-close.
Every answer is read to the end and must be whole: its Content-Length, then a clean end.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop

pytestmark = [pytest.mark.real]

LARGE = 24 * 1024 * 1024
# A small receive buffer keeps most of the answer in the server's queues when it closes.
RCVBUF = 64 * 1024


@dataclass
class Served:
    node: RunningNode
    large: str  # blob paths
    small: str
    digests: frozenset[str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("whole")
    image = build_image("example.com/whole/app:1", workdir / "store", (LARGE, 1000), seed=41)
    large, small = image.platforms[0].layers[:2]
    node = start_node(f"oci:{workdir / 'store'}", workdir / "node.log")
    try:
        yield Served(node, f"/v2/whole/app/blobs/{large.digest}?ns=example.com",
                     f"/v2/whole/app/blobs/{small.digest}?ns=example.com",
                     frozenset({str(large.digest), str(small.digest)}))
    finally:
        stop(node.proc)


def exchange(node: RunningNode, requests: bytes, *, half_close: bool) -> list[tuple[int, bytes]]:
    """Send ``requests``, read until the server ends the connection (which must be a
    clean end, not a reset), and split what came into (status, body) answers."""
    host, port = node.address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.settimeout(30)
        sock.connect((host, int(port)))
        sock.sendall(requests)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(1 << 20):  # a reset raises here
            received += chunk
    answers, methods = [], [line.split(b" ", 1)[0]
                            for line in requests.split(b"\r\n") if b" HTTP/1." in line]
    data = bytes(received)
    for method in methods:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = 0 if method == b"HEAD" else int(headers.get(b"content-length", b"0"))
        assert len(data) >= length, f"{lines[0]!r}: {len(data)} of {length} bytes arrived"
        answers.append((int(lines[0].split(b" ")[1]), data[:length]))
        data = data[length:]
    assert data == b"", "nothing after the last answer"
    return answers


def request(served: Served, path: str, method: str = "GET", *, close: bool = False,
            version: str = "1.1") -> bytes:
    host = served.node.address
    connection = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/{version}\r\nHost: {host}\r\n{connection}\r\n".encode()


def sha256(body: bytes) -> str:
    return f"sha256:{hashlib.sha256(body).hexdigest()}"


@pytest.mark.parametrize("ending", ["close", "half-close", "pipelined", "http/1.0"])
def test_a_large_answer_arrives_whole_however_the_client_ends(served: Served,
                                                               ending: str) -> None:
    if ending == "close":
        requests = request(served, served.large, close=True)
    elif ending == "http/1.0":
        requests = request(served, served.large, version="1.0")
    elif ending == "pipelined":
        requests = (request(served, served.small) + request(served, served.large)
                    + request(served, served.large, close=True))
    else:
        requests = request(served, served.large)
    answers = exchange(served.node, requests, half_close=ending == "half-close")
    assert [status for status, _ in answers] == [200] * len(answers)
    assert all(sha256(body) in served.digests for _, body in answers)


def test_heads_and_errors_arrive_whole_after_a_half_close(served: Served) -> None:
    missing = served.small.replace(served.small.split("/blobs/")[1].split("?")[0],
                                   "sha256:" + "0" * 64)
    requests = (request(served, served.large, "HEAD") + request(served, missing)
                + request(served, "/v2/", "DELETE") + request(served, served.large))
    answers = exchange(served.node, requests, half_close=True)
    assert [status for status, _ in answers] == [200, 404, 405, 200]
    assert b"BLOB_UNKNOWN" in answers[1][1]
    assert sha256(answers[3][1]) in served.digests
