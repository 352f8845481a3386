"""Streaming a large blob does not grow the server's memory with the blob's size.

Measured on the real `meshmirror run` process through /proc/PID/status (VmRSS),
sampled while a client pulls a 256 MiB blob: first reading slowly (so the
server must hold back rather than buffer), then as fast as it can.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
from tests.support.node import start_node
from tests.support.processes import stop

pytestmark = [pytest.mark.real, pytest.mark.slow]

BLOB_SIZE = 256 * 1024 * 1024
# Far below the blob size: socket buffers, a few 1 MiB chunks in flight, allocator slack.
RSS_GROWTH_LIMIT = 64 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_rss_bounded_while_streaming_a_large_blob(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    image = build_image("docker.io/library/big:1", layout, layer_sizes=(BLOB_SIZE,), seed=1)
    layer = image.platforms[0].layers[0]
    node = start_node(f"oci:{layout}", tmp_path / "node.log")
    try:
        pid = node.proc.pid
        # Warm up: one small request so imports and first allocations are done.
        with socket.create_connection(_split(node.address), timeout=10) as warm:
            warm.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while warm.recv(65536):
                pass
        baseline = rss_bytes(pid)
        peak = baseline
        stop_sampling = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop_sampling.is_set():
                peak = max(peak, rss_bytes(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        received = 0
        try:
            with socket.create_connection(_split(node.address), timeout=30) as conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                conn.sendall(f"GET /v2/library/big/blobs/{layer.digest} HTTP/1.1\r\n"
                             "Host: x\r\nConnection: close\r\n\r\n".encode())
                slow_until = time.monotonic() + 2.0
                while True:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    received += len(chunk)
                    if time.monotonic() < slow_until:
                        time.sleep(0.05)  # a slow reader: the server must not buffer ahead
        finally:
            stop_sampling.set()
            sampler.join(5)
    finally:
        assert stop(node.proc) == 0
    assert received > layer.size  # the whole body (plus headers) arrived
    growth = peak - baseline
    print(f"rss growth {growth / 2**20:.1f} MiB, baseline {baseline / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB serving a " \
                                      f"{layer.size / 2**20:.0f} MiB blob"


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)
