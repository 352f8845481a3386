"""``meshmirror run`` as a real process on its own loopback address, for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from meshmirror.oci.imagebuilder import BuiltImage, build_image
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


@contextmanager
def holder_and_puller(tmp_path: Path, reference: str, layers: list[int], *extra: str,
                      seed: int, puller: str = "node"
                      ) -> Iterator[tuple[RunningNode, RunningNode, BuiltImage]]:
    """Two nodes with ``oci:`` stores: ``holder`` holds an image of ``layers`` bytes,
    ``puller`` (given ``extra`` flags) holds nothing and joins it; both stopped after."""
    seeded, empty = tmp_path / "seeded", tmp_path / "empty"
    seeded.mkdir()
    empty.mkdir()
    image = build_image(reference, seeded, layers, seed=seed)
    holder = start_node(f"oci:{seeded}", tmp_path / "holder.log", ("--node-name", "holder"))
    node = None
    try:
        node = start_node(f"oci:{empty}", tmp_path / f"{puller}.log",
                          ("--node-name", puller, "--join", holder.mesh, *extra))
        yield holder, node, image
    finally:
        for running in (node, holder):
            if running is not None:
                stop(running.proc)


def held_epoch(node: RunningNode, member: str) -> int | None:
    """The summary epoch ``node`` holds for ``member`` (None before it has one): how a
    test sees a summary, full or delta, arrive."""
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=5) as r:
        status = json.load(r)
    for entry in status["mesh"]["members"]:
        if entry["name"] == member:
            held = entry["held_epoch"]
            return int(held) if held is not None else None
    return None


def blob_requests(node: RunningNode, digest: str, method: str = "GET") -> list[dict[str, object]]:
    """``node``'s access-log lines for requests of blob ``digest``."""
    return [line for line in node.log_lines()
            if line.get("msg") == "request" and line.get("method") == method
            and str(line.get("path", "")).endswith(f"/blobs/{digest}")]
