"""Free ports and per-node loopback addresses, so parallel tests never collide."""

from __future__ import annotations

import itertools
import os
import socket
import threading

_lock = threading.Lock()
# Start past .1 so the machine's own services on 127.0.0.1 are never in the way;
# offset by pid so two pytest processes pick different hosts.
_counter = itertools.count(2 + (os.getpid() % 50) * 4)


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP on ``host`` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found")


def loopback_host() -> str:
    """A fresh 127.0.x.y address for one test node."""
    with _lock:
        n = next(_counter) % (250 * 250)
    return f"127.0.{1 + n // 250}.{2 + n % 250}"


def free_dual_stack_port() -> int:
    """A port free for TCP and UDP on every address of both families (a port-only bind)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found")
