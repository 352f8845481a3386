"""What the hostile tests' clients do, on plain sockets: the kernel's view, no HTTP library
that would read or retry on their behalf."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import selectors
import socket
import struct
import time
import urllib.error
import urllib.request

# A storm's connects outstanding at once, and how long each may take: the kernel's first
# SYN retransmit is at 1 s, so a connect dropped at SYN time is given up before it.
STORM_IN_FLIGHT = 256
STORM_CONNECT_S = 0.9
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# struct tcp_info: tcpi_total_retrans, a u32 after 8 bytes and 23 u32 fields.
_TOTAL_RETRANS = struct.Struct("I")
_TOTAL_RETRANS_OFFSET = 8 + 23 * 4

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


def storm(host: str, port: int, payload: bytes, cycles: int, source: str,
          limit_s: float) -> int:
    """``cycles`` connect+close cycles from address ``source`` (``payload`` sent before
    each close), as a storm tool would: non-blocking, `STORM_IN_FLIGHT` connects
    outstanding, so a connect the kernel dropped at SYN time does not hold up the next;
    each is given `STORM_CONNECT_S`, and the whole ends after ``limit_s``. Returns the
    connects that completed: what reached the node's accept queues."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}
    started = time.monotonic()
    opened = done = 0

    def finish(sock: socket.socket) -> None:
        nonlocal done
        done += 1
        with contextlib.suppress(OSError):
            if payload:
                sock.send(payload)
        sock.close()

    try:
        while (opened < cycles or pending) and time.monotonic() - started < limit_s:
            while opened < cycles and len(pending) < STORM_IN_FLIGHT:
                sock = socket.socket()
                sock.setblocking(False)
                # The port is picked at connect, by the whole address pair: one source
                # address would run out of ports at bind within a storm's count.
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
                opened += 1
                try:
                    sock.connect((host, port))
                except BlockingIOError:
                    pending[sock] = time.monotonic()
                    sel.register(sock, selectors.EVENT_WRITE, sock)
                    continue
                except OSError:
                    sock.close()
                    continue
                finish(sock)
            for key, _ in sel.select(0.05):
                sock = key.data
                sel.unregister(sock)
                del pending[sock]
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    finish(sock)
                else:
                    sock.close()
            now = time.monotonic()
            for sock in [s for s, since in pending.items() if now - since > STORM_CONNECT_S]:
                sel.unregister(sock)
                del pending[sock]
                sock.close()
    finally:
        for sock in pending:
            sock.close()
        sel.close()
    return done


def get_from(source: str, host: str, port: int, path: str,
             timeout: float = 30) -> tuple[int, int]:
    """(status, retransmits) of one GET on a new connection from address ``source``;
    status 0 if it failed. Retransmits are the connection's whole count (TCP_INFO),
    taken once connected: nonzero when the kernel dropped its SYN, as it does for a
    source queue whose backlog is full."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect((host, port))
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        retransmits = _TOTAL_RETRANS.unpack_from(info, _TOTAL_RETRANS_OFFSET)[0]
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                     "\r\n".encode())
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        return status, retransmits
    except OSError:
        return 0, 0
    finally:
        sock.close()
