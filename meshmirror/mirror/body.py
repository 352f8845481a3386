"""Reading a peer's response body off the event loop.

The mirror's event loop has to write every byte to the client; when it also read
them from the peer through aiohttp (transport reads, buffer feeding, joins) it sat
at 100% of a core while the hashing threads idled. Once a large blob's response
has good headers, `take_over` lifts its socket out of aiohttp and a `BodyPump`
reads and hashes the rest on two threads, handing finished chunks to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import queue
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import aiohttp

from meshmirror.mirror.budget import MemoryBudget
from meshmirror.mirror.errors import FailureReason, PeerFailure, SinkFailure


class Progress:
    """Whether a peer body keeps up a minimum rate, judged on the time spent waiting for it.

    A per-read timeout alone lets a peer that drips a byte just inside it hold a
    request for ever. Instead every ``window`` seconds of waiting on the peer
    (time spent waiting for our own client or for memory is not counted) must
    have brought ``min_rate * window`` bytes; reads are bounded by ``window``
    too, so a stalled or dripping peer is found out within two windows.
    """

    __slots__ = ("_bytes", "_min_rate", "_waited", "_window")

    def __init__(self, min_rate: float, window: float) -> None:
        self._min_rate = min_rate
        self._window = window
        self._bytes = 0
        self._waited = 0.0

    def check(self, received: int, waited: float) -> PeerFailure | None:
        """Account one read of ``received`` bytes that waited ``waited`` seconds; a
        failure when the window that just closed fell short of the rate."""
        self._bytes += received
        self._waited += waited
        if self._waited < self._window:
            return None
        rate = self._bytes / self._waited
        self._bytes, self._waited = 0, 0.0
        if rate < self._min_rate:
            return PeerFailure(FailureReason.SLOW,
                               f"{rate:.0f} B/s, below {self._min_rate:.0f} B/s")
        return None


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_F_SETPIPE_SZ = 1031  # Linux's fcntl for a pipe's capacity (not in Python 3.11's fcntl)
# splice(2) answers these when the socket or the file cannot splice: receive instead.
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})
# How often a reader waiting for its hashing thread to free a buffer looks at `stop`.
_BUFFER_POLL_S = 0.05


def map_large_chunks(threshold: int = 1024 * 1024) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own.

    Body chunks are megabytes, allocated on body threads (each with its own
    malloc arena) and freed on the loop. By default glibc raises its mmap
    threshold to the size of the first such chunk freed and serves later ones
    from the arenas, which then keep the freed megabytes: a burst measured
    +250 MiB of RSS while the chunks alive stayed within the memory budget.
    A fixed threshold returns each chunk to the system when it is freed.
    False where the C library is not glibc (nothing changes there).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def take_over(response: aiohttp.ClientResponse) -> tuple[bytes, socket.socket] | None:
    """The body bytes aiohttp has buffered and a private socket for the rest.

    The response is closed here, so aiohttp never touches the connection again
    (it is not pooled: a half-read body cannot be reused). The socket is a
    duplicate descriptor: the connection lives until it is closed too. None,
    with nothing consumed, when the body is not a plain Content-Length one or
    aiohttp holds bytes it has not parsed yet.
    """
    connection = response.connection
    if connection is None or connection.transport is None or connection.protocol is None:
        return None
    if response.content_length is None or "Transfer-Encoding" in response.headers:
        return None
    if getattr(connection.protocol, "_tail", b"") or response.content.exception() is not None:
        return None
    raw = connection.transport.get_extra_info("socket")
    if raw is None:
        return None
    try:
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
    except OSError:
        return None
    buffered: list[bytes] = []
    while data := response.content.read_nowait(-1):
        buffered.append(data)
    response.close()
    return b"".join(buffered), sock


Chunk = bytes | memoryview
"""A body chunk as `BodyPump` hands it to ``keep`` and ``consume``: a memoryview of a
buffer the pump reuses, for a kept body."""

BodyItem = bytes | int | PeerFailure | SinkFailure | None
"""What the loop gets from a pump: a chunk, or only its length when ``keep`` already
holds it, then ``None`` at the end or a failure."""


@runtime_checkable
class FileKeep(Protocol):
    """A keep whose bytes go to a file, appended at ``written``: the pump can splice
    the socket straight into it (`BodyPump`) instead of receiving and writing."""

    @property
    def written(self) -> int: ...

    def fileno(self) -> int: ...

    def appended(self, size: int) -> None:
        """``size`` more bytes were written to the file at ``written``, by the pump."""
        ...


class _Unspliceable(Exception):
    """The socket cannot be spliced from, or the file into: receive the body instead."""


class _Landed:
    """Bytes [start, end) of the file of a `FileKeep`, spliced there, to hash."""

    __slots__ = ("end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end


class BodyPump:
    """Reads and consumes (hashes, maybe spools) one peer response's body on two threads.

    A reader thread fills each chunk with one blocking ``recv(MSG_WAITALL)``, GIL
    released, and hands it to ``keep`` (the cache entry, when the blob is held
    until verified); a hashing thread passes it to ``consume`` and queues it for
    the loop, which only forwards or counts. Reading (and keeping) overlaps
    hashing: sha256 is the slowest step, so it gets a thread to itself.

    - A body kept in a file (``into``, the hop's hot path: a blob-cache entry) never
      passes through Python: the reader splices it from the socket into a pipe and
      from the pipe into the file at ``into.written`` (the kernel's single copy,
      straight into the page cache), and the hashing thread reads each landed
      range back into one reused buffer and hashes it. A receive and a write cost
      two copies on one thread, and that thread, not sha256, bounded the hop. The
      file holds what is not hashed yet, so the reader needs no read-ahead slot:
      the pump takes one chunk from the budget for its life (half the pipe's
      capacity, half the hashing buffer). Where splice is refused (no
      ``os.splice``, a socket that cannot splice) the body is received instead.
    - Other kept bodies are received into ``read_ahead`` buffers
      that the pump reuses, as memoryviews: ``keep`` and ``consume`` must copy what
      they hold on to. A fresh chunk per read cost the kernel a page fault and a
      page clear per 4 KiB (11% of a hop's CPU) and came cache-cold to the file
      write and the hash; a reused one is still in the CPU's cache for both. A
      streamed body's chunks go on to the client, so each is its own ``bytes``.

    - Back-pressure: the reader reads a chunk only when it holds one of
      ``read_ahead`` slots; the loop gives a slot back once the chunk it yielded
      has been consumed, so memory stays at a few chunks per stream. A chunk that
      ``keep`` holds (a blob-cache file) gives its slot back once hashed, and the
      loop is told only its length: a fetch into the cache runs at the pace of
      the peer and the hash, whatever else the loop is doing.
    - Stall bound: ``SO_RCVTIMEO`` makes a read wait at most ``stall_timeout``
      (with no byte it fails; with some it returns them), and a `Progress` fails
      the body when a window of waiting brought less than ``min_rate``.
    - Memory: each chunk is taken from the node's `MemoryBudget` before it is
      read and given back when the loop is done with it (or the pump ends); a
      reused buffer is taken when it is made and given back when the pump ends.
    - Cancellation: `stop` shuts the socket down, which wakes a blocked ``recv``,
      and frees a slot, which wakes a reader waiting for one; the reader always
      ends by queueing a final item, which ends the hashing thread. The socket is
      closed on the loop once the reader has returned (`PeerClient.pump`).
    - Items on ``items``: consumed chunks in order, then ``None`` at the end of the
      body, or a `PeerFailure` after the last good chunk, or a `SinkFailure` when
      ``keep`` or ``consume`` raised (nothing after it is consumed).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        prefix: bytes,
        length: int,
        *,
        chunk_size: int,
        stall_timeout: float,
        min_rate: float,
        budget: MemoryBudget,
        consume: Callable[[Chunk], None],
        keep: Callable[[Chunk], None] | None = None,
        into: FileKeep | None = None,
        read_ahead: int,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._prefix = prefix
        self._length = length
        self._chunk_size = chunk_size
        self._stall_timeout = stall_timeout
        self._progress = Progress(min_rate, stall_timeout)
        self._budget = budget
        # Budget taken per chunk not yet consumed by the loop, oldest first; given
        # back by `consumed`, the rest by whichever of reader and loop ends last.
        self._held: deque[int] = deque()
        self._held_lock = threading.Lock()
        self._ended: set[str] = set()
        self._consume = consume
        self._keep = keep
        self._into = into if keep is not None and hasattr(os, "splice") else None
        # The spliced path's pipe capacity and hashing buffer, one chunk together.
        self._piece = max(64 * 1024, chunk_size // 2)
        # The pump's own descriptor of ``into``'s file, made by the reader, closed by
        # the hashing thread when it ends: a cancelled fetch's entry may close its file
        # while the threads still run, and a reused descriptor number must never
        # receive these bytes.
        self._file: int | None = None
        self._remaining = length
        self._slots = threading.Semaphore(max(1, read_ahead))
        # Kept bodies only: buffers free for the reader (at most one per slot, made
        # on first need; a hashed one comes back before its slot is released).
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.buffers_made = 0
        self._to_hash: queue.SimpleQueue[Chunk | _Landed | BodyItem] = queue.SimpleQueue()
        self._stopping = False
        self.items: asyncio.Queue[BodyItem] = asyncio.Queue()

    def consumed(self) -> None:
        """The loop is done with one chunk: its memory goes back, the reader may read another."""
        with self._held_lock:
            size = self._held.popleft() if self._held else 0
        self._budget.give(size)
        self._slots.release()

    def ended(self, side: str) -> None:
        """``side`` ("reader" or "loop") is done with this body; once both are, the
        memory of chunks never consumed goes back to the budget."""
        with self._held_lock:
            self._ended.add(side)
            if len(self._ended) < 2:
                return
            rest = sum(self._held)
            self._held.clear()
        self._budget.give(rest)

    def _take(self, size: int) -> bool:
        """Room in the budget for a chunk of ``size`` bytes; False once stopping."""
        if not self._budget.take_blocking(size, lambda: self._stopping):
            return False
        with self._held_lock:
            self._held.append(self._budget.clamp(size))
        return True

    def stop(self) -> None:
        """Make both threads return soon, whatever they are blocked on."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._slots.release()

    def abandon(self) -> None:
        """No reader will run (the executor is shut down): end with a failure."""
        self.ended("reader")
        self._to_hash.put(PeerFailure(FailureReason.BROKEN, "mirror closed"))

    def _post(self, item: BodyItem) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
            self._loop.call_soon_threadsafe(self.items.put_nowait, item)

    def hash(self) -> None:
        """The consuming thread: consume each chunk in order, then pass it to the loop."""
        hashing: bytearray | None = None
        while True:
            item = self._to_hash.get()
            if isinstance(item, _Landed):
                if self._stopping:
                    continue
                if hashing is None:
                    hashing = bytearray(self._piece)
                try:
                    self._hash_landed(item, memoryview(hashing))
                except Exception as err:
                    self._post(SinkFailure.of(err))
                    self.stop()
                    continue
                self._post(item.end - item.start)
                continue
            if not isinstance(item, bytes | memoryview):
                if not self._stopping:
                    self._post(item)
                if self._file is not None:
                    os.close(self._file)
                    self._file = None
                return
            if self._stopping:
                self._recycle(item)
                continue
            try:
                self._consume(item)
            except Exception as err:  # the loop gives up on this body; drain the reader
                self._post(SinkFailure.of(err))
                self._recycle(item)
                self.stop()
                continue
            if self._keep is None:
                assert isinstance(item, bytes)
                self._post(item)
                continue
            # Kept and hashed: the loop needs only the count, so the chunk's buffer and
            # slot go back now and the reader never waits on a busy loop.
            size = len(item)
            if self._recycle(item):
                self._slots.release()  # its budget stays with the buffer
            else:
                self.consumed()  # the prefix, a chunk of its own
            self._post(size)

    def _hash_landed(self, landed: _Landed, buffer: memoryview) -> None:
        """Hash what the reader spliced into the file, read back through ``buffer``."""
        fd = self._file
        assert fd is not None
        position = landed.start
        while position < landed.end:
            got = os.preadv(fd, [buffer[:min(len(buffer), landed.end - position)]], position)
            if got <= 0:
                raise SinkFailure(f"cache file ended at byte {position}")
            self._consume(buffer[:got])
            position += got

    def _recycle(self, item: Chunk) -> bool:
        """Give a received buffer back to the reader; False for a chunk of its own."""
        if not isinstance(item, memoryview):
            return False
        buffer = item.obj
        with contextlib.suppress(BufferError):  # a slice still alive: garbage soon
            item.release()
        assert isinstance(buffer, bytearray)
        self._free.put(buffer)
        return True

    def _buffer(self) -> bytearray | None:
        """A buffer for the next chunk of a kept body; None once stopping.

        A free one if any; else a new one while the budget has room now (the first
        one waits for room). Otherwise the reader waits for the hashing thread to
        give one back rather than for the budget: a pump waiting for budget while
        holding buffers could wait on another pump doing the same.
        """
        while True:
            with contextlib.suppress(queue.Empty):
                return self._free.get_nowait()
            if self._stopping:
                return None
            if self.buffers_made == 0:
                if not self._take(self._chunk_size):
                    return None
            elif self._budget.try_take(self._chunk_size):
                with self._held_lock:
                    self._held.append(self._budget.clamp(self._chunk_size))
            else:
                with contextlib.suppress(queue.Empty):
                    return self._free.get(timeout=_BUFFER_POLL_S)
                continue
            self.buffers_made += 1
            return bytearray(self._chunk_size)

    def read(self) -> None:
        """The reader thread; it always ends by queueing one final item."""
        end: BodyItem = PeerFailure(FailureReason.BROKEN, "stopped")
        try:
            end = self._read()
        except Exception as err:  # reported to the loop, which fails over
            end = PeerFailure(FailureReason.BROKEN, f"body thread: {err!r}")
        finally:
            self.ended("reader")
            self._to_hash.put(end)

    def _read(self) -> BodyItem:
        sock = self._sock
        sock.settimeout(None)  # blocking; SO_RCVTIMEO below bounds each wait
        seconds = max(self._stall_timeout, 0.001)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_RCVTIMEO,
            struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)),
        )
        if self._prefix:
            self._slots.acquire()
            if not self._take(len(self._prefix)):
                return None
            self._remaining -= len(self._prefix)
            if (failure := self._kept(self._prefix)) is not None:
                return failure
            self._to_hash.put(self._prefix)
        if self._into is not None and self._remaining > 0:
            with contextlib.suppress(_Unspliceable):
                return self._splice(self._into)
        return self._receive()

    def _splice(self, into: FileKeep) -> BodyItem:
        """The rest of the body from the socket into ``into``'s file through a pipe.

        Raises `_Unspliceable`, with nothing read and nothing taken, when the socket
        refuses to splice; when the file does, once the bytes read are kept (`_unspliced`).
        """
        if not self._take(self._chunk_size):
            return None
        try:
            target = os.dup(into.fileno())
        except (OSError, ValueError) as err:  # closed: the fetch is being dropped
            return SinkFailure.of(err)
        try:
            pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC)
        except OSError as err:
            os.close(target)
            self._give_last()
            raise _Unspliceable from err
        self._file = target
        start = landed = offset = into.written
        first = True
        try:
            capacity = self._piece
            try:
                capacity = fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, capacity)
            except OSError:
                capacity = 64 * 1024  # the default capacity (pipe-max-size is lower)
            source = self._sock.fileno()
            while self._remaining > 0:
                if self._stopping:
                    return None
                started = time.monotonic()
                try:
                    got = os.splice(source, pipe_in, min(capacity, self._remaining))
                except (BlockingIOError, TimeoutError):
                    return PeerFailure(FailureReason.STALLED,
                                       f"no byte within {self._stall_timeout:g} s")
                except OSError as err:
                    if first and err.errno in _NO_SPLICE:
                        self._file = None
                        os.close(target)
                        self._give_last()
                        raise _Unspliceable from err
                    return PeerFailure(FailureReason.BROKEN, str(err))
                first = False
                if not got:
                    return PeerFailure(FailureReason.BROKEN, "body ended")
                if (slow := self._progress.check(got, time.monotonic() - started)) is not None:
                    return slow
                spliced = got
                try:
                    while got:
                        moved = os.splice(pipe_out, target, got, offset_dst=offset)
                        if not moved:
                            raise SinkFailure(f"the cache file took no byte at {offset}")
                        into.appended(moved)
                        offset += moved
                        got -= moved
                        self._remaining -= moved
                except OSError as err:
                    if offset == start and err.errno in _NO_SPLICE:
                        return self._unspliced(pipe_out, got)
                    return SinkFailure.of(err)
                except Exception as err:
                    return SinkFailure.of(err)
                # Hashed a piece at a time, or as soon as the peer is slower than us.
                if offset - landed >= self._piece or spliced < capacity:
                    self._to_hash.put(_Landed(landed, offset))
                    landed = offset
            return None
        finally:
            if offset > landed:  # every byte kept is hashed and counted, failure or not
                self._to_hash.put(_Landed(landed, offset))
            os.close(pipe_in)
            os.close(pipe_out)

    def _unspliced(self, pipe_out: int, size: int) -> BodyItem:
        """The file refused splice before taking a byte (EINVAL from some FUSE and
        overlay setups): the ``size`` bytes already in the pipe are kept and hashed as
        a received chunk (on the budget `_splice` took), then raises `_Unspliceable`
        so `_receive` goes on with the rest."""
        if self._file is not None:
            os.close(self._file)
        self._file = None
        chunk = b""
        while len(chunk) < size:
            piece = os.read(pipe_out, size - len(chunk))
            if not piece:
                return SinkFailure(f"the pipe gave {len(chunk)} of {size} bytes")
            chunk += piece
        self._slots.acquire()
        self._remaining -= size
        if (failure := self._kept(chunk)) is not None:
            return failure
        self._to_hash.put(chunk)
        raise _Unspliceable

    def _give_last(self) -> None:
        """Give back the budget `_take` took last (splicing turned out impossible)."""
        with self._held_lock:
            size = self._held.pop() if self._held else 0
        self._budget.give(size)

    def _receive(self) -> BodyItem:
        """The rest of the body through ``recv``, chunk by chunk."""
        sock = self._sock
        while self._remaining > 0:
            self._slots.acquire()
            size = min(self._chunk_size, self._remaining)
            if self._stopping:
                return None
            buffer: bytearray | None = None
            if self._keep is not None:
                if (buffer := self._buffer()) is None:
                    return None
            elif not self._take(size):
                return None
            started = time.monotonic()
            chunk: Chunk
            try:
                # With MSG_WAITALL a read that times out returns what it got so far.
                if buffer is None:
                    chunk = sock.recv(size, socket.MSG_WAITALL)
                    received = len(chunk)
                else:
                    view = memoryview(buffer)
                    received = sock.recv_into(view, size, socket.MSG_WAITALL)
                    chunk = view[:received]
            except (BlockingIOError, TimeoutError):
                return PeerFailure(FailureReason.STALLED,
                                   f"no byte within {self._stall_timeout:g} s")
            except OSError as err:
                return PeerFailure(FailureReason.BROKEN, str(err))
            if not received:
                return PeerFailure(FailureReason.BROKEN, "body ended")
            if (slow := self._progress.check(received, time.monotonic() - started)) is not None:
                return slow
            self._remaining -= received
            if (failure := self._kept(chunk)) is not None:
                return failure
            self._to_hash.put(chunk)
        return None

    def _kept(self, chunk: Chunk) -> SinkFailure | None:
        if self._keep is None:
            return None
        try:
            self._keep(chunk)
        except Exception as err:
            return SinkFailure.of(err)
        return None
