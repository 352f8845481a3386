"""tests/support/http.py: a cut body fails the GET instead of hashing as an answer."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.http import ShortBody, timed_sha256
from tests.support.scripted_http import RawReplyServer

BODY = b"x" * 1000


def reply(body: bytes, length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        length, body)


def test_a_whole_body_hashes() -> None:
    with RawReplyServer(reply(BODY, len(BODY))) as server:
        digest, _ = timed_sha256(f"{server.url}/blob")
    assert digest == f"sha256:{hashlib.sha256(BODY).hexdigest()}"


def test_a_body_shorter_than_its_content_length_fails_loudly() -> None:
    with (RawReplyServer(reply(BODY[:400], len(BODY))) as server,
          pytest.raises(ShortBody, match="400 of 1000 bytes")):
        timed_sha256(f"{server.url}/blob")


def test_an_error_status_is_no_digest() -> None:
    with RawReplyServer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n") as server:
        assert timed_sha256(f"{server.url}/blob")[0] is None
