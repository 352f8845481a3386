"""The counting proxy itself: counts what reaches clients, limits rate, survives a dead upstream."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.distribution import DistributionRegistry
from tests.support.ports import free_port, loopback_host
from tests.support.proxy import CountingProxy


def _push_blob(registry_url: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{registry_url}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        location = resp.headers["Location"]
    sep = "&" if "?" in location else "?"
    if location.startswith("/"):
        location = registry_url + location
    put = urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(put, timeout=30) as resp:
        assert resp.status == 201
    return digest


@pytest.fixture(scope="module")
def registry() -> Iterator[DistributionRegistry]:
    with DistributionRegistry() as reg:
        yield reg


def test_counts_bytes_sent_to_clients(registry: DistributionRegistry) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = _push_blob(registry.url, "proxy/count", data)
    with CountingProxy(registry.host, registry.port) as proxy:
        url = f"{proxy.url}/v2/proxy/count/blobs/{digest}"
        for _ in range(2):
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.read() == data
        # Body twice plus two small sets of response headers.
        assert 2 * len(data) < proxy.bytes_to_clients < 2 * len(data) + 4096
        assert proxy.connections == 2
        proxy.reset()
        assert proxy.bytes_to_clients == 0


def test_rate_limit_slows_transfer(registry: DistributionRegistry) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = _push_blob(registry.url, "proxy/rate", data)
    rate = 4 * 1024 * 1024  # 4 MiB/s: about one second for the body
    with CountingProxy(registry.host, registry.port, rate=rate) as proxy:
        start = time.monotonic()
        with urllib.request.urlopen(f"{proxy.url}/v2/proxy/rate/blobs/{digest}",
                                    timeout=20) as resp:
            assert resp.read() == data
        elapsed = time.monotonic() - start
    # Burst is a quarter second of rate, so at least ~0.75 s; generous upper bound.
    assert 0.6 < elapsed < 10


def test_dead_upstream_closes_client_connection() -> None:
    host = loopback_host()
    with CountingProxy(host, free_port(host), connect_timeout=1.0) as proxy:
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"{proxy.url}/v2/", timeout=5)
        assert proxy.connections == 1
        assert proxy.bytes_to_clients == 0


def test_rejects_bad_rate() -> None:
    with pytest.raises(ValueError, match="rate"):
        CountingProxy("127.0.0.1", 1, rate=0)


def test_stop_is_idempotent_and_closes_listener(tmp_path: Path) -> None:
    proxy = CountingProxy("127.0.0.1", 1).start()
    address = (proxy.host, proxy.port)
    proxy.stop()
    proxy.stop()
    import socket
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(address)
