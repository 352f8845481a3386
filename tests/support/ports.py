"""Free ports and per-node loopback addresses, so parallel tests never collide."""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading

_lock = threading.Lock()
# Start past .1 so the machine's own services on 127.0.0.1 are never in the way;
# offset by pid so two pytest processes pick different hosts.
_counter = itertools.count(2 + (os.getpid() % 50) * 4)


def _ephemeral_range() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


# Ports handed out lie below the kernel's ephemeral range: a node binds its outgoing
# connections to its own address (peers check where a request comes from), so a port
# from that range can be taken by the node's own connect before it listens on it.
_EPHEMERAL = _ephemeral_range()
_random = random.Random(os.getpid())


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free for both TCP and UDP on ``host`` right now, outside the
    ephemeral range."""
    for _ in range(200):
        with _lock:
            port = _random.randrange(10000, 65536)
        if port in _EPHEMERAL:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind((host, port))
                udp.bind((host, port))
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
