"""Reading a byte range of an open file without blocking the event loop, or handing it
to a server that sends it with ``sendfile``.

The stores and the mirror's spool all serve bytes from files; each ``pread``
runs on the default executor (it releases the GIL), so a slow disk stalls one
response, never the loop that also answers every other request.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class ShortFileError(OSError):
    """The file ended before the range did (it was truncated or replaced meanwhile)."""


async def pread_chunks(fd: int, offset: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
    """Bytes [offset, end) of ``fd`` in chunks of at most ``chunk_size``.

    The caller owns ``fd``: this neither closes it nor moves its file position,
    so concurrent ranges of one descriptor are safe.
    """
    loop = asyncio.get_running_loop()
    position = offset
    while position < end:
        data = await loop.run_in_executor(
            None, os.pread, fd, min(chunk_size, end - position), position)
        if not data:
            raise ShortFileError(f"file ended at byte {position}, {end - position} bytes early")
        position += len(data)
        yield data


@dataclass(frozen=True, slots=True)
class FileSpan:
    """Bytes [offset, end) of an open file: what a server can hand to ``sendfile`` so the
    kernel moves them from the page cache to the socket, with no copy through Python."""

    fd: int
    offset: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.offset


@runtime_checkable
class FileBacked(Protocol):
    """A body whose bytes are a span of a file (while the body is open), so a server that
    can send files does not iterate it; one that cannot reads it as chunks."""

    def file_span(self) -> FileSpan | None: ...


class FileChunks:
    """A byte range of a file as a body: chunks read with `pread_chunks` or, through
    `file_span`, sent by the kernel. Owns ``fd`` and closes it on `aclose` (or once read
    to the end), so a response that never reads it still lets the file go."""

    def __init__(self, fd: int, offset: int, end: int, chunk_size: int) -> None:
        self._span = FileSpan(fd, offset, end)
        self._chunks = pread_chunks(fd, offset, end, chunk_size)
        self._closed = False

    def file_span(self) -> FileSpan | None:
        return None if self._closed else self._span

    def __aiter__(self) -> FileChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]  # an async generator
        finally:
            os.close(self._span.fd)
