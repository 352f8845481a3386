"""What the hostile tests' clients do, on plain sockets: the kernel's view, no HTTP library
that would read or retry on their behalf."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request

# A receive buffer this small (the kernel doubles it and enforces a minimum) makes the
# server's side fill at once, as a pod that stops reading would.
SMALL_RCVBUF = 4096


def unread_get(host: str, port: int, path: str, connection: str = "keep-alive", *,
               headers: dict[str, str] | None = None, source: str | None = None
               ) -> socket.socket:
    """A connection that sent ``GET path`` (with ``headers``, from address ``source``)
    and will never read the answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.settimeout(10)
    if source is not None:
        sock.bind((source, 0))
    sock.connect((host, port))
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n"
                 f"{extra}\r\n".encode())
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed or reset ``sock``: reads what it sent and finds
    the end. Never blocks (the socket is switched to non-blocking)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset by the server's abort
        return True


def timed_get(url: str, timeout: float) -> tuple[int, float]:
    """(status, seconds) of one GET on a new connection; status 0 if it failed."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            status = int(response.status)
    except urllib.error.HTTPError as err:
        status = err.code
    except OSError:
        status = 0
    return status, time.monotonic() - started


def open_fds(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return 0


def sha256_of_get(url: str, timeout: float) -> str:
    """The body's digest, or what went wrong (for the assertion's message)."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
    except (OSError, http.client.HTTPException) as err:
        return repr(err)
    return f"sha256:{digest.hexdigest()}"
