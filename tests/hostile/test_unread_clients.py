"""200 clients that never read, on blobs above and below the in-memory bound, served
through a peer: the node drops them when the send timeout fires, releases their spool
files and memory, and an honest 64 MiB pull goes through meanwhile (issue 23, finding 1).

Real processes on loopback: a holder node with the layers, and the node under test,
empty, joined to it, with a short ``--client-send-timeout``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from meshmirror.mirror.options import MirrorConfig
from meshmirror.oci.imagebuilder import build_image
from tests.hostile.clients import closed_by_server, sha256_of_get, timed_get, unread_get
from tests.support.metrics import read_metric
from tests.support.node import start_node
from tests.support.processes import proc_status, stop, wait_until

pytestmark = [pytest.mark.real, pytest.mark.slow]

MiB = 1024 * 1024
IN_MEMORY_BOUND = MirrorConfig().verify_before_send_limit
SMALL, LARGE, HONEST = IN_MEMORY_BOUND - 2 * MiB, IN_MEMORY_BOUND + MiB, 64 * MiB
HOSTILE = 200
# Short, to keep the test short, but not so short that the honest client, descheduled
# on a loaded machine, stops reading for that long.
SEND_TIMEOUT_S = 10
RSS_GROWTH = 96 * MiB


@pytest.mark.parametrize("bait", ["spooled", "in-memory"])
def test_clients_that_never_read_are_dropped_and_release_what_they_held(
        bait: str, tmp_path: Path) -> None:
    seeded, empty, spool = tmp_path / "seeded", tmp_path / "empty", tmp_path / "spool"
    for directory in (seeded, empty, spool):
        directory.mkdir()
    image = build_image("docker.io/library/bait:1", seeded, [SMALL, LARGE, HONEST], seed=5)
    small, large, honest = image.platforms[0].layers
    holder = start_node(f"oci:{seeded}", tmp_path / "holder.log", ("--node-name", "holder"))
    node = None
    hostile: list[socket.socket] = []
    try:
        node = start_node(f"oci:{empty}", tmp_path / "node.log",
                          ("--node-name", "node", "--join", holder.mesh,
                           "--mirror-spool-dir", str(spool),
                           "--client-send-timeout", f"{SEND_TIMEOUT_S}s"))
        host, port = node.address.rsplit(":", 1)

        def path(layer_digest: object) -> str:
            return f"/v2/library/bait/blobs/{layer_digest}?ns=docker.io"

        def routed() -> bool:
            for layer in (small, large, honest):
                request = urllib.request.Request(f"http://{node.address}{path(layer.digest)}",
                                                 method="HEAD")
                with urllib.request.urlopen(request, timeout=30) as r:
                    if r.status != 200:
                        return False
            return True

        wait_until(routed, 60, "the node to find the layers through the holder")
        time.sleep(1)
        idle = proc_status(node.proc.pid)["VmRSS"]
        Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

        spool_peak = [0.0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                with contextlib.suppress(OSError):
                    spool_peak[0] = max(spool_peak[0],
                                        read_metric(node.metrics, "meshmirror_mirror_spool_bytes"))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        bait_layer = small if bait == "in-memory" else large
        for _ in range(HOSTILE):
            hostile.append(unread_get(host, int(port), path(bait_layer.digest)))

        # Honest pulls meanwhile: the big one must come whole and right.
        got = sha256_of_get(f"http://{node.address}{path(honest.digest)}", timeout=180)
        assert got == str(honest.digest), f"the honest 64 MiB pull failed: {got}"
        status, _ = timed_get(f"http://{node.address}/v2/", 30)
        assert status == 200

        # The send timeout fires; the hostile clients still hold their sockets open.
        wait_until(lambda: all(closed_by_server(s) for s in hostile), 120,
                   "the node to drop every client that does not read")
        # Nothing stays pinned; the cache keeps each verified blob once, for the next
        # reader, however many clients asked for it.
        wait_until(lambda: read_metric(node.metrics, "meshmirror_mirror_spool_bytes") == 0, 60,
                   "the spool to be released")
        assert read_metric(node.metrics, "meshmirror_mirror_cache_bytes") <= sum(
            layer.size for layer in (small, large, honest))
        sampling.set()
        sampler.join(10)
        peak = proc_status(node.proc.pid)["VmHWM"]
        print(f"\nunread clients: RSS idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB "
              f"(+{(peak - idle) / MiB:.0f}); spool peak {spool_peak[0] / MiB:.0f} MiB")
        timeouts = read_metric(node.metrics, "meshmirror_http_connection_events_total",
                               event="send_timeout", server="registry")
        assert timeouts >= 1, "the drops are counted"
        if bait == "spooled":
            assert spool_peak[0] > 0, "the large blobs went through the spool"
        assert peak - idle <= RSS_GROWTH
    finally:
        for s in hostile:
            s.close()
        for running in (node, holder):
            if running is not None:
                stop(running.proc)
