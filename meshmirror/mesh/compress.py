"""LZW exactly as Go's ``compress/lzw`` writes it (LSB bit order, 8-bit literals).

memberlist compresses packets and push-pull streams with Go's LZW when
``EnableCompression`` is on, which is the default in its LAN config and in
Serf. No maintained Python package produces Go-compatible LZW, so the codec is
written here from the algorithm: codes start 9 bits wide and grow to 12, code
256 clears the table, 257 ends the stream, and the writer emits a clear code
first and resets its table when code 4095 would be assigned. The output is
byte-for-byte what Go writes, so our compressed messages look like Serf's.
"""

from __future__ import annotations

_LIT_WIDTH = 8
_CLEAR = 1 << _LIT_WIDTH  # 256
_EOF = _CLEAR + 1  # 257
_MAX_WIDTH = 12
_MAX_CODE = (1 << _MAX_WIDTH) - 1  # 4095


class LZWError(ValueError):
    """A compressed buffer that Go's reader would also refuse."""


def compress(data: bytes) -> bytes:
    """Compress ``data`` the way ``lzw.NewWriter(w, lzw.LSB, 8)`` + ``Close`` does."""
    out = bytearray()
    bits = 0
    nbits = 0
    width = _LIT_WIDTH + 1

    def emit(code: int) -> None:
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8

    emit(_CLEAR)
    hi = _EOF
    overflow = 1 << (_LIT_WIDTH + 1)
    table: dict[int, int] = {}

    def inc_hi() -> None:
        """Assign the next code; on exhaustion emit clear and start over, as Go does."""
        nonlocal hi, overflow, width
        hi += 1
        if hi == overflow:
            width += 1
            overflow <<= 1
        if hi == _MAX_CODE:
            emit(_CLEAR)
            width = _LIT_WIDTH + 1
            hi = _EOF
            overflow = _CLEAR << 1
            table.clear()
            return
        table[pending_key] = hi

    if data:
        code = data[0]
        pending_key = 0
        for literal in data[1:]:
            key = (code << 8) | literal
            hit = table.get(key)
            if hit is not None:
                code = hit
                continue
            emit(code)
            code = literal
            pending_key = key
            inc_hi()
        emit(code)
        # Go's Close bumps hi after the final code, which can widen the EOF code;
        # the key it would insert is never used again.
        pending_key = -1
        inc_hi()
    emit(_EOF)
    if nbits > 0:
        out.append(bits & 0xFF)
    return bytes(out)


def decompress(data: bytes, *, max_size: int) -> bytes:
    """Inverse of :func:`compress`; accepts anything Go's LSB/8 reader accepts.

    Raises :class:`LZWError` on an invalid code, a stream without its EOF code
    (Go reports ``io.ErrUnexpectedEOF``), or output beyond ``max_size`` bytes,
    which bounds decompression bombs.
    """
    decoder = Decompressor(max_size=max_size)
    out = decoder.feed(data)
    decoder.close()
    return out


class Decompressor:
    """:func:`decompress` one piece at a time, for input that arrives over a stream.

    Each :meth:`feed` costs time in proportion to the bytes it is given and
    returns the output they complete, so a slow or huge compressed stream never
    makes one call expensive. Bytes after the EOF code are ignored, as Go does.
    """

    def __init__(self, *, max_size: int) -> None:
        self._max_size = max_size
        self._produced = 0
        # Each table entry stores the full byte string it expands to; simpler and
        # faster in Python than walking prefix chains.
        self._entries: list[bytes | None] = [bytes((i,)) for i in range(256)] + [None, None]
        self._width = _LIT_WIDTH + 1
        self._hi = _EOF
        self._overflow = 1 << self._width
        self._last: bytes | None = None
        self._bits = 0
        self._nbits = 0
        self.finished = False
        """The EOF code has been read: the compressed stream is complete."""

    def feed(self, data: bytes) -> bytes:
        if self.finished:
            return b""
        out = bytearray()
        entries, width, hi, overflow = self._entries, self._width, self._hi, self._overflow
        last, bits, nbits = self._last, self._bits, self._nbits
        budget = self._max_size - self._produced
        pos = 0
        n = len(data)
        while True:
            while nbits < width and pos < n:
                bits |= data[pos] << nbits
                pos += 1
                nbits += 8
            if nbits < width:
                break
            code = bits & ((1 << width) - 1)
            bits >>= width
            nbits -= width
            if code == _CLEAR:
                width = _LIT_WIDTH + 1
                hi = _EOF
                overflow = 1 << width
                last = None
                del entries[_EOF + 1 :]
                continue
            if code == _EOF:
                self.finished = True
                break
            chunk: bytes | None
            if code == hi and last is not None:
                chunk = last + last[:1]  # the KwKwK case: code defined by this very use
            elif code <= hi and code < len(entries):
                chunk = entries[code]
            else:
                chunk = None
            if chunk is None:
                raise LZWError(f"invalid LZW code {code}")
            if last is not None:
                entries.append(last + chunk[:1])
            out += chunk
            if len(out) > budget:
                raise LZWError(f"decompressed size exceeds {self._max_size} bytes")
            last = chunk
            hi += 1
            if hi >= overflow:
                if width == _MAX_WIDTH:
                    # Table full: Go keeps decoding at 12 bits without new entries.
                    last = None
                    hi -= 1
                else:
                    width += 1
                    overflow = 1 << width
        self._width, self._hi, self._overflow = width, hi, overflow
        self._last, self._bits, self._nbits = last, bits, nbits
        self._produced += len(out)
        return bytes(out)

    def close(self) -> None:
        """No more input: raise unless the EOF code was read."""
        if not self.finished:
            raise LZWError("truncated LZW stream: no end code")
