"""One bad peer must never hurt: hostile streams and packets against real ``meshmirror run`` nodes.

Three nodes on their own loopback addresses, default flags (so tcp_timeout is
memberlist's 10 s). The attacker is a raw socket in this process: a push-pull
stream dripped at 0.5 MB/s, and a spoofed alive message whose node name is not
UTF-8. The nodes' own /metrics and /status are the evidence.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from meshmirror.mesh.config import MeshConfig
from tests.mesh.net.attack import (
    Dripper,
    Pinger,
    alive_packet,
    host_port,
    lag_samples_over,
    push_pull_header,
    slow_push_pull,
    start_cluster,
    status,
    total,
)
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode
from tests.support.processes import stop

pytestmark = [pytest.mark.slow]

TCP_TIMEOUT = MeshConfig().tcp_timeout
RATE = 500_000  # bytes per second
NAMES = {"n0", "n1", "n2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningNode]]:
    nodes = start_cluster(tmp_path_factory.mktemp("hostile"))
    try:
        yield nodes
    finally:
        for node in nodes:
            stop(node.proc)


class Watcher(threading.Thread):
    """Polls every node's /status and remembers any member seen in a state other than alive."""

    def __init__(self, nodes: list[RunningNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.not_alive: list[tuple[str, str, str]] = []
        self.polls = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.25):
            for node in self.nodes:
                mesh = status(node)["mesh"]
                assert isinstance(mesh, dict)
                for m in mesh["members"]:
                    if m["state"] != "alive":
                        self.not_alive.append((mesh["node"], m["name"], m["state"]))
            self.polls += 1

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def test_slow_push_pull_streams_cost_the_loop_nothing(cluster: list[RunningNode]) -> None:
    target = cluster[0]
    addr = host_port(target.mesh)
    before = [scrape(n.metrics) for n in cluster]
    watcher, pinger = Watcher(cluster), Pinger(addr)
    watcher.start()
    pinger.start()
    # One stream claims a million node states: refused as soon as the header is read.
    _, ghosts = slow_push_pull(2000, 0, 200_000)
    million = Dripper(addr, push_pull_header(1_000_000), ghosts, rate=RATE, seconds=5)
    # One stays within every limit but never finishes: parsed as it drips, dropped at the deadline.
    head, body = slow_push_pull(8192, 4_000_000, int(RATE * TCP_TIMEOUT))
    endless = Dripper(addr, head, body, rate=RATE, seconds=TCP_TIMEOUT - 0.5, linger=3.0)
    million.start()
    endless.start()
    million.join(20)
    endless.join(TCP_TIMEOUT + 10)
    time.sleep(0.5)
    pinger.stop()
    watcher.stop()
    after = [scrape(n.metrics) for n in cluster]

    print(f"loop lag samples over 0.1 s: {lag_samples_over(after[0], 0.1):.0f}; "
          f"pings {pinger.summary()}; stream closed after {million.closed_after} s "
          f"and {endless.closed_after} s, {endless.sent} bytes dripped")
    assert million.closed_after is not None and million.closed_after < 2.0
    assert b"too_many_nodes" in million.reply
    assert endless.sent > 4_000_000, "the drip did not keep going until the deadline"
    assert endless.closed_after is not None
    assert TCP_TIMEOUT - 1 <= endless.closed_after <= TCP_TIMEOUT + 2
    dropped = {reason: metric(after[0], "meshmirror_mesh_dropped_packets_total", reason=reason)
               - metric(before[0], "meshmirror_mesh_dropped_packets_total", reason=reason)
               for reason in ("too_many_nodes", "timeout")}
    assert set(dropped.values()) == {1}, dropped
    # The mesh did not notice: nobody suspected, every member alive throughout.
    assert watcher.polls > 10
    assert not watcher.not_alive, watcher.not_alive[:5]
    suspicions = [total(a, "meshmirror_mesh_suspicions") - total(b, "meshmirror_mesh_suspicions")
                  for a, b in zip(after, before, strict=True)]
    assert suspicions == [0, 0, 0]
    # And the attacked node's loop stayed on time: the unbounded parser lagged it by
    # seconds; the bound leaves room for a machine shared with other work.
    assert lag_samples_over(after[0], 0.25) - lag_samples_over(before[0], 0.25) == 0
    ping = pinger.summary()
    assert ping["answered"] >= 0.98 * ping["sent"], ping
    assert ping["p99_ms"] < 250, ping


def test_a_spoofed_name_that_is_not_utf8_never_reaches_the_status_page(
        cluster: list[RunningNode]) -> None:
    target = cluster[1]
    host, port = host_port(target.mesh)
    before = scrape(target.metrics)
    bad_names = [b"evil-\xff\xfe", b"caf\xe9", b"\xed\xa0\x80-surrogate", b"x" * 600]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        for i, name in enumerate(bad_names):
            addr = socket.inet_aton(f"127.0.0.{200 + i}")
            sock.sendto(alive_packet(name, addr, 7946, incarnation=5), (host, port))
    deadline = time.monotonic() + 5
    dropped = "meshmirror_mesh_dropped_packets_total"
    while (metric(scrape(target.metrics), dropped, reason="bad_name")
           - metric(before, dropped, reason="bad_name")) < len(bad_names):
        assert time.monotonic() < deadline, "the spoofed packets were not counted as bad_name"
        time.sleep(0.1)
    # Gossip would have spread a poisoned name within a second or two: give it that long.
    time.sleep(2)
    for node in cluster:
        for path in ("/status", "/"):
            with urllib.request.urlopen(f"http://{node.metrics}{path}", timeout=5) as r:
                assert r.status == 200
                body = r.read()
        page = json.loads(urllib.request.urlopen(
            f"http://{node.metrics}/status", timeout=5).read().decode("utf-8"))
        names = {m["name"] for m in page["mesh"]["members"]}
        assert names == NAMES, names
    assert body.startswith(b"<!doctype html>")

