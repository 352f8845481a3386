"""Real ``serf agent`` processes on loopback for interop tests, with guaranteed cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.ports import free_dual_stack_port, free_port, loopback_host
from tests.support.processes import child_options

SERF = shutil.which("serf")


@dataclass
class SerfAgent:
    name: str
    host: str
    port: int
    rpc_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def bind(self) -> str:
        return f"{self._host}:{self.port}"

    @property
    def rpc(self) -> str:
        return f"{self._host}:{self.rpc_port}"

    @property
    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def members(self) -> list[dict[str, Any]]:
        """``serf members -format json``: name, addr, status, tags per member."""
        out = subprocess.run(
            [str(SERF), "members", "-format", "json", "-rpc-addr", self.rpc],
            capture_output=True, timeout=10, check=True)
        members: list[dict[str, Any]] = json.loads(out.stdout)["members"]
        return members

    def member_status(self) -> dict[str, str]:
        return {m["name"]: m["status"] for m in self.members()}

    def join(self, address: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(SERF), "join", "-rpc-addr", self.rpc, address],
                              capture_output=True, timeout=15)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class SerfCluster:
    """Starts agents, waits for their RPC port, kills every process group at exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.agents: list[SerfAgent] = []

    def start(self, name: str, *, encrypt: str | None = None, join: list[str] | None = None,
              extra: list[str] | None = None, host: str | None = None) -> SerfAgent:
        """``host``: an address to bind instead of a fresh 127.0.x.y (e.g. ``::1``)."""
        if SERF is None:
            raise RuntimeError("serf is not installed (apt-get install serf)")
        host = host or loopback_host()

        def port() -> int:
            return free_dual_stack_port() if ":" in host else free_port(host)

        agent = SerfAgent(name, host, port(), port(),
                          self.workdir / f"serf-{name}.log", extra=list(extra or []))
        cmd = [SERF, "agent", "-node", name, "-bind", agent.bind, "-rpc-addr", agent.rpc,
               "-log-level", "debug", *agent.extra]
        if encrypt:
            cmd += ["-encrypt", encrypt]
        for address in join or []:
            cmd += ["-join", address]
        log = agent.log_path.open("wb")
        agent.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, **child_options())
        log.close()
        self.agents.append(agent)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"serf agent {name} exited:\n{agent.log()}")
            try:
                agent.members()
                return agent
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"serf agent {name} did not answer RPC:\n{agent.log()}")

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()


@contextmanager
def serf_cluster(workdir: Path) -> Iterator[SerfCluster]:
    cluster = SerfCluster(workdir)
    try:
        yield cluster
    finally:
        cluster.close()


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; exceptions count as false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except Exception:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
