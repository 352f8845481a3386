"""``meshmirror run`` as a real process on its own loopback address, for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

# Nodes here serve images no upstream registry holds: peers resolve tags and share
# every repository, as with no upstream to ask (a test's ``extra`` flags win).
NO_UPSTREAM = ("--resolve-tags", "peers", "--private-images", "share")


class RunningNode:
    def __init__(self, proc: subprocess.Popen[bytes], address: str, metrics: str,
                 log: Path, mesh: str) -> None:
        self.proc = proc
        self.address = address
        self.metrics = metrics
        self.log = log
        self.mesh = mesh

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()
                if line.startswith("{")]


def start_node(store: str, log: Path, extra: tuple[str, ...] = (),
               env: Mapping[str, str] | None = None) -> RunningNode:
    """``env``: the process's environment instead of this one's (proxy variables)."""
    host = loopback_host()
    address = f"{host}:{free_port(host)}"
    metrics = f"{host}:{free_port(host)}"
    mesh = f"{host}:{free_port(host)}"
    environment = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = spawn([sys.executable, "-m", "meshmirror", "run", "--store", store,
                  "--registry-addr", address, "--metrics-addr", metrics,
                  "--mesh-addr", mesh, *NO_UPSTREAM, *extra], log, environment)
    node = RunningNode(proc, address, metrics, log, mesh)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"meshmirror exited {proc.returncode}: {log.read_text()}")
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=1) as r:
            return bool(r.status == 200)

    try:
        wait_until(healthy, 20, f"meshmirror run on {address}")
    except BaseException:
        stop(proc)
        raise
    return node
