"""Token responses and the token cache."""

from __future__ import annotations

import json

import pytest

from meshmirror.upstream.tokens import (
    DEFAULT_EXPIRES_IN,
    MAX_TOKEN_RESPONSE,
    Token,
    TokenCache,
    TokenResponseError,
    parse_token_response,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_parses_token_or_access_token_with_default_lifetime() -> None:
    assert parse_token_response(b'{"token": "abc", "expires_in": 300}') == Token("abc", 300.0)
    assert parse_token_response(b'{"access_token": "xyz"}') == Token("xyz", DEFAULT_EXPIRES_IN)
    assert parse_token_response(b'{"token": "t", "expires_in": 0}').expires_in == 60.0


@pytest.mark.parametrize("body", [
    b"<html>not json", b"\xff\xfe", b"[]", b'"token"', b"{}", b'{"token": ""}',
    b'{"token": 5}', b'{"token": "a\\nb"}', b'{"token": "t", "expires_in": "soon"}',
    b'{"token": "t", "expires_in": true}',
    json.dumps({"token": "x" * (MAX_TOKEN_RESPONSE + 1)}).encode(),
])
def test_garbage_raises_token_response_error(body: bytes) -> None:
    with pytest.raises(TokenResponseError):
        parse_token_response(body)


def test_cache_keeps_a_token_until_just_before_it_expires() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    cache.put("r", "repository:a:pull", Token("t", 60.0))
    assert cache.get("r", "repository:a:pull") == "t"
    assert cache.get("r", "repository:b:pull") is None
    assert cache.get("other", "repository:a:pull") is None
    clock.now = 54.9
    assert cache.get("r", "repository:a:pull") == "t"
    clock.now = 55.0  # 5 s margin
    assert cache.get("r", "repository:a:pull") is None
    assert len(cache) == 0


def test_cache_margin_never_eats_a_short_token_whole() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    cache.put("r", "s", Token("t", 4.0))
    clock.now = 1.9
    assert cache.get("r", "s") == "t"


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = TokenCache(max_entries=2, clock=FakeClock())
    cache.put("r", "a", Token("1", 60))
    cache.put("r", "b", Token("2", 60))
    assert cache.get("r", "a") == "1"
    cache.put("r", "c", Token("3", 60))
    assert cache.get("r", "b") is None
    assert cache.get("r", "a") == "1"
    cache.discard("r", "a")
    assert cache.get("r", "a") is None
