"""A file that refuses splice gets the body the received way, whole and hashed.

Some filesystems (FUSE, some overlay setups) answer splice into a file with EINVAL.
The kernel does the same for any file opened with O_APPEND, so these tests hand the
pump such a descriptor of the cache entry's file: the kernel's own refusal, over a
real socket, with nothing faked.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
from pathlib import Path

import pytest

from meshmirror.mirror.budget import MemoryBudget
from meshmirror.mirror.cache import BlobCache, CacheEntry
from tests.mirror.test_body_pump import CHUNK, DATA, RawPeer, pump_into


class AppendOnly:
    """The entry as a `body.FileKeep` whose descriptor is the file opened O_APPEND."""

    def __init__(self, entry: CacheEntry) -> None:
        self._entry = entry
        self._fd = os.open(entry.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    @property
    def written(self) -> int:
        return self._entry.written

    def fileno(self) -> int:
        return self._fd

    def appended(self, size: int) -> None:
        self._entry.appended(size)

    def close(self) -> None:
        os.close(self._fd)


def test_the_kernel_refuses_splice_into_an_append_only_file(tmp_path: Path) -> None:
    """The premise: what these tests rely on for a refusing file."""
    target = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    pipe_out, pipe_in = os.pipe()
    try:
        os.write(pipe_in, b"abc")
        with pytest.raises(OSError) as raised:
            os.splice(pipe_out, target, 3, offset_dst=0)
        assert raised.value.errno == errno.EINVAL
    finally:
        for fd in (target, pipe_out, pipe_in):
            os.close(fd)


@pytest.mark.parametrize("prefix", [0, 1000])
async def test_a_file_that_refuses_splice_gets_the_body_received(
    tmp_path: Path, prefix: int
) -> None:
    cache = BlobCache(tmp_path, 1 << 30, 1 << 30)
    pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="test-body")
    budget = MemoryBudget(64 * CHUNK)
    peer = RawPeer(DATA[prefix:])
    try:
        entry = cache.reserve("k", len(DATA))
        assert entry is not None
        keep = AppendOnly(entry)
        try:
            end, digest, _ = await pump_into(entry, peer, len(DATA), budget, pool,
                                             spliced=True, prefix=DATA[:prefix], into=keep)
        finally:
            keep.close()
        assert end is None, f"the hop failed: {end!r}"
        assert entry.path.read_bytes() == DATA
        assert digest == hashlib.sha256(DATA).hexdigest()
        assert budget.used == 0
    finally:
        peer.close()
        pool.shutdown(wait=True)
        cache.close()
