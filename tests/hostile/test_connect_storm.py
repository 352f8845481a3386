"""20,000 connect+close cycles: the registry port and the metrics port keep answering,
and the log does not fill with a traceback per connection (issue 23, finding 3).

Hypercorn's own server kept each connection's descriptor for its 75 s keep-alive
timer, so a storm like this one took the node to its open-file limit: for a minute
nothing answered and the log grew by 168 MB of tracebacks.

With a byte sent before each close, the node reads it at accept and finds the end
there too, so that storm is as cheap as the silent one. The 2 s bound on honest
latency is a timing: benchmarks/bench_hostile.py measures it; here every honest
request must be answered.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.hostile.clients import open_fds, timed_get
from tests.support.node import start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real, pytest.mark.slow]

CYCLES = 20_000
ATTACKERS = 4
LOG_BOUND = 1_000_000
PROBE_TIMEOUT_S = 60.0


@pytest.mark.parametrize("payload", [b"", b"G"], ids=["silent", "one-byte"])
def test_connect_close_storm_leaves_both_ports_answering(payload: bytes,
                                                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    log = tmp_path / "node.log"
    node = start_node(f"oci:{store}", log)
    try:
        host, port = node.address.rsplit(":", 1)
        baseline_fds = open_fds(node.proc.pid)
        log_before = log.stat().st_size
        storming = threading.Event()
        storming.set()
        done = [0] * ATTACKERS
        failed = [0] * ATTACKERS

        def attack(index: int) -> None:
            for _ in range(CYCLES // ATTACKERS):
                try:
                    with socket.create_connection((host, int(port)), timeout=10) as conn:
                        conn.sendall(payload)
                except OSError:
                    failed[index] += 1
                done[index] += 1

        probes: dict[str, list[tuple[int, float]]] = {"v2": [], "status": []}

        def probe(name: str, url: str) -> None:
            while storming.is_set():
                probes[name].append(timed_get(url, PROBE_TIMEOUT_S))
                time.sleep(0.1)

        probers = [threading.Thread(target=probe, args=("v2", f"http://{node.address}/v2/")),
                   threading.Thread(target=probe,
                                    args=("status", f"http://{node.metrics}/status"))]
        attackers = [threading.Thread(target=attack, args=(i,)) for i in range(ATTACKERS)]
        started = time.monotonic()
        for thread in probers + attackers:
            thread.start()
        peak_fds = 0
        while any(t.is_alive() for t in attackers) and time.monotonic() - started < 240:
            peak_fds = max(peak_fds, open_fds(node.proc.pid))
            time.sleep(0.05)
        took = time.monotonic() - started
        time.sleep(1)  # a probe or two after the storm
        storming.clear()
        for thread in probers + attackers:
            thread.join(30)
        wait_until(lambda: open_fds(node.proc.pid) <= baseline_fds + 2, 30,
                   "the storm's descriptors to be closed")
        grown = log.stat().st_size - log_before
        worst = {name: max(seconds for _, seconds in results)
                 for name, results in probes.items()}
        print(f"\nstorm: {sum(done)} cycles ({sum(failed)} failed) in {took:.1f} s; "
              f"peak fds {peak_fds} (baseline {baseline_fds}); probes "
              + ", ".join(f"{name} {len(probes[name])} worst {worst[name]:.2f} s"
                          for name in probes) + f"; log +{grown} bytes")
        assert sum(done) == CYCLES
        for name, results in probes.items():
            assert results and all(status == 200 for status, _ in results), (name, results)
        assert grown < LOG_BOUND
    finally:
        stop(node.proc)
