"""A node's body threads (peer reads and hashing) run at a lower priority than its
event loop, so that hashing a large blob on a shared core never holds the requests the
loop answers behind it (`meshmirror.mirror.client.BODY_THREAD_NICENESS`).

Real processes: a holder with one 8 MiB layer, a puller that hops it, then the
puller's threads as /proc/<pid>/task/<tid>/stat tells their nice values.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshmirror.mirror.client import BODY_THREAD_NICENESS
from tests.support.http import timed_sha256
from tests.support.node import RunningNode, holder_and_puller
from tests.support.processes import wait_until

pytestmark = [pytest.mark.real]


def thread_niceness(node: RunningNode) -> dict[int, int]:
    """Each of the node's threads' nice value, by thread id."""
    found = {}
    for task in Path(f"/proc/{node.proc.pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while listing
        found[int(task.name)] = int(fields[16])  # field 19 of stat; 3 is fields[0]
    return found


def test_body_threads_yield_to_the_event_loop(tmp_path: Path) -> None:
    with holder_and_puller(tmp_path, "docker.io/library/nice:1", [8 << 20], seed=37,
                           puller="puller") as (_holder, puller, image):
        digest = str(image.platforms[0].layers[0].digest)
        url = f"http://{puller.address}/v2/library/nice/blobs/{digest}?ns=docker.io"
        wait_until(lambda: timed_sha256(url)[0] == digest, 30,
                   "the puller to hop the holder's layer")
        niceness = thread_niceness(puller)
        assert niceness[puller.proc.pid] == 0, "the event loop's thread keeps its priority"
        assert BODY_THREAD_NICENESS in niceness.values(), niceness
