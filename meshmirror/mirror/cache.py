"""The blob cache: the one place a node holds blob bytes on disk.

Every blob a node fetches for its clients is written into a cache entry: a file
that readers follow while it downloads (see `flight`), that counts as complete
only once its digest verified, and that stays afterwards for later readers
until room is needed. It replaces per-request spool files, so a blob is held
once per node however many requests want it.

Why hold peers' bytes on disk at all: containerd 1.6 writes every byte it
receives into its ingest and checks the digest only at commit. If the mirror
passed on a lying peer's bytes and aborted at the end, containerd would resume
with ``Range`` from the byte it reached, the corrupt prefix would stay in its
ingest and the pull would fail (tests/e2e/test_faults.py). OCI has no
per-chunk digests, so the only way to never pass on an unverified byte is to
hold the whole blob until it verifies; a file can hold multi-GiB layers, and
the page cache usually keeps it in RAM anyway.

Two bounds, both enforced at admission, neither ever exceeded:

- ``limit`` (``--upstream-cache-limit``): every byte of every entry in the
  directory, complete or not. Room is made by evicting complete entries that
  nobody is reading, least recently used first;
- ``held_limit`` (``--mirror-spool-limit``): the bytes of entries pinned by
  requests in progress (being written, verified or read out). Pinned entries
  are never evicted.

A blob that cannot be admitted is refused (`reserve` returns None): the caller
then streams it without caching, checked at its end (what ``--mirror-spool-limit``
has always traded away). Sizes are reserved whole when an entry is made, from
the size the source announced, so the directory never outgrows ``limit`` even
mid-download. An attempt whose bytes fail gives its reservation back (`CacheEntry.release`)
while the next source is looked for, which may take until the fetch's deadline: a
liar's announced size holds nothing once it is found out.

Files live in a private subdirectory (``meshmirror-cache-*``) of the configured
directory, locked with ``flock`` while the process lives; a new process
removes subdirectories whose lock nobody holds, so a crash leaves nothing behind
for long (the chart's emptyDir outlives container restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from meshmirror.fileio import ShortFileError, pread_chunks
from meshmirror.mirror.body import Chunk
from meshmirror.mirror.budget import MemoryBudget

_PREFIX = "meshmirror-cache-"
_LOCK = ".lock"
# Pieces of a complete entry kept for readers in step (see `CacheEntry._shared`):
# 16 send-sized pieces are 2 MiB per entry that two or more requests read at once.
_SHARED_PIECES = 16


class CacheEntry:
    """One blob's file: written in order by one thread at a time, read back by ranges.

    ``written`` is how far the current attempt has reached from byte 0; it only
    grows, except through `reset` (the bytes failed verification and are written
    again). A striped blob (see `split`) is written as several byte ranges at once,
    each in order; ``written`` is then the prefix they have filled together.
    """

    def __init__(self, cache: BlobCache, key: str, path: Path, size: int) -> None:
        self.key = key
        self.path = path
        self.size = size
        # Bytes of the cache's limits this entry holds: ``size``, or 0 once `release`d
        # (until `resize` asks again); what may be written.
        self.reserved = size
        self.written = 0
        self.complete = False
        # Where the verified bytes came from (`flight.BlobSource.origin`).
        self.origin: str | None = None
        self.pins = 0
        # Whether the file holds bytes: `reset` truncates only then, since ext4 flushes a
        # file truncated to zero when it is closed (disk writes for a file about to go).
        self._dirty = False
        # Striped: [start, end, filled] per range, written in parallel (see `split`).
        self._extents: list[list[int]] | None = None
        self._cache = cache
        self._recent: OrderedDict[tuple[int, int], asyncio.Future[bytes]] = OrderedDict()
        # Owned here; closed by `BlobCache._drop`, and by `BlobCache.unpin` for a complete
        # entry nobody reads (`reopen` opens it again for the next reader).
        self._file: IO[bytes] | None = open(path, "w+b", buffering=0)  # noqa: SIM115
        # The file as `close_file` left it: (device, inode, size, mtime), which `reopen`
        # must find again.
        self._closed_as: tuple[int, int, int, int] | None = None

    def fileno(self) -> int:
        if self._file is None:
            raise ValueError(f"cache file {self.path.name} is closed")
        return self._file.fileno()

    def write(self, chunk: Chunk) -> None:
        """Append ``chunk`` at ``written``; safe from any one thread at a time."""
        self._fits(len(chunk))
        self._dirty = True
        view = memoryview(chunk)
        while view:  # a write may take less than it was given
            done = os.pwrite(self.fileno(), view, self.written)
            view = view[done:]
            self.written += done

    def appended(self, size: int) -> None:
        """``size`` bytes were written to the file at ``written`` by someone else (a
        `body.BodyPump` splicing a socket into it, see `body.FileKeep`)."""
        self._fits(size)
        self._dirty = True
        self.written += size

    def _fits(self, size: int) -> None:
        if self.written + size > self.reserved:
            raise ValueError(f"cache entry for {self.reserved} bytes was given "
                             f"{self.written + size}")

    def reset(self) -> None:
        """Forget what was written (the bytes failed verification), stripes included."""
        if self._dirty:
            os.ftruncate(self.fileno(), 0)
            self._dirty = False
        self.written = 0
        self._extents = None

    def release(self) -> None:
        """`reset`, and give back what the entry holds of the cache's limits until
        `resize` asks again: the attempt failed, and a liar's announced size must not
        keep others out while the next source is looked for."""
        self.reset()
        self._cache.release(self)

    def split(self, bounds: list[tuple[int, int]]) -> None:
        """Write the blob as the ranges ``bounds`` ([start, end), in order, covering it)
        from here on, each with `write_at`; call on an empty entry."""
        if self.written or not bounds or bounds[0][0] != 0 or bounds[-1][1] != self.size:
            raise ValueError(f"cannot split a {self.size}-byte entry into {bounds}")
        self._extents = [[start, end, start] for start, end in bounds]

    def write_at(self, index: int, chunk: bytes) -> None:
        """Append ``chunk`` to range ``index``; safe from one thread per range at a time."""
        assert self._extents is not None, "split first"
        extent = self._extents[index]
        if extent[2] + len(chunk) > min(extent[1], self.reserved):
            raise ValueError(f"range {index} ends at byte {extent[1]}, was given "
                             f"{extent[2] + len(chunk)}")
        self._dirty = True
        view = memoryview(chunk)
        while view:
            done = os.pwrite(self.fileno(), view, extent[2])
            view = view[done:]
            extent[2] += done
        self.written = self.available(0)

    def available(self, position: int) -> int:
        """Where the bytes written from ``position`` on end (``position`` if none yet)."""
        if self._extents is None:
            return max(position, self.written)
        for start, end, filled in self._extents:
            if start <= position < end:
                if filled < end:
                    return max(position, filled)
                position = end
        return position

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` written bytes from ``offset`` (to hash what stripes filled)."""
        return os.pread(self.fileno(), size, offset)

    def resize(self, size: int) -> bool:
        """Hold ``size`` bytes instead (the blob turned out another size); False when
        a larger size does not fit. Call before writing."""
        return self._cache.resize(self, size)

    async def read(self, start: int, end: int, piece: int,
                   budget: MemoryBudget | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) of what was written, in pieces of at most ``piece``.

        With a ``budget``, each piece is taken from it before it is read and given
        back when the next one is asked for: by then the server has written it out.
        """
        chunks = (self._shared(start, end, piece) if self.complete
                  else pread_chunks(self.fileno(), start, end, piece))
        taken = 0
        try:
            while True:
                if budget is not None:
                    await budget.take(piece)
                    taken = piece
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                yield chunk
                if budget is not None:
                    budget.give(taken)
                    taken = 0
        finally:
            if budget is not None and taken:
                budget.give(taken)
            await chunks.aclose()  # type: ignore[attr-defined]  # an async generator

    async def _shared(self, start: int, end: int, piece: int) -> AsyncIterator[bytes]:
        """`read` of a complete entry, in pieces aligned to ``piece`` and shared by
        readers in step: a burst of readers reads each piece from the file once and
        holds one copy of it, not one per reader."""
        position = start
        while position < end:
            low = position - position % piece
            high = min(low + piece, self.size)
            data = await self._piece(low, high)
            if len(data) < high - low:
                raise ShortFileError(f"cache file ended at byte {low + len(data)}")
            if position == low and high <= end:
                yield data
            else:
                yield data[position - low:min(end, high) - low]
            position = min(end, high)

    def _piece(self, low: int, high: int) -> asyncio.Future[bytes]:
        """Bytes [low, high) of the file, from a read in progress or just done if any."""
        key = (low, high)
        read = self._recent.get(key)
        if read is None or (read.done() and (read.cancelled() or read.exception())):
            read = asyncio.get_running_loop().run_in_executor(
                None, os.pread, self.fileno(), high - low, low)
            if self.pins < 2:
                return read  # a lone reader: nobody to share with, nothing kept
            self._recent[key] = read
            while len(self._recent) > _SHARED_PIECES:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(key)
        return asyncio.shield(read)  # one reader leaving must not cancel the others' read

    def forget_pieces(self) -> None:
        """Drop the shared pieces: fewer than two readers are left to share them."""
        self._recent.clear()

    def close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                self._closed_as = _identity(os.fstat(file.fileno()))
                file.close()

    def reopen(self) -> None:
        """Open the file again if `close_file` closed it (raises OSError if it cannot).

        FileNotFoundError too when the path now names another file, or the file was
        written or truncated meanwhile: its verified bytes are gone, and serving what is
        there would send a cut answer on every hit (sendfile finds the end early) or
        unverified bytes. Whatever replaces it is not ours to check; it is a miss."""
        if self._file is not None:
            return
        file = open(self.path, "r+b", buffering=0)  # noqa: SIM115
        try:
            found = _identity(os.fstat(file.fileno()))
        except OSError:
            file.close()
            raise
        if self._closed_as is not None and found != self._closed_as:
            file.close()
            raise FileNotFoundError(errno.ENOENT, "cache file changed while closed",
                                    str(self.path))
        self._file = file


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class BlobCache:
    """Cache entries in ``directory`` (None: the system's temporary directory), at most
    ``limit`` bytes in all and ``held_limit`` bytes pinned at once (see the module).

    Entries are made, pinned and unpinned on the event loop; the byte counts are
    also read by metrics scrapes, hence the lock.
    """

    def __init__(self, directory: Path | None, limit: int, held_limit: int, *,
                 on_evict: Callable[[], None] = lambda: None) -> None:
        if limit < 0 or held_limit < 0:
            raise ValueError("cache limits cannot be negative")
        self.directory = directory
        self.limit = limit
        self.held_limit = held_limit
        self._root: Path | None = None
        self._lock_file: IO[bytes] | None = None
        self._complete: OrderedDict[str, CacheEntry] = OrderedDict()  # LRU, newest last
        self._entries: set[CacheEntry] = set()  # every entry with a file, in any state
        self._lock = threading.Lock()
        self._total = 0
        self._held = 0
        self._names = itertools.count()
        self._on_evict = on_evict

    @property
    def total(self) -> int:
        """Bytes reserved by every entry in the directory."""
        with self._lock:
            return self._total

    @property
    def held(self) -> int:
        """Bytes of entries pinned by requests in progress."""
        with self._lock:
            return self._held

    def open(self, key: str) -> CacheEntry | None:
        """The complete entry for ``key``, pinned (`unpin` it when done), or None.

        An entry nobody reads has its file closed (`unpin`): a descriptor per complete
        entry would let many small blobs, which ``limit`` counts in bytes only, use up
        the process's descriptors. It is opened again here; one that cannot be (its
        file removed under us, or no descriptor left) is a miss.
        """
        entry = self._complete.get(key)
        if entry is None:
            return None
        try:
            entry.reopen()
        except FileNotFoundError:
            del self._complete[key]
            self._drop(entry)
            return None
        except OSError:
            return None
        self._complete.move_to_end(key)
        self.pin(entry)
        return entry

    def reserve(self, key: str, size: int) -> CacheEntry | None:
        """A new pinned entry for ``size`` bytes of ``key``, or None when it cannot be
        admitted (too large for what is not pinned, or no file can be made)."""
        if size > self.held_limit - self.held or not self._make_room(size):
            return None
        try:
            root = self._directory()
            entry = CacheEntry(self, key, root / f"{key.replace(':', '-')}.{next(self._names)}",
                               size)
        except OSError:
            if self._root is not None and not self._root.is_dir():
                self._root = None  # removed under us: make a new one next time
            return None
        with self._lock:
            self._total += size
        self._entries.add(entry)
        self.pin(entry)
        return entry

    def resize(self, entry: CacheEntry, size: int) -> bool:
        extra = size - entry.reserved
        if extra > 0 and (extra > self.held_limit - self.held or not self._make_room(extra)):
            return False
        with self._lock:
            self._total += extra
            if entry.pins:
                self._held += extra
        entry.size = entry.reserved = size
        return True

    def release(self, entry: CacheEntry) -> None:
        """``entry`` holds none of the limits until `resize` (see `CacheEntry.release`)."""
        with self._lock:
            self._total -= entry.reserved
            if entry.pins:
                self._held -= entry.reserved
            entry.reserved = 0

    def complete(self, entry: CacheEntry) -> None:
        """``entry`` verified: later readers may `open` it."""
        entry.complete = True
        old = self._complete.pop(entry.key, None)
        self._complete[entry.key] = entry
        if old is not None and old is not entry and old.pins == 0:
            self._drop(old)

    def pin(self, entry: CacheEntry) -> None:
        with self._lock:
            if entry.pins == 0:
                self._held += entry.reserved
            entry.pins += 1

    def unpin(self, entry: CacheEntry) -> None:
        """One pin fewer; an entry that never completed goes once nobody holds it."""
        with self._lock:
            entry.pins -= 1
            if entry.pins < 2:
                entry.forget_pieces()
            if entry.pins:
                return
            self._held -= entry.reserved
        if not entry.complete or self._complete.get(entry.key) is not entry:
            self._drop(entry)
        else:
            entry.close_file()  # `open` opens it again: see there

    def discard(self, entry: CacheEntry) -> None:
        """``entry`` will never complete (its fetch failed): it goes with its last pin."""
        entry.complete = False
        if self._complete.get(entry.key) is entry:
            del self._complete[entry.key]

    def close(self) -> None:
        """Remove every file (the process is stopping; readers are gone)."""
        for entry in list(self._entries):
            entry.close_file()
        self._entries.clear()
        self._complete.clear()
        with self._lock:
            self._total = self._held = 0
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _make_room(self, size: int) -> bool:
        """Evict unpinned complete entries, oldest first, until ``size`` more fit."""
        if size > self.limit:
            return False
        while self.total + size > self.limit:
            victim = next((entry for entry in self._complete.values() if entry.pins == 0), None)
            if victim is None:
                return False
            del self._complete[victim.key]
            self._drop(victim)
            self._on_evict()
        return True

    def _drop(self, entry: CacheEntry) -> None:
        if entry not in self._entries:
            return
        self._entries.discard(entry)
        entry.close_file()
        with contextlib.suppress(OSError):
            entry.path.unlink()
        with self._lock:
            self._total -= entry.reserved

    def _directory(self) -> Path:
        """This process's private subdirectory, made on first use (a node that never
        holds a blob touches no disk), after removing ones left by dead processes."""
        if self._root is not None:
            return self._root
        parent = self.directory or Path(tempfile.gettempdir())
        _remove_abandoned(parent)
        root = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
        lock = open(root / _LOCK, "wb")  # noqa: SIM115 (held for the process's life)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._root, self._lock_file = root, lock
        return root


def _remove_abandoned(parent: Path) -> None:
    """Remove cache subdirectories whose owner's lock is free (that process is gone)."""
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            if not child.name.startswith(_PREFIX) or not child.is_dir():
                continue
            try:
                with open(child / _LOCK, "rb") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except FileNotFoundError:
                continue  # being made right now, or not ours
            except OSError:
                continue  # locked: alive
            shutil.rmtree(child, ignore_errors=True)


def check_cache_directory(directory: Path) -> None:
    """Raise OSError with a readable message unless cache files can be made in ``directory``."""
    if not directory.is_dir():
        raise OSError(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OSError(f"{directory} is not writable")
    with tempfile.TemporaryFile(dir=directory):
        pass
