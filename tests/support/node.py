"""``meshmirror run`` as a real process on its own loopback address, for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tests.support.ports import free_dual_stack_port, free_port, loopback_host
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
               env: Mapping[str, str] | None = None,
               port_only: bool = False, same_as: RunningNode | None = None) -> RunningNode:
    """``env``: the process's environment instead of this one's (proxy variables).
    ``port_only``: listen on ``:PORT`` (every address, both families); the node's
    addresses are then given as 127.0.0.1:PORT, and it advertises 127.0.0.1.
    ``same_as``: a stopped node whose addresses this one takes over (a restart)."""
    if same_as is not None:
        host = same_as.address.rsplit(":", 1)[0]
        ports = [int(a.rsplit(":", 1)[1]) for a in (same_as.address, same_as.metrics,
                                                     same_as.mesh)]
        listen = [f"{host}:{p}" for p in ports]
    elif port_only:
        host = "127.0.0.1"
        ports = [free_dual_stack_port() for _ in range(3)]
        listen = [f":{p}" for p in ports]
        extra = ("--advertise-addr", host, *extra)
    else:
        host = loopback_host()
        ports = [free_port(host) for _ in range(3)]
        listen = [f"{host}:{p}" for p in ports]
    address, metrics, mesh = (f"{host}:{p}" for p in ports)
    environment = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = spawn([sys.executable, "-m", "meshmirror", "run", "--store", store,
                  "--registry-addr", listen[0], "--metrics-addr", listen[1],
                  "--mesh-addr", listen[2], *NO_UPSTREAM, *extra], log, environment)
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
