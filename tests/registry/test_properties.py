"""Property-based tests: parsing never fails in an unexpected way, the app never answers 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import string
from collections.abc import Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.reference import (
    DOCKER_HUB,
    InvalidReferenceError,
    Reference,
    validate_registry,
    validate_repository,
    validate_tag,
)
from meshmirror.registry.app import create_app
from meshmirror.registry.errors import RegistryError
from meshmirror.registry.paths import Kind, parse_v2_path
from meshmirror.registry.ranges import (
    MalformedRangeError,
    RangeSpec,
    UnsatisfiableRangeError,
    parse_range,
)
from tests.registry.asgi import call
from tests.registry.fakes import FakeFallback, FakeStore, add_image

_alnum = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)
_separator = st.sampled_from([".", "_", "__", "-", "--"])


def _joined(parts: st.SearchStrategy[str], separators: st.SearchStrategy[str],
            max_extra: int = 2) -> st.SearchStrategy[str]:
    return st.tuples(parts, st.lists(st.tuples(separators, parts), max_size=max_extra)).map(
        lambda t: t[0] + "".join(sep + part for sep, part in t[1]))


component = _joined(_alnum, _separator)
repository = st.lists(component, min_size=1, max_size=4).map("/".join)
tag = st.tuples(st.sampled_from(string.ascii_letters + string.digits + "_"),
                st.text(string.ascii_letters + string.digits + "._-", max_size=30)).map("".join)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
digest = hex64.map(lambda h: Digest("sha256", h))
domain = st.lists(_joined(_alnum, st.just("-")), min_size=2, max_size=3).map(".".join)
registry = st.one_of(domain, st.tuples(domain, st.integers(1, 65535)).map(
    lambda t: f"{t[0]}:{t[1]}"), st.just("localhost:5000"))
hub_name = _joined(_alnum, st.sampled_from(["_", "__", "-"]))
path_alphabet = string.ascii_letters + string.digits + "/._-:@%?#~ \x00\u00e9"
text_or_junk = st.one_of(st.text(path_alphabet, max_size=120), st.text(max_size=60))


# -- references --------------------------------------------------------------------

@given(st.text(max_size=300))
def test_reference_parse_only_raises_its_error(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidReferenceError:
        return
    assert Reference.parse(str(ref)) == ref


@given(registry, repository, st.one_of(st.none(), tag), st.one_of(st.none(), digest))
def test_reference_round_trip(reg: str, repo: str, t: str | None, d: Digest | None) -> None:
    assume(len(f"{reg}/{repo}") <= 255)
    ref = Reference(reg, repo, t, d)
    assert Reference.parse(str(ref)) == ref


@given(hub_name)
def test_docker_hub_normalisation(repo: str) -> None:
    assume(repo != "localhost")
    assert Reference.parse(repo) == Reference(DOCKER_HUB, f"library/{repo}")
    assert Reference.parse(f"docker.io/{repo}") == Reference(DOCKER_HUB, f"library/{repo}")


@given(st.text(max_size=300))
def test_validators_only_raise_their_error(text: str) -> None:
    for validate in (validate_repository, validate_tag, validate_registry):
        with contextlib.suppress(InvalidReferenceError):
            validate(text)


def test_pathological_name_is_rejected_quickly() -> None:
    # The grammar's [-]* form would backtrack exponentially on this.
    with pytest.raises(InvalidReferenceError):
        validate_repository("a" * 200 + "!")


@pytest.mark.parametrize("name", ["a" * 256, "A", "a//b", "a/", "_a", "a-", "a___b", "a..b"])
def test_invalid_repositories(name: str) -> None:
    with pytest.raises(InvalidReferenceError):
        validate_repository(name)


@pytest.mark.parametrize("text", ["", "nginx:", ":tag", "nginx@sha256:bad", "a/B:1",
                                  "UPPER/x/Y", "x" * 600, "nginx:-1"])
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        Reference.parse(text)


# -- digests -----------------------------------------------------------------------

@given(st.text(max_size=200))
def test_digest_parse_only_raises_its_error(text: str) -> None:
    try:
        parsed = Digest.parse(text)
    except DigestError:
        return
    assert str(parsed) == text


# -- paths -------------------------------------------------------------------------

@given(repository, st.one_of(tag, digest.map(str)), st.sampled_from(["manifests", "blobs"]))
def test_valid_paths_parse(repo: str, ref: str, kind: str) -> None:
    assume(kind == "manifests" or ref.startswith("sha256:"))
    parsed = parse_v2_path(f"/v2/{repo}/{kind}/{ref}")
    assert parsed.repository == repo and parsed.reference == ref
    assert parsed.kind is (Kind.MANIFEST if kind == "manifests" else Kind.BLOB)


@given(text_or_junk)
def test_path_parse_only_raises_4xx(text: str) -> None:
    try:
        parsed = parse_v2_path("/v2/" + text)
    except RegistryError as err:
        assert 400 <= err.status < 500
        return
    if parsed.kind is not Kind.BASE:
        validate_repository(parsed.repository)


# -- ranges ------------------------------------------------------------------------

@given(st.text(max_size=80), st.integers(0, 10**12))
def test_range_parse_and_resolve_only_raise_range_errors(header: str, size: int) -> None:
    try:
        spec = parse_range(header)
    except MalformedRangeError:
        return
    if spec is None:
        return
    try:
        selected = spec.resolve(size)
    except UnsatisfiableRangeError:
        return
    if selected is not None:
        assert selected.offset >= 0 and selected.length >= 1
        assert selected.offset + selected.length <= size


@given(st.integers(0, 2**40), st.one_of(st.none(), st.integers(0, 2**40)), st.integers(1, 2**41))
def test_first_last_ranges(first: int, last: int | None, size: int) -> None:
    assume(last is None or last >= first)
    spec = parse_range(f"bytes={first}-{'' if last is None else last}")
    assert spec == RangeSpec(first=first, last=last)
    if first >= size:
        with pytest.raises(UnsatisfiableRangeError):
            spec.resolve(size)
        return
    selected = spec.resolve(size)
    assert selected is not None and selected.offset == first
    expected_last = size - 1 if last is None else min(last, size - 1)
    assert selected.last == expected_last
    assert selected.content_range() == f"bytes {first}-{expected_last}/{size}"
    assert parse_range(spec.header()) == spec


@given(st.integers(0, 2**40), st.integers(0, 2**41))
def test_suffix_ranges(n: int, size: int) -> None:
    spec = parse_range(f"bytes=-{n}")
    assert spec == RangeSpec(suffix=n)
    if n == 0:
        with pytest.raises(UnsatisfiableRangeError):
            spec.resolve(size)
        return
    selected = spec.resolve(size)
    if size == 0:
        assert selected is None
        return
    assert selected is not None
    assert selected.length == min(n, size) and selected.offset + selected.length == size


# -- the whole app -----------------------------------------------------------------

@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


header_value = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
header_name = st.sampled_from(["range", "if-range", "accept", "host", "x-junk",
                               "content-length", "transfer-encoding", "accept-encoding"])


@settings(max_examples=300)
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                               "TRACE", "BREW"]),
       path=st.one_of(text_or_junk.map(lambda t: "/v2/" + t),
                      st.tuples(repository, st.sampled_from(["manifests", "blobs"]),
                                text_or_junk).map(lambda t: f"/v2/{t[0]}/{t[1]}/{t[2]}"),
                      text_or_junk.map(lambda t: "/" + t)),
       query=st.one_of(st.just(b""), st.binary(max_size=40),
                       st.text(max_size=30).map(lambda t: b"ns=" + t.encode())),
       headers=st.lists(st.tuples(header_name, header_value), max_size=4),
       with_fallback=st.booleans())
def test_app_never_answers_5xx(loop: asyncio.AbstractEventLoop, method: str, path: str,
                               query: bytes, headers: list[tuple[str, str]],
                               with_fallback: bool) -> None:
    store = FakeStore(chunk=64)
    image = add_image(store, "docker.io", "library/nginx", "1")
    fallback = FakeFallback()
    add_image(fallback.store, "docker.io", "x/y", "2", layer=b"fallback layer")
    app = create_app(store, fallback=fallback if with_fallback else None)
    raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in headers]
    sent = loop.run_until_complete(
        asyncio.wait_for(call(app, method, path, query=query, headers=raw_headers), 10))
    assert 200 <= sent.status < 500, (sent.status, sent.body[:300])
    if sent.status >= 400 and (path == "/v2" or path.startswith("/v2/")) and method != "HEAD":
        assert "code" in json.loads(sent.body)["errors"][0]
    for read_digest, _, _ in store.reads:
        assert read_digest in store.held  # nothing outside the store is ever opened
    del image


@settings(max_examples=200)
@given(header=st.text(max_size=40), if_range=st.one_of(st.none(), st.text(max_size=80)))
def test_blob_ranges_never_5xx(loop: asyncio.AbstractEventLoop, header: str,
                               if_range: str | None) -> None:
    store = FakeStore(chunk=7)
    image = add_image(store, "docker.io", "library/nginx", "1", layer=bytes(range(100)))
    headers = [(b"range", header.encode())]
    if if_range is not None:
        headers.append((b"if-range", if_range.encode()))
    sent = loop.run_until_complete(call(create_app(store), "GET",
                                        f"/v2/library/nginx/blobs/{image.layer}",
                                        headers=headers))
    assert sent.status in (200, 206, 416)
    if sent.status == 200:
        assert sent.body == image.layer_bytes
    elif sent.status == 206:
        first, last = map(int, sent.headers["content-range"][6:].split("/")[0].split("-"))
        assert sent.body == image.layer_bytes[first:last + 1]
        assert sent.headers["content-length"] == str(len(sent.body))
    else:
        assert sent.headers["content-range"] == "bytes */100"
