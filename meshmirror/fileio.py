"""Reading a byte range of an open file without blocking the event loop.

The stores and the mirror's spool all serve bytes from files; each ``pread``
runs on the default executor (it releases the GIL), so a slow disk stalls one
response, never the loop that also answers every other request.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator


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
