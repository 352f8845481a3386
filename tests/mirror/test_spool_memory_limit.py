"""A blob larger than the mirror's memory limit is held in its spool and served whole.

The chart runs meshmirror with a 512Mi memory limit and spools blobs of up to
4Gi; the spool's page cache is charged to the pod's memory cgroup. This puts a
real ``meshmirror run`` hop in a real memory cgroup (v1 or v2, whichever the
kernel mounts) with a limit well under the blob's size and checks that the
kernel reclaims the spool's pages instead of killing the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node import holder_and_puller
from tests.support.processes import wait_until

pytestmark = [pytest.mark.real]

MiB = 1024 * 1024
LIMIT = 128 * MiB
BLOB = 384 * MiB


class MemoryCgroup:
    """A memory cgroup this test creates, limits, fills with one process and removes."""

    def __init__(self, name: str, limit: int) -> None:
        v2_root = Path("/sys/fs/cgroup")
        if "memory" in _read(v2_root / "cgroup.controllers").split():
            self.v2 = True
            _write(v2_root / "cgroup.subtree_control", "+memory")
            self.path = v2_root / name
        elif (v2_root / "memory" / "memory.limit_in_bytes").exists():
            self.v2 = False
            self.path = v2_root / "memory" / name
        else:
            raise AssertionError("no memory cgroup controller is mounted under /sys/fs/cgroup")
        self.path.mkdir()
        _write(self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes"), str(limit))

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def times_at_limit(self) -> int:
        """How often allocations hit the limit and the kernel had to reclaim."""
        if self.v2:
            return _events(self.path / "memory.events")["max"]
        return int(_read(self.path / "memory.failcnt"))

    def oom_kills(self) -> int:
        if self.v2:
            return _events(self.path / "memory.events").get("oom_kill", 0)
        return _events(self.path / "memory.oom_control").get("oom_kill", 0)

    def remove(self) -> None:
        wait_until(lambda: not _read(self.path / "cgroup.procs").strip(), 10,
                   "the cgroup to empty")
        self.path.rmdir()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _write(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)


def _events(path: Path) -> dict[str, int]:
    pairs = (line.split() for line in _read(path).splitlines())
    return {fields[0]: int(fields[1]) for fields in pairs if len(fields) == 2}


@pytest.fixture
def cgroup() -> Iterator[MemoryCgroup]:
    group = MemoryCgroup(f"meshmirror-test-{os.getpid()}", LIMIT)
    try:
        yield group
    finally:
        group.remove()


def test_blob_larger_than_the_memory_limit_is_spooled_and_served(
        tmp_path: Path, cgroup: MemoryCgroup) -> None:
    with holder_and_puller(tmp_path, "docker.io/library/big:1", [BLOB],
                           "--mirror-spool-dir", str(tmp_path), seed=11,
                           puller="hop") as (_holder, hop, image):
        layer = image.platforms[0].layers[0]
        cgroup.add(hop.proc.pid)
        url = f"http://{hop.address}/v2/library/big/blobs/{layer.digest}?ns=docker.io"

        def routed() -> bool:
            request = urllib.request.Request(url, method="HEAD")
            with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=5) as r:
                return bool(r.status == 200)
            return False

        wait_until(routed, 30, "the hop to find the blob through the holder's summary")
        digest = hashlib.sha256()
        received = 0
        with urllib.request.urlopen(url, timeout=120) as response:
            while chunk := response.read(4 * MiB):
                digest.update(chunk)
                received += len(chunk)
        assert received == layer.size
        assert f"sha256:{digest.hexdigest()}" == str(layer.digest)
        assert hop.proc.poll() is None, "the hop died"
        assert cgroup.times_at_limit() > 0, "the limit never bound: the test proves nothing"
        assert cgroup.oom_kills() == 0
        with urllib.request.urlopen(f"http://{hop.metrics}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'meshmirror_mirror_blob_bodies_total{mode="spool"} 1.0' in metrics
