"""The README's first command: the demo pulls an image from a peer and exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import child_options

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _demo(*extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshmirror", "demo", "--image-size-mib", "8", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        **child_options())


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_demo_pulls_from_the_seeded_peer() -> None:
    proc = _demo("--no-wait")
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert report["sources"] == ["node1"], out
    assert report["pull_bytes"] > 8 * 1024 * 1024
    assert "every digest verified" in out


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    proc = _demo()
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        assert any("press Ctrl-C" in line for line in lines), "".join(lines)
        children = _children_of(proc.pid)
        assert len(children) == 3, "three node processes run while the demo waits"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    for child in children:
        assert not Path(f"/proc/{child}").exists() or "zombie" in Path(
            f"/proc/{child}/status").read_text().lower(), f"node process {child} left running"
