"""Real processes: 20 mesh nodes as separate OS processes, each on its own 127.0.x.y.

Each node is ``python -m meshmirror.mesh`` printing membership events
as JSON lines; the test reconstructs every node's view from its events. LAN
defaults throughout, so the detection bound is the one memberlist's defaults
give (see ``detection_bound``), not a tuned number.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshmirror.mesh.config import MeshConfig
from tests.support.ports import free_port, loopback_host
from tests.support.processes import child_options
from tests.support.serf import wait_for

pytestmark = [pytest.mark.slow]

CONFIG = MeshConfig()
N = 20


def detection_bound(config: MeshConfig, n: int) -> float:
    """Worst case under ``config``: a full probe round, the longest suspicion, gossip."""
    scale = max(1.0, math.log10(max(1, n)))
    suspicion_max = (config.suspicion_mult * config.suspicion_max_timeout_mult * scale
                     * config.probe_interval)
    return n * config.probe_interval + suspicion_max + 2.0


@dataclass
class Proc:
    name: str
    host: str
    port: int
    proc: subprocess.Popen[str] | None = None
    view: dict[str, tuple[str, int]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> set[str]:
        with self.lock:
            return {n for n, (state, _) in self.view.items() if state == "alive"}

    def state_of(self, name: str) -> tuple[str, int] | None:
        with self.lock:
            return self.view.get(name)

    def incarnation_of(self, name: str) -> int:
        """The incarnation this process last saw for ``name``, which it knows of."""
        state = self.state_of(name)
        assert state is not None, f"{self.name} has no view of {name}"
        return state[1]

    def first_event_time(self, kind: str, node: str, after: float) -> float | None:
        with self.lock:
            for ev in self.events:
                if ev["event"] == kind and ev.get("node") == node and ev["time"] >= after:
                    return float(ev["time"])
        return None


class Mesh:
    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def spawn(self, p: Proc, join: list[Proc]) -> None:
        cmd = [sys.executable, "-m", "meshmirror.mesh", "--bind", f"{p.host}:{p.port}",
               "--name", p.name, "--tag", f"http={p.host}:5000"]
        for seed in join:
            cmd += ["--join", f"{seed.host}:{seed.port}"]
        p.view = {}
        p.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, **child_options())
        threading.Thread(target=self._read, args=(p, p.proc), daemon=True).start()

    def start(self, name: str, join: list[Proc]) -> Proc:
        host = loopback_host()
        p = Proc(name, host, free_port(host))
        self.procs.append(p)
        self.spawn(p, join)
        return p

    @staticmethod
    def _read(p: Proc, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with p.lock:
                p.events.append(ev)
                kind = ev["event"]
                if kind == "ready":
                    p.view[p.name] = ("alive", ev["incarnation"])
                elif kind in ("join", "update"):
                    p.view[ev["node"]] = ("alive", ev["incarnation"])
                elif kind in ("dead", "leave"):
                    p.view[ev["node"]] = (kind, ev["incarnation"])

    def kill(self, p: Proc) -> None:
        if p.proc is not None and p.proc.poll() is None:
            os.killpg(p.proc.pid, signal.SIGKILL)
            p.proc.wait(5)

    def close(self) -> None:
        for p in self.procs:
            self.kill(p)

    def running(self) -> list[Proc]:
        return [p for p in self.procs if p.proc is not None and p.proc.poll() is None]


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    m = Mesh()
    try:
        yield m
    finally:
        m.close()


def start_mesh(mesh: Mesh, n: int) -> list[Proc]:
    seed = mesh.start("n00", [])
    for i in range(1, n):
        mesh.start(f"n{i:02d}", [seed])
    names = {p.name for p in mesh.procs}
    assert wait_for(lambda: all(p.alive() == names for p in mesh.procs), 60, 0.5), {
        p.name: len(p.alive()) for p in mesh.procs}
    return mesh.procs


def test_twenty_processes_converge_detect_kill_and_rejoin(mesh: Mesh) -> None:
    t0 = time.time()
    procs = start_mesh(mesh, N)
    print(f"converged {N} processes in {time.time() - t0:.1f}s")

    victim = procs[7]
    old_inc = victim.state_of(victim.name)
    assert old_inc is not None
    killed_at = time.time()
    mesh.kill(victim)
    others = [p for p in procs if p is not victim]
    bound = detection_bound(CONFIG, N)
    assert wait_for(lambda: all(victim.name not in p.alive() for p in others), bound, 0.5), {
        p.name: p.state_of(victim.name) for p in others}
    times = sorted((p.first_event_time("dead", victim.name, killed_at) or math.inf) - killed_at
                   for p in others)
    print(f"kill -9 detected: first {times[0]:.2f}s, median {times[len(times) // 2]:.2f}s, "
          f"last {times[-1]:.2f}s (bound {bound:.0f}s)")
    assert times[-1] <= bound

    # Restart with the same name and address: it refutes its death with a higher incarnation.
    mesh.spawn(victim, [procs[0]])
    dead_inc = max(p.incarnation_of(victim.name) for p in others)

    def rejoined() -> bool:
        for p in others:
            state = p.state_of(victim.name)
            if state is None or state[0] != "alive" or state[1] <= dead_inc:
                return False
        return True

    assert wait_for(rejoined, 30, 0.5), {p.name: p.state_of(victim.name) for p in others}
    # No false positives among the survivors meanwhile.
    for p in others:
        with p.lock:
            falsely_dead = {ev["node"] for ev in p.events
                            if ev["event"] == "dead" and ev["node"] != victim.name}
        assert not falsely_dead, (p.name, falsely_dead)


IPTABLES = shutil.which("iptables")


def _iptables(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(IPTABLES), "-w", *args], capture_output=True, timeout=20)


@pytest.fixture
def chain() -> Iterator[str]:
    """A private iptables chain hooked into INPUT, removed in teardown whatever happens."""
    assert IPTABLES is not None and _iptables("-L", "INPUT", "-n").returncode == 0, \
        "iptables is not usable: run scripts/bootstrap as root"
    name = f"MMTEST{os.getpid() % 100000}"
    _iptables("-N", name)
    _iptables("-I", "INPUT", "-j", name)
    try:
        yield name
    finally:
        _iptables("-D", "INPUT", "-j", name)
        _iptables("-F", name)
        _iptables("-X", name)


def test_partition_detected_and_heals(mesh: Mesh, chain: str) -> None:
    n = 8
    procs = start_mesh(mesh, n)
    side_a, side_b = procs[: n // 2], procs[n // 2 :]
    for a in side_a:
        for b in side_b:
            assert _iptables("-A", chain, "-s", a.host, "-d", b.host, "-j", "DROP").returncode == 0
            assert _iptables("-A", chain, "-s", b.host, "-d", a.host, "-j", "DROP").returncode == 0
    # Twice the bound: every probe across the cut fails, so Lifeguard's awareness
    # stretches each node's probe interval and timeouts, and a node whose own view
    # of a peer has a newer incarnation than the others' dead broadcasts must
    # suspect it itself, without confirmations (the longest suspicion).
    bound = 2 * detection_bound(CONFIG, n)
    names_a = {p.name for p in side_a}
    names_b = {p.name for p in side_b}
    assert wait_for(lambda: all(p.alive() == names_a for p in side_a)
                    and all(p.alive() == names_b for p in side_b), bound, 0.5), {
        p.name: sorted(p.alive()) for p in procs}
    _iptables("-F", chain)
    healed_at = time.time()
    everyone = names_a | names_b
    # Each node push-pulls with a failed member every reconnect interval (10 s,
    # as Serf's reconnect does); the other half refutes its death and merges.
    assert wait_for(lambda: all(p.alive() == everyone for p in procs), 10 + 15, 0.5), {
        p.name: sorted(p.alive()) for p in procs}
    print(f"partition healed in {time.time() - healed_at:.1f}s")


def test_no_false_positive_while_one_node_is_cpu_saturated(mesh: Mesh) -> None:
    n = 6
    procs = start_mesh(mesh, n)
    busy = procs[3]
    assert busy.proc is not None
    # Saturate the busy node's CPU with two spinning processes pinned to the cores it may use
    # (two cores here) for 10 s; the mesh thread must still answer probes in time.
    spinners = [subprocess.Popen([sys.executable, "-c",
                                  "import time\nend=time.time()+10\nwhile time.time()<end: pass"],
                                 **child_options()) for _ in range(2)]
    try:
        os.sched_setaffinity(busy.proc.pid, os.sched_getaffinity(spinners[0].pid))
        started = time.time()
        time.sleep(10.5)
    finally:
        for s in spinners:
            if s.poll() is None:
                os.killpg(s.pid, signal.SIGKILL)
            s.wait(5)
    time.sleep(CONFIG.suspicion_mult * CONFIG.probe_interval)
    for p in procs:
        with p.lock:
            deaths = [ev for ev in p.events if ev["event"] == "dead" and ev["time"] >= started]
        assert not deaths, (p.name, deaths)
        assert p.alive() == {q.name for q in procs}
