"""One HTTP request's status or body digest, for tests that only ask what a node answered."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request


def http_status(url: str, method: str = "GET", headers: dict[str, str] | None = None,
                timeout: float = 30.0) -> int:
    """The status of one request (its body read and dropped); an error status is a
    status, not an exception, since tests assert 404s and 429s as often as 200s."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


class ShortBody(AssertionError):
    """A 200 whose body ended before its Content-Length: the server cut it short."""


def timed_sha256(url: str) -> tuple[str | None, float]:
    """The sha256 of the body (None for a non-200) and how long the GET took.

    A body shorter than its Content-Length raises ShortBody: http.client's
    ``read(n)`` returns b"" at an early close instead of failing, and the hash of
    a prefix would pass as an answer (one a test then reads as a wrong digest,
    not as the cut it was).
    """
    began = time.monotonic()
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                received += len(chunk)
            announced = response.headers.get("Content-Length")
    except OSError:
        return None, time.monotonic() - began
    if announced is not None and received != int(announced):
        raise ShortBody(f"GET {url}: {received} of {announced} bytes, then the body ended")
    return f"sha256:{digest.hexdigest()}", time.monotonic() - began
