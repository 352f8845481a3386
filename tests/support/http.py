"""One HTTP request's status, for tests that only ask what a node answered."""

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


def timed_sha256(url: str) -> tuple[str | None, float]:
    """The sha256 of the body (None for a non-200) and how long the GET took."""
    began = time.monotonic()
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None, time.monotonic() - began
    return f"sha256:{digest.hexdigest()}", time.monotonic() - began
