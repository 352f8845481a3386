"""More connections than the cap, held open by one client: the node accepts no more than
its cap, closes the idle ones early under pressure, serves honest requests once the
hostile ones idle out, and its metrics port answers throughout."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.hostile.clients import closed_by_server, open_fds, timed_get
from tests.support.metrics import read_metric
from tests.support.node import start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real, pytest.mark.slow]

CAP = 64
HOSTILE = 300
# Turnover is the 2 s idle grace per CAP connections: ~10 s for the hostile ones ahead
# of an honest request; the bound is a generous multiple of that.
HONEST_TIMEOUT_S = 90.0
STATUS_BOUND_S = 5.0


def test_connections_beyond_the_cap_wait_and_idle_ones_go(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    node = start_node(f"oci:{store}", tmp_path / "node.log",
                      ("--client-max-connections", str(CAP)))
    held: list[socket.socket] = []
    try:
        host, port = node.address.rsplit(":", 1)
        time.sleep(0.5)
        baseline = open_fds(node.proc.pid)
        for i in range(HOSTILE):
            conn = socket.create_connection((host, int(port)), timeout=10)
            if i % 2:  # half ask for something small, then hold the idle connection
                conn.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            held.append(conn)

        statuses: list[tuple[int, float]] = []
        watching = threading.Event()
        watching.set()

        def watch_status() -> None:
            while watching.is_set():
                statuses.append(timed_get(f"http://{node.metrics}/status", 30))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch_status)
        watcher.start()
        peak = 0
        sampling = threading.Event()
        sampling.set()

        def sample() -> None:
            nonlocal peak
            while sampling.is_set():
                peak = max(peak, open_fds(node.proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            honest = [timed_get(f"http://{node.address}/v2/", HONEST_TIMEOUT_S)
                      for _ in range(3)]
            wait_until(lambda: all(closed_by_server(s) for s in held), HONEST_TIMEOUT_S,
                       "the node to close every idle hostile connection")
        finally:
            sampling.clear()
            watching.clear()
            sampler.join(10)
            watcher.join(40)
        print(f"\ncap {CAP}: honest {[(s, round(t, 2)) for s, t in honest]}; fds peak "
              f"{peak} (baseline {baseline}); /status {len(statuses)} probes, worst "
              f"{max(t for _, t in statuses):.2f} s")
        assert [status for status, _ in honest] == [200] * 3
        assert read_metric(node.metrics, "meshmirror_http_connection_events_total",
                           event="at_cap", server="registry") >= 1
        # The cap, the honest client's connection, a metrics probe, a little slack.
        assert peak - baseline <= CAP + 4, peak - baseline
        assert statuses and all(status == 200 for status, _ in statuses)
        assert max(seconds for _, seconds in statuses) <= STATUS_BOUND_S
    finally:
        for conn in held:
            conn.close()
        stop(node.proc)
