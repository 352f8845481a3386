"""Programs tests start die with the test process, even one killed from outside.

A pytest killed by CI's timeout runs no fixture cleanup: `python -m meshmirror.mesh`
children of tests/mesh/net/test_processes.py were seen running on with parent PID 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.support.processes import wait_until

_ROOT = Path(__file__).resolve().parents[1]
# A stand-in for the test process: starts a long-lived child as the helpers do, says
# its PID, then waits to be killed.
_PARENT = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from tests.support.processes import spawn
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    if sys.argv[1] == "thread":  # started by a worker thread that ends at once
        box = []
        worker = threading.Thread(target=lambda: box.append(spawn(argv, Path(sys.argv[2]))))
        worker.start()
        worker.join()
        child = box[0]
    else:
        child = spawn(argv, Path(sys.argv[2]))
    print(child.pid, flush=True)
    time.sleep(60)
""")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, reaped by init soon, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start_parent(how: str, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, how, str(tmp_path / "child.log")],
                              stdout=subprocess.PIPE, text=True, cwd=_ROOT,
                              env={**os.environ, "PYTHONPATH": str(_ROOT)})
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


def test_a_spawned_child_dies_when_the_test_process_is_killed(tmp_path: Path) -> None:
    parent, child = _start_parent("main", tmp_path)
    try:
        assert _alive(child)
        parent.kill()  # no cleanup runs: as when CI kills pytest
        parent.wait(10)
        wait_until(lambda: not _alive(child), 10, f"child {child} to die with its parent")
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_started_by_a_worker_thread_outlives_the_thread(tmp_path: Path) -> None:
    """The kernel signals when the starting thread ends: a worker thread's child is
    not given the signal rather than killed as soon as its thread returns."""
    parent, child = _start_parent("thread", tmp_path)
    try:
        time.sleep(0.3)  # the worker thread has long ended
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait(10)
        if _alive(child):
            os.kill(child, signal.SIGKILL)
