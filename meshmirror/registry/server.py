"""Running an ASGI app under Hypercorn on a socket we bound ourselves.

Binding before Hypercorn starts gives a clear error ("address in use") at
start-up instead of a traceback from inside the server task, and lets the
caller know the real port when it asked for port 0. Hypercorn takes over the
socket's file descriptor (``fd://``), so exactly one object ever closes it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from starlette.types import ASGIApp

from meshmirror.addresses import bind_socket

# Go's net/http takes the kernel's somaxconn; Hypercorn's default of 100 would
# make a burst of 200 pulls wait a full SYN retransmit (1 s) for some of them.
_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class ServerOptions:
    graceful_timeout: float = 5.0
    keep_alive_timeout: float = 75.0  # longer than containerd's idle timeout, to reuse connections
    backlog: int = _BACKLOG


def bind_listener(host: str, port: int, backlog: int = _BACKLOG) -> socket.socket:
    """A listening TCP socket on host:port; OSError (e.g. address in use) if it cannot be.

    Port-only listens on IPv6 and IPv4 alike (`meshmirror.addresses.bind_socket`)."""
    sock = bind_socket(host, port)
    try:
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listener_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(app: ASGIApp, sock: socket.socket, shutdown: asyncio.Event,
                options: ServerOptions | None = None) -> None:
    """Serve until ``shutdown`` is set, then drain for at most ``graceful_timeout``.

    Takes ownership of ``sock``: it is closed when this returns, and must not
    be used by the caller afterwards.
    """
    options = options or ServerOptions()
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None  # the app logs each request itself, as JSON
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = options.graceful_timeout
    config.keep_alive_timeout = options.keep_alive_timeout
    config.backlog = options.backlog
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, mode="asgi")  # type: ignore[arg-type]
