"""The asyncio adapter that runs the sans-IO membership core on real sockets.

``MeshNode`` owns one thread with its own event loop, because gossip timing
must not share a loop with bulk blob streaming. Measured on the loop of a
registry streaming and hashing large blobs, a UDP responder answered in 0.6 s at
the median, past memberlist's 500 ms probe timeout, so healthy nodes would be
declared dead; on a loop of its own it answers in well under a millisecond
(tests/e2e/test_gossip_streaming.py holds the whole node to this). On that
loop it binds UDP and TCP on one port, feeds datagrams and stream messages
into ``state.Memberlist``, carries out the effects the core asks for, and
calls ``tick`` at ``next_deadline()``. Every other thread talks to it through
the thread-safe methods below; membership events reach the caller's own loop
through ``subscribe()``.

``python -m meshmirror.mesh`` runs one bare MeshNode that prints membership
events as JSON lines, for the multi-process tests; ``meshmirror run`` wires one
into the node through `meshmirror.peering`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshmirror import eventloop
from meshmirror.addresses import bind_socket, is_wildcard, parse_host_port, sendable, unmapped
from meshmirror.mesh import wire
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import (
    Address,
    Delegate,
    Effect,
    JoinResult,
    MemberJoined,
    MemberLeft,
    MemberUpdated,
    NodeInfo,
    OpenStream,
    SendPacket,
    UserMessage,
)
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.messages import ErrResp, Message, NodeState
from meshmirror.mesh.state import KEY_MISMATCH_REASONS, Memberlist

log = logging.getLogger(__name__)

MembershipEvent = MemberJoined | MemberUpdated | MemberLeft | UserMessage | JoinResult

# Bounds on inbound TCP so one slow or hostile peer cannot pin memory or tasks.
MAX_INBOUND_STREAMS = 128
STREAM_READ_CHUNK = 8 * 1024
"""Bytes parsed per step of a stream before the loop turns to other work: the
costliest step (inflating LZW) takes about 3 ms for this much input."""
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class MeshError(RuntimeError):
    """The mesh could not start (address in use, bad advertise address, ...)."""


@dataclass
class TransportStats:
    """Socket-level counters for the Prometheus collector (plain ints, read unlocked)."""

    udp_packets_sent: int = 0
    udp_bytes_sent: int = 0
    udp_packets_received: int = 0
    udp_bytes_received: int = 0
    udp_send_errors: int = 0
    tcp_streams_accepted: int = 0
    tcp_streams_rejected: int = 0
    tcp_streams_opened: int = 0
    tcp_bytes_sent: int = 0
    tcp_bytes_received: int = 0
    tcp_errors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    join_attempts: int = 0
    loop_lag_counts: list[int] = field(default_factory=lambda: [0] * (len(LOOP_LAG_BUCKETS) + 1))
    """Lag samples per bucket of ``LOOP_LAG_BUCKETS`` (last: above them all), not cumulative."""
    loop_lag_sum: float = 0.0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def observe_lag(self, lag: float) -> None:
        self.loop_lag_sum += lag
        self.loop_lag_counts[bisect.bisect_left(LOOP_LAG_BUCKETS, lag)] += 1


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, node: MeshNode) -> None:
        self._node = node

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._node._on_datagram(data, (unmapped(str(addr[0])), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead peer lands here; SWIM handles it by timeout.
        self._node.transport_stats.udp_send_errors += 1


class MeshNode:
    """One mesh member on real sockets, on its own thread and event loop."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        name: str,
        bind: Address,
        advertise: Address | None = None,
        meta: bytes = b"",
        keyring: Keyring | None = None,
        delegate: Delegate | None = None,
        join: Sequence[Address] = (),
        join_dns: str | None = None,
        rng: random.Random | None = None,
        join_retry_max: float = 30.0,
        leave_timeout: float = 3.0,
        reconnect_interval: float = 10.0,
    ) -> None:
        self.config = config
        self.name = name
        self._bind = bind
        self._advertise = advertise
        self._meta = meta
        self._keyring = keyring
        self._delegate = delegate
        self._join = list(join)
        self._join_dns = join_dns
        self._rng = rng or random.Random()
        self._join_retry_max = join_retry_max
        self._leave_timeout = leave_timeout
        self._reconnect_interval = reconnect_interval
        self.transport_stats = TransportStats()
        self._core: Memberlist | None = None
        self._core_lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_family: int = socket.AF_INET
        self._tcp: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbound = 0
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[MembershipEvent]]]
        self._subscribers = []
        self._listeners: list[Callable[[MembershipEvent], None]] = []
        self._sub_lock = threading.Lock()
        self._joined = threading.Event()
        self.address: Address = bind

    # ------------------------------------------------------------ public API

    def start(self, timeout: float = 10.0) -> None:
        """Bind sockets and start the mesh thread; raises MeshError if binding fails."""
        if self._thread is not None:
            raise MeshError("mesh node already started")
        self._thread = threading.Thread(target=self._run, name=f"mesh-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise MeshError("mesh thread did not start in time")
        if self._start_error is not None:
            self._thread.join(timeout)
            raise MeshError(f"mesh: cannot start: {self._start_error}") from self._start_error

    def stop(self, *, leave: bool = True, timeout: float = 10.0) -> None:
        """Leave gracefully (unless ``leave`` is False), close sockets, end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._begin_stop, leave)
        thread.join(timeout)

    def leave(self, timeout: float = 10.0) -> None:
        self.stop(leave=True, timeout=timeout)

    def members(self, *, include_dead: bool = False) -> list[NodeInfo]:
        core = self._core
        if core is None:
            return []
        with self._core_lock:
            return core.members(include_dead=include_dead)

    @property
    def incarnation(self) -> int:
        core = self._core
        if core is None:
            return 0
        with self._core_lock:
            return core.incarnation

    def wait_joined(self, timeout: float) -> bool:
        """True once a join reached at least one peer (or there was nothing to join)."""
        return self._joined.wait(timeout)

    def update_meta(self, meta: bytes) -> None:
        self._call(lambda core, now: core.update_meta(meta, now))

    def send_user(self, node_name: str, payload: bytes) -> None:
        self._call(lambda core, now: core.send_user(node_name, payload))

    def broadcast_user(self, payload: bytes) -> None:
        self._call(lambda core, now: core.broadcast_user(payload))

    def subscribe(self) -> asyncio.Queue[MembershipEvent]:
        """A queue on the caller's running loop that receives every membership event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[MembershipEvent] = asyncio.Queue()
        with self._sub_lock:
            self._subscribers.append((loop, queue))
        return queue

    def add_listener(self, fn: Callable[[MembershipEvent], None]) -> None:
        """Call ``fn`` on the mesh thread for each event; it must be quick and thread-safe."""
        with self._sub_lock:
            self._listeners.append(fn)

    def _remove_listener(self, fn: Callable[[MembershipEvent], None]) -> None:
        with self._sub_lock, contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    # ------------------------------------------------------------ mesh thread

    def _run(self) -> None:
        loop = eventloop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as err:  # reported to start(); the thread must not die silently
            if not self._ready.is_set():
                self._start_error = err
                self._ready.set()
            else:
                log.exception("mesh %s: event loop failed", self.name)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self._bind_sockets()
        adv_host, adv_port = self._advertise_address()
        with self._core_lock:
            self._core = Memberlist(
                self.config, name=self.name, addr=adv_host, port=adv_port, meta=self._meta,
                rng=self._rng, now=loop.time(), keyring=self._keyring, delegate=self._delegate)
        self._ready.set()
        self._kick()
        if self._join or self._join_dns:
            self._spawn(self._join_loop())
        else:
            self._joined.set()
        self._spawn(self._lag_monitor())
        if self._reconnect_interval > 0:
            self._spawn(self._reconnect_loop())
        await self._stopping.wait()

    async def _bind_sockets(self) -> None:
        """TCP and UDP on the same port; port-only binds both families (addresses.py)."""
        loop = asyncio.get_running_loop()
        host, port = self._bind
        last: OSError | None = None
        for _ in range(20 if port == 0 else 1):
            tcp_sock = bind_socket(host, port, socket.SOCK_STREAM)
            try:
                tcp_sock.listen(128)
                tcp_sock.setblocking(False)
                tcp = await asyncio.start_server(self._on_connection, sock=tcp_sock)
            except BaseException:
                tcp_sock.close()
                raise
            actual = int(tcp.sockets[0].getsockname()[1])
            try:
                udp_sock = bind_socket(host, actual, socket.SOCK_DGRAM)
                udp_sock.setblocking(False)
                udp, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=udp_sock)
            except OSError as err:  # UDP half of an ephemeral port taken: try another
                last = err
                tcp.close()
                await tcp.wait_closed()
                continue
            self._tcp, self._udp = tcp, udp
            self._udp_family = udp_sock.family
            self.address = (host, actual)
            return
        raise MeshError(f"cannot bind UDP on {host}: {last}")

    def _advertise_address(self) -> Address:
        host, port = self._advertise or self.address
        if self._advertise is not None and port == 0:
            port = self.address[1]
        if is_wildcard(host):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError as err:
                raise MeshError("bind address is a wildcard and the host name does not "
                                "resolve; set --advertise-addr") from err
        try:
            wire_addr = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except OSError as err:
            raise MeshError(f"advertise address {host!r} is not an IP address") from err
        del wire_addr
        return host, port

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_undecryptable(self, err: wire.WireError, host: str) -> None:
        core = self._core
        if core is not None and err.reason in KEY_MISMATCH_REASONS:
            with self._core_lock:
                core.stats.undecryptable.record(host, self._now())

    def undecryptable(self) -> tuple[dict[str, int], float | None]:
        """Undecryptable gossip by source, and seconds since the latest (None: never).

        For the status page, read from another thread: the loop's clock is
        ``time.monotonic``, so the age is taken against that.
        """
        core = self._core
        if core is None:
            return {}, None
        with self._core_lock:
            seen = core.stats.undecryptable
            last = seen.last
            return dict(seen.by_source), None if last is None else time.monotonic() - last

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _call(self, fn: Callable[[Memberlist, float], None]) -> None:
        loop = self._loop
        if loop is None:
            raise MeshError("mesh node is not running")

        def run() -> None:
            core = self._core
            if core is None:
                return
            with self._core_lock:
                fn(core, self._now())
            self._kick()

        loop.call_soon_threadsafe(run)

    def _kick(self) -> None:
        """Carry out queued effects and re-arm the timer for the core's next deadline."""
        core = self._core
        if core is None:
            return
        with self._core_lock:
            effects = core.drain()
            deadline = core.next_deadline()
        for effect in effects:
            self._execute(effect)
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = deadline
            if deadline is not None and self._loop is not None:
                self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        core = self._core
        if core is None:
            return
        with self._core_lock:
            core.tick(self._now())
        self._kick()

    def _execute(self, effect: Effect) -> None:
        if isinstance(effect, SendPacket):
            self._send_packet(effect)
        elif isinstance(effect, OpenStream):
            self._spawn(self._outbound_stream(effect))
        else:
            if isinstance(effect, JoinResult) and effect.contacted > 0:
                self._joined.set()
            self._publish(effect)

    def _send_packet(self, effect: SendPacket) -> None:
        udp = self._udp
        if udp is None or udp.is_closing():
            return
        try:
            udp.sendto(effect.data, (sendable(self._udp_family, effect.addr[0]), effect.addr[1]))
        except OSError:
            self.transport_stats.udp_send_errors += 1
            return
        self.transport_stats.udp_packets_sent += 1
        self.transport_stats.udp_bytes_sent += len(effect.data)

    def _publish(self, event: MembershipEvent) -> None:
        with self._sub_lock:
            subscribers = list(self._subscribers)
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(event)
            except Exception:
                log.exception("mesh %s: membership listener failed", self.name)
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # that loop is closed: drop silently
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def _on_datagram(self, data: bytes, source: Address) -> None:
        core = self._core
        if core is None:
            return
        self.transport_stats.udp_packets_received += 1
        self.transport_stats.udp_bytes_received += len(data)
        with self._core_lock:
            core.packet_received(data, source, self._now())
        self._kick()

    # ------------------------------------------------------------ TCP streams

    def _label(self) -> bytes:
        return self.config.label.encode()

    async def _read_message(self, reader: asyncio.StreamReader, deadline: float,
                            decoder: wire.StreamDecoder) -> Message:
        """One stream message, read and parsed a few kilobytes per loop step.

        A hostile peer can send fast or slow, but each step parses at most
        ``STREAM_READ_CHUNK`` bytes and then yields, even when more is already
        buffered, so probes and gossip never wait behind a stream; the whole
        read is bounded by ``deadline``.
        """
        while True:
            remaining = deadline - self._now()
            if remaining <= 0:
                raise TimeoutError("stream read timed out")
            chunk = await asyncio.wait_for(reader.read(STREAM_READ_CHUNK), remaining)
            if not chunk:
                decoder.eof()
            self.transport_stats.tcp_bytes_received += len(chunk)
            msg = decoder.feed(chunk)
            if msg is not None:
                return msg
            await asyncio.sleep(0)

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        stats = self.transport_stats
        if self._inbound >= MAX_INBOUND_STREAMS or self._core is None:
            stats.tcp_streams_rejected += 1
            writer.close()
            return
        self._inbound += 1
        stats.tcp_streams_accepted += 1
        peer = writer.get_extra_info("peername") or ("", 0)
        source: Address = (unmapped(str(peer[0])), int(peer[1]))
        decoder = wire.StreamDecoder(self._keyring, self._label())
        try:
            deadline = self._now() + self.config.tcp_timeout
            try:
                msg = await self._read_message(reader, deadline, decoder)
            except TimeoutError:
                stats.drop("timeout")
                return
            except wire.WireError as err:
                stats.drop(err.reason)
                self._count_undecryptable(err, source[0])
                if err.reason not in ("truncated",):
                    await self._write(writer, wire.encode_stream(
                        ErrResp(str(err)), keyring=self._keyring, label=self._label()))
                return
            finally:
                for rejected in decoder.rejected:
                    stats.drop(rejected.reason)
            core = self._core
            with self._core_lock:
                reply = core.stream_received(msg, source, self._now())
            self._kick()
            if reply is not None:
                await self._write(writer, reply)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            stats.tcp_errors += 1
        finally:
            self._inbound -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.config.tcp_timeout)
        self.transport_stats.tcp_bytes_sent += len(data)

    async def _outbound_stream(self, effect: OpenStream) -> None:
        stats = self.transport_stats
        stats.tcp_streams_opened += 1
        reply: Message | None = None
        deadline = self._now() + effect.timeout
        writer: asyncio.StreamWriter | None = None
        try:
            # Dial from the bound address when there is one, so peers (and
            # firewalls) see the same source address for our TCP as for our UDP.
            host = self.address[0]
            local = None if is_wildcard(host) else (host, 0)
            reader, conn = await asyncio.wait_for(
                asyncio.open_connection(effect.addr[0], effect.addr[1], local_addr=local),
                effect.timeout)
            writer = conn
            await self._write(conn, effect.data)
            decoder = wire.StreamDecoder(self._keyring, self._label())
            try:
                reply = await self._read_message(reader, deadline, decoder)
            finally:
                for rejected in decoder.rejected:
                    stats.drop(rejected.reason)
        except wire.WireError as err:
            stats.drop(err.reason)
            self._count_undecryptable(err, effect.addr[0])
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            stats.tcp_errors += 1
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        core = self._core
        if core is None:
            return
        with self._core_lock:
            core.stream_reply(effect.stream_id, reply, self._now())
        self._kick()

    # ------------------------------------------------------------ join, stop

    async def _resolve_seeds(self) -> list[Address]:
        loop = asyncio.get_running_loop()
        seeds: list[Address] = []
        names: list[Address] = list(self._join)
        if self._join_dns:
            names.append(parse_host_port(self._join_dns, default_port=self.address[1]))
        for host, port in names:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as err:
                log.warning("mesh %s: cannot resolve %s: %s", self.name, host, err)
                continue
            for info in infos:
                addr = (str(info[4][0]), int(info[4][1]))
                if addr not in seeds and addr != self._advertise_address():
                    seeds.append(addr)
        return seeds

    async def _join_loop(self) -> None:
        """Join, retrying with capped exponential backoff until one seed answers."""
        delay = 0.5
        queue: asyncio.Queue[JoinResult] = asyncio.Queue()

        def on_result(ev: MembershipEvent) -> None:
            if isinstance(ev, JoinResult):
                queue.put_nowait(ev)

        self.add_listener(on_result)
        assert self._stopping is not None
        while not self._stopping.is_set():
            self.transport_stats.join_attempts += 1
            seeds = await self._resolve_seeds()
            if seeds:
                core = self._core
                assert core is not None
                with self._core_lock:
                    core.join(seeds, self._now())
                self._kick()
                result = await queue.get()
                if result.contacted > 0:
                    self._remove_listener(on_result)
                    log.info("mesh %s: joined via %d of %d seeds", self.name,
                             result.contacted, len(seeds))
                    return
                log.warning("mesh %s: join failed, retrying in %.1fs: %s", self.name, delay,
                            "; ".join(result.errors))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, self._join_retry_max)

    async def _reconnect_loop(self) -> None:
        """Push-pull with one failed member now and then, as Serf's reconnect does.

        memberlist alone never probes a dead member again, so after a full
        partition outlasts gossip_to_the_dead_time the halves would stay apart
        for good. A push-pull to a failed member that is back merges them.
        """
        assert self._stopping is not None
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._reconnect_interval)
            core = self._core
            if core is None or self._stopping.is_set():
                return
            with self._core_lock:
                failed = [m for m in core.members(include_dead=True)
                          if m.state == NodeState.DEAD]
                if failed:
                    target = self._rng.choice(failed)
                    core.join([(target.addr, target.port)], self._now())
            if failed:
                self._kick()

    async def _lag_monitor(self) -> None:
        """Track how late the mesh loop wakes up: a late wake-up is a late probe answer."""
        assert self._stopping is not None
        while not self._stopping.is_set():
            before = self._now()
            await asyncio.sleep(0.1)
            self.transport_stats.observe_lag(max(0.0, self._now() - before - 0.1))

    def _begin_stop(self, leave: bool) -> None:
        self._spawn(self._shutdown(leave))

    async def _shutdown(self, leave: bool) -> None:
        core = self._core
        if core is not None and leave:
            with self._core_lock:
                core.leave(self._now())
            self._kick()
            end = self._now() + self._leave_timeout
            while self._now() < end:
                with self._core_lock:
                    done = core.leave_broadcast_done
                if done:
                    break
                await asyncio.sleep(0.05)
        if core is not None:
            with self._core_lock:
                core.stop()
        if self._timer is not None:
            self._timer.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        current = asyncio.current_task()
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=2.0)
        assert self._stopping is not None
        self._stopping.set()
