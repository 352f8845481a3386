"""meshmirror's mesh against kinship (SWIM + Lifeguard in Rust), real processes on loopback.

Both run their LAN presets, which are memberlist's LAN defaults (probe 1 s / 500 ms, 3
indirect checks, suspicion mult 4, max mult 6, gossip 200 ms to 3 nodes, retransmit mult 4,
push-pull 30 s). One process per node, each on its own 127.x.y.z address, one
implementation after the other in the same run so they share the machine's load.

Measured for each, as wall-clock times from the events each process prints:

- join convergence: a node that came up alone joins through one seed; time from its join
  until every other node has reported it alive;
- kill -9 detection: SIGKILL a node; time until the first, and until every, other node
  reports it dead (several kills, medians);
- false deaths: any node reported dead that was not killed, over the whole run.

Results are ratios meshmirror / kinship (below 1: meshmirror is faster), written to
``benchmarks/RESULTS.md``.

Usage: python benchmarks/mesh_vs_kinship.py [--nodes 20] [--kills 3] [--no-write]
(``--kinship-node`` is the per-process entry point this script spawns for kinship.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import BenchRun, Section, Table, load_since, utc_now  # noqa: E402
from tests.support.ports import free_port, loopback_host  # noqa: E402

# ---------------------------------------------------------------- the kinship node process


def kinship_node(argv: list[str]) -> int:
    """One kinship node printing JSON lines like ``python -m meshmirror.mesh``."""
    import kinship
    import kinship.blocking

    parser = argparse.ArgumentParser(prog="mesh_vs_kinship.py --kinship-node")
    parser.add_argument("--bind", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--join", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = kinship.Config.lan(name=args.name, bind=args.bind, insecure_plaintext=True,
                             seeds=[])
    lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        with lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    cluster = kinship.blocking.Cluster(cfg).start(timeout=10.0)
    kinds = {kinship.MemberJoined: "join", kinship.MemberDead: "dead",
             kinship.MemberLeft: "leave", kinship.MemberRecovered: "recover",
             kinship.MemberSuspect: "suspect", kinship.MemberUpdated: "update"}

    def pump() -> None:
        for event in cluster.events(timeout=1.0):
            if event is None:
                continue
            kind = kinds.get(type(event))
            member = getattr(event, "member", None)
            if kind is not None and member is not None:
                emit({"time": time.time(), "event": kind, "self": args.name,
                      "node": member.name})

    # Subscribe before anything can happen, so no join event is missed.
    threading.Thread(target=pump, daemon=True).start()
    time.sleep(0.1)
    emit({"time": time.time(), "event": "ready", "self": args.name})
    if args.join:
        emit({"time": time.time(), "event": "joining", "self": args.name})
        cluster.join(args.join, timeout=10.0)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    cluster.close(timeout=2.0)
    return 0


# ---------------------------------------------------------------- the harness


@dataclass
class Proc:
    name: str
    host: str
    port: int
    popen: subprocess.Popen[str] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def first(self, pred: Callable[[dict[str, Any]], bool]) -> float | None:
        with self.lock:
            for ev in self.events:
                if pred(ev):
                    return float(ev["time"])
        return None


class Cluster:
    """N processes of one implementation; every process is killed on exit."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.procs: list[Proc] = []

    def command(self, p: Proc, join: list[Proc]) -> list[str]:
        if self.impl == "meshmirror":
            cmd = [sys.executable, "-m", "meshmirror.mesh", "--bind", p.addr,
                   "--name", p.name]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--kinship-node",
                   "--bind", p.addr, "--name", p.name]
        for j in join:
            cmd += ["--join", j.addr]
        return cmd

    def spawn(self, name: str, join: list[Proc]) -> Proc:
        host = loopback_host()
        p = Proc(name, host, free_port(host))
        p.popen = subprocess.Popen(self.command(p, join), stdout=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   text=True, cwd=ROOT, start_new_session=True)
        threading.Thread(target=self._read, args=(p,), daemon=True).start()
        self.procs.append(p)
        return p

    @staticmethod
    def _read(p: Proc) -> None:
        assert p.popen is not None and p.popen.stdout is not None
        for line in p.popen.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with p.lock:
                p.events.append(ev)

    def kill(self, p: Proc) -> float:
        assert p.popen is not None
        t = time.time()
        os.killpg(p.popen.pid, signal.SIGKILL)
        p.popen.wait(timeout=10)
        return t

    def close(self) -> None:
        for p in self.procs:
            if p.popen is not None and p.popen.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(timeout=10)

    def alive_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.popen is not None and p.popen.poll() is None]


@contextmanager
def cluster(impl: str) -> Iterator[Cluster]:
    c = Cluster(impl)
    try:
        yield c
    finally:
        c.close()


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _is(kind: str, node: str, after: float = 0.0) -> Callable[[dict[str, Any]], bool]:
    return lambda ev: ev.get("event") == kind and ev.get("node") == node and ev["time"] >= after


@dataclass
class ImplResult:
    impl: str
    n: int
    join: float = float("nan")
    kill_first: list[float] = field(default_factory=list)
    kill_all: list[float] = field(default_factory=list)
    false_deaths: int = 0
    notes: list[str] = field(default_factory=list)


