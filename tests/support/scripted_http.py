"""Tiny HTTP servers that misbehave on purpose, for the upstream client's failure tests.

:class:`ScriptedHTTPServer` answers each request with whatever a function returns
(a 500, a garbage challenge, a token server's JSON) and records every request,
so a test can assert that a call never reached the server. :class:`Blackhole`
accepts TCP connections, holds them open without a byte in reply, and counts
them: the client's connect succeeds and only its answer timeout can end the
wait, and a test can tell when a client stopped trying. :class:`RawReplyServer`
answers with bytes that are not HTTP at all. They run on a thread, so the test's
event loop and a synchronous benchmark can share them.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs, urlsplit

from tests.support.ports import free_port, loopback_host


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # Content-Length to announce when it should differ from len(body) (a HEAD of a manifest).
    length: int | None = None


Responder = Callable[[Request], Reply]


@dataclass
class _Log:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[Request] = field(default_factory=list)


def _handler(respond: Responder, log: _Log) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a registry's clients expect
        # Headers and body leave in one segment: written apart, Nagle and the peer's
        # delayed ACK add ~40 ms to every answer on loopback.
        disable_nagle_algorithm = True
        wbufsize = 64 * 1024

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = Request(self.command, parts.path, parse_qs(parts.query),
                              {k.lower(): v for k, v in self.headers.items()}, body)
            with log.lock:
                log.requests.append(request)
            try:
                reply = respond(request)
            except Exception as err:  # a broken script answers 599 rather than hanging
                reply = Reply(599, body=repr(err).encode())
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Length",
                             str(reply.length if reply.length is not None else len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)

        do_GET = do_HEAD = do_POST = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class LocalHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that never asks DNS for its own name.

    The standard ``server_bind`` calls ``socket.getfqdn`` on the bound address,
    a reverse lookup that goes to the machine's resolver: off the machine, for
    an answer nothing here uses.
    """

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class ScriptedHTTPServer:
    """``with ScriptedHTTPServer(respond) as server:`` answers on ``server.url`` meanwhile."""

    def __init__(self, respond: Responder, host: str | None = None,
                 port: int | None = None, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: a server context; the server then speaks HTTPS on ``url``."""
        self.host = host or loopback_host()
        self.port = port or free_port(self.host)
        self._log = _Log()
        self._server = LocalHTTPServer((self.host, self.port), _handler(respond, self._log))
        self._server.daemon_threads = True
        self._scheme = "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        # Keep-alive handler threads wait for the client's next request; don't join them.
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self.host}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        with self._log.lock:
            return list(self._log.requests)

    def start(self) -> ScriptedHTTPServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> ScriptedHTTPServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _AcceptLoop:
    """A listening socket on loopback and a thread that accepts on it until closed.

    A subclass says what a connection gets (`_take`) and what to do while none
    arrives (`_idle`); the accept times out every 50 ms so `close` is prompt.
    """

    def __init__(self, host: str | None, backlog: int) -> None:
        self.host = host or loopback_host()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((self.host, 0))
        self._sock.listen(backlog)
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                self._idle()
                continue
            self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _idle(self) -> None:
        pass

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Blackhole(_AcceptLoop):
    """Accepts every connection, reads and discards what arrives, never answers; counts them.

    Connects succeed and no byte ever comes back. It keeps accepting (a socket
    that never accepts has a backlog that fills), so ``accepted`` is every
    connection a client opened, however many there were.
    """

    def __init__(self, host: str | None = None) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._held: list[socket.socket] = []
        super().__init__(host, backlog=64)

    def _take(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with self._lock:
            self._accepted += 1
            self._held.append(conn)
        self._drain()

    def _idle(self) -> None:
        self._drain()

    def _drain(self) -> None:
        """Read what clients sent (a full receive buffer would stall their writes) and
        drop the connections they closed."""
        with self._lock:
            open_: list[socket.socket] = []
            for conn in self._held:
                try:
                    closed = conn.recv(65536) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    conn.close()
                else:
                    open_.append(conn)
            self._held = open_

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._accepted

    def close(self) -> None:
        super().close()
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held = []


class RawReplyServer(_AcceptLoop):
    """Answers every connection with fixed bytes, then closes it: a server that is not HTTP."""

    def __init__(self, data: bytes, host: str | None = None) -> None:
        self.data = data
        super().__init__(host, backlog=16)

    def _take(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            try:
                conn.recv(65536)
                conn.sendall(self.data)
            except OSError:
                pass


def refused_url(host: str | None = None) -> str:
    """An http URL on which nothing listens: connecting is refused at once."""
    host = host or loopback_host()
    return f"http://{host}:{free_port(host)}"
