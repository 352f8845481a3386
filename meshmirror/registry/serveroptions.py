"""The bounds the registry port puts on its clients, importable without Hypercorn.

The registry port is published on every node and unauthenticated, so any pod is a
client, and some client may be hostile (docs/security.md). Each field bounds one
thing a client holds on the node: a connection, the memory and spool of a response
it does not read, a slot while idle. ``meshmirror run``'s ``--client-*`` flags set
them (``send_timeout`` is ``--client-send-timeout``); `meshmirror.runconfig` holds
them, and only `meshmirror.registry.server` needs Hypercorn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Go's net/http takes the kernel's somaxconn; Hypercorn's default of 100 would
# make a burst of 200 pulls wait a full SYN retransmit (1 s) for some of them.
BACKLOG = 4096

# A source queue may accept this many seconds' worth of `ServerConfig.accept_rate` at
# once. When a node's summary changes, every peer fetches it within the gossip's spread
# (about 2 s at 5,000 nodes, each fetch with a 2 s timeout): some 330 new connections
# per hashed queue, which must not wait for tokens. There is no rate shared by all
# queues: 15 queues at their rate are already a bound (3,000 a second, under a tenth
# of a core at 25 µs each), and a lower shared one would throttle those peers.
ACCEPT_BURST_S = 2.0

# A source queue's listen backlog at most: what waits there while its rate is used up.
# Each waiting connection is a socket in kernel memory, and a queue's rate drains this
# many in a few seconds; more waiting would only mean older connections.
SOURCE_BACKLOG = 512

# The ASGI zero-copy send extension: the server advertises it in the scope's
# ``extensions`` and the app then sends ``{"type": ZERO_COPY_SEND, "file": fd,
# "offset": n, "count": n, "more_body": False}`` for a body that is a span of a file.
ZERO_COPY_SEND: Final = "http.response.zerocopysend"


class SendAborted(OSError):
    """A zero-copy send ended short: the client went (or stopped reading) first. What
    ASGI asks of a server whose ``send`` is called on a closed connection (an OSError),
    with the bytes that did go out, for the access log."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"connection closed after {sent} bytes of a file")
        self.sent = sent


@dataclass(frozen=True, slots=True)
class ServerConfig:
    graceful_timeout: float = 5.0
    # Longer than containerd's idle timeout, to reuse connections; under pressure
    # (see `idle_timeout_under_pressure`) an idle connection goes much sooner.
    keep_alive_timeout: float = 75.0
    backlog: int = BACKLOG
    # A response whose bytes the client has not taken for this long is dropped: its
    # connection is aborted and the response's body closed, which frees the spool
    # file, the memory and the peer connection it held. Progress resets the clock,
    # so a slow honest client on a large blob is not cut off.
    send_timeout: float = 30.0
    # Open client connections at most; while at the cap the server stops accepting
    # (new connections wait in the listen backlog) instead of accepting and closing.
    # Also held to half the process's open-file limit, so the metrics port, peers
    # and blob files always find a descriptor.
    max_connections: int = 4096
    # Once three quarters of `max_connections` are open, a connection with no
    # request in progress (idle keep-alive, or connected and silent) is closed after
    # this long instead of `keep_alive_timeout`. An honest client sends its request
    # within milliseconds of connecting, and reconnects when an idle one is closed.
    idle_timeout_under_pressure: float = 2.0
    # New connections accepted per second from one source queue of the registry port
    # (`meshmirror.registry.steering`: sources other than the node's own addresses,
    # hashed into 15 queues), up to `ACCEPT_BURST_S` worth at once. containerd's pulls
    # open tens of connections and
    # keep them alive, a peer hop one per blob; a connect storm opens tens of
    # thousands a second, and beyond this rate its connections are dropped by the
    # kernel before the node sees them.
    accept_rate: float = 200.0
    # The node's own addresses beyond the ones its flags name (the registry's listen
    # host, the advertised host, loopback): connections from them get the registry
    # port's reserved accept queue, which has no rate. In Kubernetes, containerd dials
    # the node's IP and reaches the pod through the hostPort with the node's IP as its
    # source; the chart passes it (status.hostIP).
    own_addrs: tuple[str, ...] = ()
