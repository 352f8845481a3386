"""Starting and reliably stopping the real programs tests run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

_PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it ends.

    ``prctl`` is looked up here, before the fork: a ``dlopen`` in the child could wait
    for ever on a loader lock another thread of the parent held at the fork."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody will kill us
            os._exit(1)

    return preexec


class ChildOptions(TypedDict):
    start_new_session: bool
    preexec_fn: Callable[[], None] | None


def child_options() -> ChildOptions:
    """``subprocess.Popen`` keywords for a program a test starts and must not outlive it.

    Tests stop what they start (`stop`), but a pytest killed from outside (CI's timeout, a
    second Ctrl-C) runs no cleanup, and children in their own session (so `stop` can
    signal the group) were left running with parent PID 1. With these the kernel kills
    the child when its parent goes (``PR_SET_PDEATHSIG``). Linux delivers that signal when
    the starting *thread* ends, so only a child started on the main thread gets it: one
    started by a short-lived worker thread would be killed at once.
    """
    main = threading.current_thread() is threading.main_thread()
    return {"start_new_session": True,
            "preexec_fn": _die_with(os.getpid()) if main else None}


def spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a program in its own process group, output to a log file for post-mortems;
    it dies with the test process (`child_options`)."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns the handle for its lifetime
    try:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            **child_options(),
        )
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
    """SIGTERM the whole process group, SIGKILL it if it lingers; never waits unbounded."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # not ready yet looks like any error
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and friends from /proc/<pid>/status, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        match = re.fullmatch(r"(Vm\w+):\s+(\d+) kB", line)
        if match:
            fields[match.group(1)] = int(match.group(2)) * 1024
    return fields
