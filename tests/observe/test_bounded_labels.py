"""Client input never becomes metric labels or state that grows: a real node, 12,000
requests naming 10,000 registries and 2,000 methods.

A ``meshmirror run`` node on loopback mirrors one registry (``--mirrored-registries``).
A client sends 10,000 requests, each naming a different registry in ``?ns=`` (manifest
and blob requests in turn), and 2,000 requests with distinct 200-character method
names. The number of series on ``/metrics`` must not change, and the node's resident
memory (``VmRSS``) must end within 8 MiB of where it was after a short warm-up that
sends each request shape once, so every lazily created series and buffer exists.
"""

from __future__ import annotations

import http.client
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshmirror.oci.digest import Digest
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop

pytestmark = [pytest.mark.real]

HOSTS = 10_000
METHODS = 2_000
METHOD_LENGTH = 200
WORKERS = 4
RSS_SLACK = 8 * 1024 * 1024
MIRRORED = "127.0.0.1:5000"
BLOB = str(Digest.of(b"nobody holds this"))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    (tmp_path / "store").mkdir()
    running = start_node(f"oci:{tmp_path / 'store'}", tmp_path / "node.log",
                         ("--mirrored-registries", MIRRORED, "--log-level", "warning"))
    try:
        yield running
    finally:
        stop(running.proc)


def _series(node: RunningNode) -> int:
    with urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=10) as r:
        return sum(1 for line in r.read().decode().splitlines()
                   if line and not line.startswith("#"))


def _rss(node: RunningNode) -> int:
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _ns_request(i: int) -> tuple[str, str]:
    kind = f"blobs/{BLOB}" if i % 2 else "manifests/1"
    return "GET", f"/v2/app/{kind}?ns=h{i}.example.invalid"


def _method_request(i: int) -> tuple[str, str]:
    return f"M{i:0>{METHOD_LENGTH - 1}}", "/v2/app/manifests/1"


def _send_all(node: RunningNode, make: Callable[[int], tuple[str, str]], count: int,
              statuses: dict[int, int]) -> None:
    """``count`` requests over `WORKERS` keep-alive connections; tallies their statuses."""
    host, port = node.address.rsplit(":", 1)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            for i in range(worker, count, WORKERS):
                method, path = make(i)
                conn.request(method, path)
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
        except BaseException as err:
            errors.append(err)
        finally:
            conn.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "requests did not finish in 120 s"
    assert not errors, errors


def test_distinct_registries_and_methods_add_no_series_and_no_memory(
        node: RunningNode) -> None:
    warmup: dict[int, int] = {}
    _send_all(node, lambda i: _ns_request(HOSTS + i), 200, warmup)
    _send_all(node, lambda i: _method_request(METHODS + i), 200, warmup)
    series, rss = _series(node), _rss(node)

    statuses: dict[int, int] = {}
    _send_all(node, _ns_request, HOSTS, statuses)
    _send_all(node, _method_request, METHODS, statuses)

    after_series, after_rss = _series(node), _rss(node)
    print(f"\nseries {series} -> {after_series}; VmRSS {rss / 2**20:.1f} -> "
          f"{after_rss / 2**20:.1f} MiB; statuses {statuses}")
    assert statuses == {404: HOSTS, 405: METHODS}
    assert after_series == series
    assert after_rss - rss <= RSS_SLACK
