"""A rogue mesh member: a real `python -m meshmirror.mesh` process advertising an
HTTP server of the test's own that serves a lying summary and misbehaves on blobs.

The HTTP side runs on threads in the test process, so the test can count what
the rogue was asked and how many of its connections are still open.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import select
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from meshmirror.routing.bloom import BloomFilter
from meshmirror.routing.summary import MEDIA_TYPE, Summary
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop

KINDS = ("hang", "drip", "slow404", "instant404")
# Rogues that hold the blob's real bytes (``blob``) and misframe them: the first half then
# a close, or a reset; the whole blob and 1 MiB more on a kept-alive connection; the right
# length of random bytes; the blob chunked, with no Content-Length; gzip-compressed with
# its compressed length; random bytes announced as 64 GiB, more than any cache holds.
BODY_KINDS = ("short", "reset", "long", "garbage", "chunked", "gzip", "huge")


def all_ones_summary(epoch: int) -> Summary:
    """A summary whose filter claims every key there is."""
    shape = BloomFilter.build(["x"], capacity=10_000)
    return Summary(epoch=epoch, k=shape.k, m=shape.m, count=10_000, born_at_ms=0,
                   bits=b"\xff" * (shape.m // 8))


def claiming_summary(keys: list[str], epoch: int) -> Summary:
    """A plausible summary that claims exactly ``keys``: the router will ask for them."""
    bloom = BloomFilter.build(keys)
    return Summary(epoch=epoch, k=bloom.k, m=bloom.m, count=len(keys), born_at_ms=0,
                   bits=bloom.bits.tobytes())


@dataclass
class RogueState:
    kind: str
    summary: Summary
    size: int  # the Content-Length it announces for any blob
    blob: bytes = b""  # the bytes a `BODY_KINDS` rogue starts from
    gzipped: bytes = b""  # ``blob`` compressed, made up front: headers must come at once
    blob_requests: int = 0
    open_connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


def _client_gone(conn: socket.socket, wait: float) -> bool:
    """True once the client closed its end (readable with nothing to read)."""
    readable, _, _ = select.select([conn], [], [], wait)
    if not readable:
        return False
    try:
        return conn.recv(65536, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _handler(state: RogueState) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            with state.lock:
                state.open_connections += 1
            try:
                self._serve(conn)
            except OSError:
                pass
            finally:
                with state.lock:
                    state.open_connections -= 1

        def _serve(self, conn: socket.socket) -> None:
            conn.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if target.startswith("/_mesh/v1/summary"):
                body = state.summary.encode()
                conn.sendall(
                    f"HTTP/1.1 200 OK\r\nContent-Type: {MEDIA_TYPE}\r\n"
                    f'ETag: "{state.summary.epoch}"\r\nContent-Length: {len(body)}\r\n'
                    "Connection: close\r\n\r\n".encode() + body)
                return
            with state.lock:
                state.blob_requests += 1
            if state.kind in ("slow404", "instant404"):
                if state.kind == "slow404":
                    time.sleep(0.045)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return
            digest = target.split("/blobs/", 1)[-1].split("?", 1)[0]
            if state.kind in BODY_KINDS:
                if "/blobs/" in target:
                    _misframe(conn, state, method, digest, head)
                else:  # it claims blobs only: a tag or manifest is not its to answer
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                return
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {state.size}\r\n"
                         f"Docker-Content-Digest: {digest}\r\n"
                         "Content-Type: application/octet-stream\r\n\r\n".encode())
            if method == "HEAD":
                return
            if state.kind == "hang":
                conn.sendall(bytes(64))  # a few wrong bytes, then nothing
                while not state.stopping.is_set() and not _client_gone(conn, 0.1):
                    pass
                return
            # drip: one wrong byte every two seconds, for as long as anyone listens
            sent = 0
            while sent < state.size and not state.stopping.is_set():
                conn.sendall(b"\0")
                sent += 1
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    if _client_gone(conn, 0.1) or state.stopping.is_set():
                        return

    return Handler


def _misframe(conn: socket.socket, state: RogueState, method: str, digest: str,
              head: bytes) -> None:
    """Answer as a `BODY_KINDS` rogue, honouring an open-ended Range as peers ask it."""
    match = None if state.kind == "gzip" else re.search(rb"(?i)\r\nrange: bytes=(\d+)-\r\n", head)
    start = int(match.group(1)) if match else 0
    body = state.gzipped if state.kind == "gzip" else state.blob[start:]
    status = "206 Partial Content" if match else "200 OK"
    framing = (f"Content-Range: bytes {start}-{len(state.blob) - 1}/{len(state.blob)}\r\n"
               if match else "")
    if state.kind == "chunked":
        framing += "Transfer-Encoding: chunked\r\n"
    elif state.kind == "huge":
        framing += f"Content-Length: {64 << 30}\r\n"
    elif state.kind == "gzip":
        framing += f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n"
    else:
        framing += f"Content-Length: {len(body)}\r\n"
    conn.sendall(f"HTTP/1.1 {status}\r\nDocker-Content-Digest: {digest}\r\n{framing}\r\n"
                 .encode())
    if method == "HEAD":
        return
    if state.kind in ("short", "reset"):
        conn.sendall(body[:len(body) // 2])
        if state.kind == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif state.kind == "long":
        conn.sendall(body + os.urandom(1 << 20))
        _client_gone(conn, 5.0)
    elif state.kind == "garbage":
        conn.sendall(os.urandom(len(body)))
    elif state.kind == "huge":
        junk = os.urandom(1 << 20)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not state.stopping.is_set():
            conn.sendall(junk)
    elif state.kind == "chunked":
        for at in range(0, len(body), 1 << 20):
            piece = body[at:at + (1 << 20)]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.sendall(b"0\r\n\r\n")
    else:
        conn.sendall(body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class Rogue:
    """``with Rogue(kind, summary, size, join=mesh_addr, log=path) as rogue:``"""

    def __init__(self, kind: str, summary: Summary, size: int, *, join: str, log: Path,
                 name: str, key_file: Path | None = None, blob: bytes = b"") -> None:
        self.state = RogueState(kind, summary, size, blob,
                                gzip.compress(blob, 1) if kind == "gzip" else b"")
        self.host = loopback_host()
        self.name = name
        self._server = _Server((self.host, free_port(self.host)), _handler(self.state))
        self.url = f"http://{self.host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._join = join
        self._log = log
        # A sick member of an encrypted mesh holds its key like any other member.
        self._key_args = ("--gossip-key-file", str(key_file)) if key_file else ()
        self._mesh: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Rogue:
        self._thread.start()
        mesh = f"{self.host}:{free_port(self.host)}"
        self._mesh = spawn([sys.executable, "-m", "meshmirror.mesh", "--bind", mesh,
                            "--name", self.name, "--join", self._join,
                            "--tag", f"http={self.url}",
                            "--tag", f"epoch={self.state.summary.epoch}",
                            "--tag", f"keys={self.state.summary.count}",
                            *self._key_args], self._log)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.state.stopping.set()
        if self._mesh is not None:
            stop(self._mesh)
        self._server.shutdown()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._server.server_close()
