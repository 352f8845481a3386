"""A hostile peer on loopback: slow push-pull streams, spoofed packets, and a lag probe.

The bytes are built with msgpack directly, not with ``meshmirror.mesh.wire``, so
the attack does not depend on the codec it attacks. Used by
``test_hostile_peer.py`` and, as ``python -m tests.mesh.net.attack``, to measure
how much a malicious stream costs the attacked node's mesh loop (run it against
any checkout by pointing ``PYTHONPATH`` at it).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import msgpack

from tests.support.metrics import Metrics, scrape
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop

PUSH_PULL = 6
PING = 0
ALIVE = 4
ACK = 2
COMPOUND = 7


def _pack(obj: dict[str, object]) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=False)
    return data


def push_pull_header(nodes: int, user_state_len: int = 0) -> bytes:
    """The start of a plain push-pull stream: type byte and header map."""
    return bytes((PUSH_PULL,)) + _pack({"Nodes": nodes, "UserStateLen": user_state_len,
                                        "Join": False})


def dead_node_state(i: int, meta_size: int = 0) -> bytes:
    """A well-formed node state for a node nobody knows, marked dead: merging it changes nothing."""
    return _pack({"Name": f"ghost-{i:07d}".encode(), "Addr": bytes((10, 99, i >> 8 & 255, i & 255)),
                  "Port": 7946, "Meta": b"m" * meta_size, "Incarnation": 1, "State": 2,
                  "Vsn": bytes((1, 5, 2, 2, 5, 4))})


def alive_packet(name: bytes, addr: bytes, port: int, incarnation: int = 1,
                 meta: bytes = b"") -> bytes:
    """One unencrypted, unlabelled alive message as a UDP datagram."""
    return bytes((ALIVE,)) + _pack({"Incarnation": incarnation, "Node": name, "Addr": addr,
                                    "Port": port, "Meta": meta,
                                    "Vsn": bytes((1, 5, 2, 2, 5, 4))})


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Dripper(threading.Thread):
    """Opens a TCP stream, sends ``head``, then ``body`` at ``rate`` bytes/s until it must stop.

    Stops when the server closes the stream, when ``body`` is exhausted, or after
    ``seconds`` of sending; then waits (at most ``linger`` seconds) for the
    server to close, so ``closed_after`` says when the server dropped it.
    """

    def __init__(self, addr: tuple[str, int], head: bytes, body: bytes, *, rate: float,
                 seconds: float, linger: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.addr, self.head, self.body = addr, head, body
        self.rate, self.seconds, self.linger = rate, seconds, linger
        self.sent = 0
        self.closed_after: float | None = None
        self.reply = b""

    def run(self) -> None:
        sock = socket.create_connection(self.addr, timeout=5)
        start = time.monotonic()
        closed = False
        try:
            sock.sendall(self.head)
            self.sent = len(self.head)
            chunk = max(1, int(self.rate * 0.02))
            while (self.sent - len(self.head) < len(self.body) and not closed
                   and time.monotonic() - start < self.seconds):
                pos = self.sent - len(self.head)
                sock.sendall(self.body[pos:pos + chunk])
                self.sent += len(self.body[pos:pos + chunk])
                time.sleep(max(0.0, start + (pos + chunk) / self.rate - time.monotonic()))
                closed = self._server_closed(sock, 0.0)
            end = time.monotonic() + self.linger
            while not closed and time.monotonic() < end:
                closed = self._server_closed(sock, 0.1)
        except OSError:  # reset or broken pipe: the server dropped us mid-write
            closed = True
        finally:
            sock.close()
        if closed:
            self.closed_after = time.monotonic() - start

    def _server_closed(self, sock: socket.socket, wait: float) -> bool:
        """Whether the server has closed its side; keeps whatever it wrote first."""
        sock.settimeout(wait if wait > 0 else 0.0001)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        finally:
            sock.settimeout(5)
        self.reply += data
        return not data


class Pinger(threading.Thread):
    """Pings a mesh node over UDP every ``interval`` s and records each ack's round trip.

    The node answers pings on its mesh loop, so the round trip is a direct,
    fine-grained reading of that loop's lateness.
    """

    def __init__(self, addr: tuple[str, int], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.addr, self.interval = addr, interval
        self.rtts: list[float] = []
        self.sent = 0
        self._stop_flag = threading.Event()

    def run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.addr[0], 0))
        sock.settimeout(0.001)
        pending: dict[int, float] = {}
        seq = 0
        next_send = time.monotonic()
        while not self._stop_flag.is_set():
            now = time.monotonic()
            if now >= next_send:
                seq += 1
                pending[seq] = now
                sock.sendto(bytes((PING,)) + _pack({"SeqNo": seq, "Node": b""}), self.addr)
                self.sent += 1
                next_send += self.interval
            try:
                data = sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            got = time.monotonic()
            for ack in _acks(data):
                at = pending.pop(ack, None)
                if at is not None:
                    self.rtts.append(got - at)
        sock.close()

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(5)

    def summary(self) -> dict[str, float]:
        rtts = sorted(self.rtts) or [float("nan")]
        return {"sent": self.sent, "answered": len(self.rtts),
                "p50_ms": 1000 * statistics.median(rtts),
                "p99_ms": 1000 * rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))],
                "max_ms": 1000 * rtts[-1]}


def _acks(data: bytes) -> list[int]:
    """Sequence numbers of the acks in one reply datagram (plain or compound)."""
    if not data:
        return []
    if data[0] == ACK:
        try:
            body = msgpack.unpackb(data[1:], raw=True, strict_map_key=False)
        except Exception:
            return []
        return [int(body[b"SeqNo"])] if isinstance(body, dict) and b"SeqNo" in body else []
    if data[0] == COMPOUND and len(data) >= 2:
        count, pos, out = data[1], 2, []
        lengths = [struct.unpack_from(">H", data, pos + 2 * i)[0] for i in range(count)]
        pos += 2 * count
        for length in lengths:
            out += _acks(data[pos:pos + length])
            pos += length
        return out
    return []


def status(node: RunningNode) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=5) as r:
        body: dict[str, object] = json.loads(r.read())
        return body


def alive_members(node: RunningNode) -> set[str]:
    mesh = status(node)["mesh"]
    assert isinstance(mesh, dict)
    return {str(m["name"]) for m in mesh["members"] if m["state"] == "alive"}


def start_cluster(tmp: Path, n: int = 3) -> list[RunningNode]:
    """``n`` ``meshmirror run`` nodes on empty OCI stores, joined into one mesh."""
    nodes: list[RunningNode] = []
    try:
        for i in range(n):
            store = tmp / f"store{i}"
            store.mkdir()
            extra: tuple[str, ...] = ("--node-name", f"n{i}")
            if nodes:
                extra += ("--join", nodes[0].mesh)
            nodes.append(start_node(f"oci:{store}", tmp / f"n{i}.log", extra))
        names = {f"n{i}" for i in range(n)}
        deadline = time.monotonic() + 30
        while not all(_sees(node, names) for node in nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the mesh did not converge in 30 s")
            time.sleep(0.2)
    except BaseException:
        for node in nodes:
            stop(node.proc)
        raise
    return nodes


def _sees(node: RunningNode, names: set[str]) -> bool:
    try:
        return alive_members(node) == names
    except OSError:
        return False


def lag_samples_over(metrics: Metrics, bound: float) -> float:
    """Loop-lag samples above ``bound`` s (a bucket edge), from the lag histogram if exported."""
    count = metrics.get(("meshmirror_mesh_loop_lag_seconds_count", ()))
    below = metrics.get(("meshmirror_mesh_loop_lag_seconds_bucket", (("le", str(bound)),)))
    if count is None or below is None:
        return float("nan")
    return count - below


def total(metrics: Metrics, prefix: str) -> float:
    return sum(v for (name, _), v in metrics.items() if name.startswith(prefix))


def slow_push_pull(claimed: int, user_state: int, budget: int) -> tuple[bytes, bytes]:
    """Header and body of a push-pull: ``claimed`` dead ghosts (as many as fit in
    ``budget`` bytes), then ``user_state`` bytes of filler."""
    states = []
    size = 0
    for i in range(claimed):
        states.append(dead_node_state(i, meta_size=400))
        size += len(states[-1])
        if size >= budget:
            break
    return push_pull_header(claimed, user_state), b"".join(states) + b"u" * user_state


def measure(rate: float, seconds: float, claimed: int, user_state: int) -> dict[str, object]:
    """Three nodes; one slow push-pull at n0; what it cost n0's loop and the mesh."""
    with tempfile.TemporaryDirectory() as tmp:
        nodes = start_cluster(Path(tmp))
        try:
            time.sleep(2)
            before = [scrape(n.metrics) for n in nodes]
            pinger = Pinger(host_port(nodes[0].mesh))
            pinger.start()
            time.sleep(1)
            head, body = slow_push_pull(claimed, user_state, int(rate * seconds))
            attack = Dripper(host_port(nodes[0].mesh), head, body, rate=rate, seconds=seconds)
            t0 = time.monotonic()
            attack.start()
            attack.join(seconds + 30)
            elapsed = time.monotonic() - t0
            time.sleep(1)
            pinger.stop()
            after = [scrape(n.metrics) for n in nodes]
            return {
                "claimed_nodes": claimed, "user_state": user_state, "rate_Bps": rate,
                "sent_bytes": attack.sent,
                "server_closed_after_s": attack.closed_after, "attack_elapsed_s": elapsed,
                "ping": pinger.summary(),
                "loop_lag_over_250ms_during": lag_samples_over(after[0], 0.25)
                - lag_samples_over(before[0], 0.25),
                "loop_lag_over_25ms_during": lag_samples_over(after[0], 0.025)
                - lag_samples_over(before[0], 0.025),
                "suspicions_added": sum(total(a, "meshmirror_mesh_suspicions")
                                        - total(b, "meshmirror_mesh_suspicions")
                                        for a, b in zip(after, before, strict=True)),
                "dropped_after": {f"{name}{dict(labels)}": v
                                  for (name, labels), v in after[0].items()
                                  if name.startswith("meshmirror_mesh_dropped")},
            }
        finally:
            for node in nodes:
                stop(node.proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=500_000, help="bytes per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--claimed", type=int, default=1_000_000)
    parser.add_argument("--user-state", type=int, default=0, help="declared user state bytes")
    args = parser.parse_args()
    print(json.dumps(measure(args.rate, args.seconds, args.claimed, args.user_state), indent=1))


if __name__ == "__main__":
    main()
