"""Spool files: where a large blob from a peer waits until its digest checks out.

Why spool at all: containerd 1.6 writes every byte it receives into its ingest
and checks the digest only at commit. If the mirror streamed a lying peer's
bytes and aborted at the end, containerd would resume with ``Range`` from the
byte it reached, the corrupt prefix would stay in its ingest, the commit would
fail and so would the pull (measured with containerd 1.6, see
tests/e2e/test_faults.py). OCI has no per-chunk digests, so the only way to never pass on an
unverified byte is to hold the whole blob until it verifies. Memory cannot hold
multi-GiB layers; a file can, and the page cache usually keeps it in RAM anyway.

The files are anonymous (``O_TMPFILE`` where the kernel has it): nothing is
left behind when the process dies. A `SpoolBudget` bounds the bytes held across
concurrent requests; a blob that does not fit is streamed instead (verified at
the end, aborted on a mismatch), which is what the budget trades away.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from meshmirror.fileio import pread_chunks
from meshmirror.mirror.budget import MemoryBudget


class SpoolBudget:
    """At most ``limit`` bytes of spool files at once, in ``directory``."""

    def __init__(self, directory: Path | None, limit: int) -> None:
        if limit < 0:
            raise ValueError("the spool limit cannot be negative")
        self.directory = directory
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()  # reserve() on the loop, used() from a metrics scrape
        # Sizes given back by releases. A release may run in a garbage-collection
        # finalizer, at any point in any thread, even inside the lock above, so it
        # only ever puts here: SimpleQueue.put is safe to call from finalizers.
        self._returned: queue.SimpleQueue[int] = queue.SimpleQueue()

    @property
    def used(self) -> int:
        with self._lock:
            return self._settle()

    def reserve(self, size: int) -> SpoolFile | None:
        """A spool file for ``size`` bytes, or None when they do not fit (or no file can
        be made: the caller then streams, which is always possible)."""
        if not self.take(size):
            return None
        try:
            # Owned by the SpoolFile from here on; its release (or finalizer) closes it.
            file = tempfile.TemporaryFile(dir=self.directory, buffering=0)  # noqa: SIM115
        except OSError:
            self.give_back(size)
            return None
        return SpoolFile(file, size, self)

    def take(self, size: int) -> bool:
        """Reserve ``size`` more bytes if they fit."""
        with self._lock:
            if size > self.limit - self._settle():
                return False
            self._used += size
            return True

    def give_back(self, size: int) -> None:
        """Return ``size`` bytes to the budget; safe anywhere, finalizers included."""
        self._returned.put(size)

    def _settle(self) -> int:
        """Apply the sizes given back so far (the lock is held) and return the bytes used."""
        while True:
            try:
                self._used -= self._returned.get_nowait()
            except queue.Empty:
                return self._used


class SpoolFile:
    """One blob's spool: written in order by one thread, then read back by ranges.

    `release` closes the file and returns its bytes to the budget; it also runs
    when the object is garbage-collected, so a response that is never iterated
    (the client left before its first byte) cannot leak budget.
    """

    def __init__(self, file: IO[bytes], size: int, budget: SpoolBudget) -> None:
        self._file = file
        self.size = size
        self.written = 0
        self._budget = budget
        # Mutable, so a `resize` changes what the release (or finalizer) gives back.
        self._reserved = [size]
        self._release = weakref.finalize(self, _release, file, self._reserved, budget)

    def resize(self, size: int) -> bool:
        """Hold ``size`` bytes instead (the blob turned out another size); a larger
        size must fit in the budget. Call before writing."""
        extra = size - self._reserved[0]
        if extra > 0:
            if not self._budget.take(extra):
                return False
            self._reserved[0] = size
        self.size = size
        return True

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; safe to call from any one thread at a time."""
        if self.written + len(chunk) > self.size:
            raise ValueError(f"spool for {self.size} bytes was given {self.written + len(chunk)}")
        view = memoryview(chunk)
        while view:  # unbuffered: a write may take less than it was given
            done = self._file.write(view)
            view = view[done or 0:]
        self.written += len(chunk)

    def reset(self) -> None:
        """Forget what was written (the bytes failed verification)."""
        self._file.seek(0)
        self._file.truncate()
        self.written = 0

    async def read(self, start: int, end: int, chunk_size: int,
                   budget: MemoryBudget | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) of what was written; the spool is released at the end.

        With a ``budget``, each chunk is taken from it before it is read and given
        back when the next one is asked for: by then the server has written it out.
        """
        chunks = pread_chunks(self._file.fileno(), start, end, chunk_size)
        taken = 0
        try:
            while True:
                if budget is not None:
                    await budget.take(chunk_size)
                    taken = chunk_size
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
            self.release()

    def release(self) -> None:
        self._release()


def _release(file: IO[bytes], reserved: list[int], budget: SpoolBudget) -> None:
    with contextlib.suppress(OSError):
        file.close()
    budget.give_back(reserved[0])


def check_spool_directory(directory: Path) -> None:
    """Raise OSError with a readable message unless spool files can be made in ``directory``."""
    if not directory.is_dir():
        raise OSError(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OSError(f"{directory} is not writable")
    with tempfile.TemporaryFile(dir=directory):
        pass
