"""Starting and reliably stopping the real programs tests run."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a program in its own process group, output to a log file for post-mortems."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns the handle for its lifetime
    try:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
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