def measure(impl: str, n: int, kills: int) -> ImplResult:
    res = ImplResult(impl, n)
    with cluster(impl) as c:
        seed = c.spawn(f"{impl[:4]}-0", [])
        if not wait_for(lambda: seed.first(lambda ev: ev.get("event") == "ready") is not None,
                        30):
            res.notes.append("seed never came up")
            return res
        for i in range(1, n - 1):
            c.spawn(f"{impl[:4]}-{i}", [seed])
        names = [p.name for p in c.procs]

        def converged(procs: list[Proc], who: list[str]) -> bool:
            return all(p.first(_is("join", w)) is not None or w == p.name
                       for p in procs for w in who)

        if not wait_for(lambda: converged(c.procs, names), 90):
            res.notes.append("initial cluster did not converge in 90 s")
        time.sleep(3.0)
        # Join convergence: the N-th node joins through the seed.
        joiner = c.spawn(f"{impl[:4]}-{n - 1}", [seed])
        if wait_for(lambda: joiner.first(lambda ev: ev.get("event") == "ready") is not None, 30):
            start = joiner.first(lambda ev: ev.get("event") == "ready")
            assert start is not None
            others = [p for p in c.procs if p is not joiner]
            if wait_for(lambda: all(p.first(_is("join", joiner.name)) for p in others), 60):
                joined = [p.first(_is("join", joiner.name)) for p in others]
                res.join = max(t for t in joined if t is not None) - start
            else:
                res.notes.append("joiner not seen by everyone in 60 s")
        time.sleep(3.0)
        # kill -9, one node at a time, never the seed or the joiner.
        victims = c.procs[1:1 + kills]
        for victim in victims:
            t_kill = c.kill(victim)
            watchers = c.alive_procs()
            dead_victim = _is("dead", victim.name, t_kill)

            def all_saw(watchers: list[Proc] = watchers,
                        pred: Callable[[dict[str, Any]], bool] = dead_victim) -> bool:
                return all(p.first(pred) is not None for p in watchers)

            ok = wait_for(all_saw, 90)
            seen = [t for t in (p.first(dead_victim) for p in watchers) if t is not None]
            if seen:
                res.kill_first.append(min(seen) - t_kill)
            if ok:
                res.kill_all.append(max(seen) - t_kill)
            else:
                res.notes.append(f"{victim.name}: {len(seen)}/{len(watchers)} saw it dead")
            time.sleep(2.0)
        killed = {v.name for v in victims}
        for p in c.procs:
            with p.lock:
                res.false_deaths += sum(1 for ev in p.events if ev.get("event") == "dead"
                                        and ev.get("node") not in killed)
    return res


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(mesh: ImplResult, kin: ImplResult, command: str, load_before: str) -> Section:
    """The benchmark's block in RESULTS.md."""
    def ratio(a: float, b: float) -> str:
        return "n/a" if not (a == a and b == b) or b == 0 else f"{a / b:.2f}"

    figures = [
        ("join convergence (s)", mesh.join, kin.join),
        ("kill -9: first node (s, median)", _median(mesh.kill_first), _median(kin.kill_first)),
        ("kill -9: every node (s, median)", _median(mesh.kill_all), _median(kin.kill_all)),
    ]
    rows = [(label, f"{a:.2f}", f"{b:.2f}", ratio(a, b)) for label, a, b in figures]
    rows.append(("false deaths", str(mesh.false_deaths), str(kin.false_deaths), ""))
    return Section(
        name="mesh_vs_kinship", title="Mesh side by side with kinship",
        command=command, date=utc_now(), load=load_since(load_before),
        setup=f"{mesh.n} real processes each, loopback, both LAN presets (memberlist LAN "
              f"defaults), {len(mesh.kill_first)} / {len(kin.kill_first)} kills. Join is timed "
              "from the joiner's \"ready\" line to the last other node's join event (kinship "
              "joins right after it; meshmirror's transport is already joining by then, so its "
              "figure is if anything flattered by a few ms).",
        tables=[Table(("metric", "meshmirror", "kinship", "ratio meshmirror/kinship"), rows)],
        notes=[f"{res.impl} notes: " + "; ".join(res.notes) for res in (mesh, kin)
               if res.notes])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--kinship-node":
        return kinship_node(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    bench = BenchRun(parser, argv)
    args = bench.args
    if not 3 <= args.nodes <= 50:
        parser.error("--nodes must be 3-50")
    if not 1 <= args.kills <= args.nodes - 3:
        parser.error("--kills must be at least 1 and leave the seed, the joiner and a watcher")
    try:
        import kinship  # noqa: F401
    except ImportError:
        print("kinship is not installed: pip install kinship", file=sys.stderr)
        return 2
    mesh = measure("meshmirror", args.nodes, args.kills)
    print(json.dumps(mesh.__dict__), flush=True)
    kin = measure("kinship", args.nodes, args.kills)
    print(json.dumps(kin.__dict__), flush=True)
    section = report(mesh, kin, "python benchmarks/mesh_vs_kinship.py " + " ".join(argv),
                     bench.load_before)
    bench.publish(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
