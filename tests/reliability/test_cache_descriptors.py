"""A node's blob cache holds no file descriptor for a complete entry nobody reads.

The cache's ``--upstream-cache-limit`` counts bytes, not entries, so a node that
fetched many small blobs (configs, small layers) once held one open file per blob,
and enough of them run the process out of descriptors (``EMFILE``: no socket can be
accepted either). Real processes: a holder with ``BLOBS`` small layers, a puller
that fetches each through its cache, then the puller's /proc/<pid>/fd.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.http import timed_sha256
from tests.support.node import RunningNode, blob_requests, holder_and_puller
from tests.support.processes import wait_until

pytestmark = [pytest.mark.real]

BLOBS = 40


def cache_descriptors(node: RunningNode, spool: Path) -> list[str]:
    """The puller's descriptors open on files of its blob cache."""
    targets = []
    fds = Path(f"/proc/{node.proc.pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listing
        if target.startswith(f"{spool}/meshmirror-cache-") and not target.endswith("/.lock"):
            targets.append(target)
    return targets


def test_complete_entries_hold_no_descriptor_and_are_served_again(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with holder_and_puller(tmp_path, "docker.io/library/many:1", [4096 + n for n in range(BLOBS)],
                           "--mirror-spool-dir", str(spool), seed=31,
                           puller="puller") as (holder, puller, image):
        digests = [str(layer.digest) for layer in image.platforms[0].layers]

        def url(digest: str) -> str:
            return f"http://{puller.address}/v2/library/many/blobs/{digest}?ns=docker.io"

        wait_until(lambda: timed_sha256(url(digests[0]))[0] == digests[0], 30,
                   "the puller to find the holder's blobs")
        assert [timed_sha256(url(d))[0] for d in digests] == digests
        assert len(list(spool.glob("meshmirror-cache-*/sha256-*"))) == BLOBS, \
            "every blob must be a complete cache entry for this test to mean anything"
        wait_until(lambda: cache_descriptors(puller, spool) == [], 10,
                   f"the puller to close its {BLOBS} idle cache files")
        # Still cache hits: served again from the reopened files, not asked of the holder.
        asked = {d: len(blob_requests(holder, d)) for d in digests}
        assert [timed_sha256(url(d))[0] for d in digests] == digests
        assert {d: len(blob_requests(holder, d)) for d in digests} == asked
        wait_until(lambda: cache_descriptors(puller, spool) == [], 10,
                   "the puller to close the cache files it read again")


def test_a_cache_file_changed_while_closed_is_a_miss(tmp_path: Path) -> None:
    """An idle entry's file is opened again by path: one truncated meanwhile was served
    cut on every hit (the zero-copy send finds its end early), and one replaced by
    another file, the other file's bytes, unverified. Each is a miss now, fetched
    again from the holder."""
    spool = tmp_path / "spool"
    spool.mkdir()
    with holder_and_puller(tmp_path, "docker.io/library/few:1", [300_000, 300_001],
                           "--mirror-spool-dir", str(spool), seed=32,
                           puller="puller") as (holder, puller, image):
        digests = [str(layer.digest) for layer in image.platforms[0].layers]

        def url(digest: str) -> str:
            return f"http://{puller.address}/v2/library/few/blobs/{digest}?ns=docker.io"

        wait_until(lambda: timed_sha256(url(digests[0]))[0] == digests[0], 30,
                   "the puller to find the holder's blobs")
        assert [timed_sha256(url(d))[0] for d in digests] == digests
        wait_until(lambda: cache_descriptors(puller, spool) == [], 10,
                   "the puller to close its idle cache files")
        files = {d: next(spool.glob(f"meshmirror-cache-*/{d.replace(':', '-')}.*"))
                 for d in digests}
        asked = {d: len(blob_requests(holder, d)) for d in digests}
        truncated, replaced = digests
        os.truncate(files[truncated], 1000)
        other = files[replaced].with_name("other")
        other.write_bytes(b"\0" * files[replaced].stat().st_size)
        other.replace(files[replaced])
        assert [timed_sha256(url(d))[0] for d in digests] == digests
        assert all(len(blob_requests(holder, d)) > asked[d] for d in digests)
