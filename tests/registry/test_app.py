"""Every endpoint, header, status and error of the registry app, against an in-memory store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message

from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.oci.manifest import MAX_MANIFEST_SIZE
from meshmirror.registry.app import RegistryConfig, create_app
from meshmirror.registry.fallback import BodyAborted, FallbackContent, Miss
from meshmirror.registry.metrics import RegistryMetrics
from meshmirror.registry.ranges import RangeSpec
from tests.registry.asgi import call
from tests.registry.fakes import FakeFallback, FakeStore, Image, add_image

V2 = "registry/2.0"


@pytest.fixture
def store() -> FakeStore:
    return FakeStore(chunk=4096)


@pytest.fixture
def image(store: FakeStore) -> Image:
    return add_image(store, "docker.io", "library/nginx", "1.25",
                     layer=bytes(range(256)) * 400)


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://registry.test")


@pytest.fixture
async def client(store: FakeStore, image: Image) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(store)) as c:
        yield c


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"errors"} and len(body["errors"]) == 1
    assert {"code", "message"} <= set(body["errors"][0])
    return str(body["errors"][0]["code"])


# -- /v2/ ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v2/", "/v2"])
async def test_base_endpoint(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 200
    assert r.headers["docker-distribution-api-version"] == V2
    assert r.json() == {}
    h = await client.head(path)
    assert h.status_code == 200 and h.content == b""
    assert h.headers["docker-distribution-api-version"] == V2


# -- manifests -------------------------------------------------------------------

async def test_manifest_by_tag_with_ns(client: httpx.AsyncClient, image: Image) -> None:
    r = await client.get("/v2/library/nginx/manifests/1.25", params={"ns": "docker.io"})
    assert r.status_code == 200
    assert r.content == image.manifest_bytes
    assert r.headers["content-type"] == mediatypes.OCI_MANIFEST
    assert r.headers["content-length"] == str(len(image.manifest_bytes))
    assert r.headers["docker-content-digest"] == str(image.manifest)
    assert r.headers["etag"] == f'"{image.manifest}"'
    assert r.headers["docker-distribution-api-version"] == V2


async def test_manifest_head_has_headers_and_no_body(client: httpx.AsyncClient,
                                                     image: Image) -> None:
    r = await client.head("/v2/library/nginx/manifests/1.25?ns=docker.io",
                          headers={"Accept": mediatypes.CONTAINERD_ACCEPT})
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(image.manifest_bytes))
    assert r.headers["docker-content-digest"] == str(image.manifest)
    assert r.headers["content-type"] == mediatypes.OCI_MANIFEST


async def test_manifest_without_ns_uses_default_registry(client: httpx.AsyncClient,
                                                         image: Image) -> None:
    r = await client.get("/v2/library/nginx/manifests/1.25")
    assert r.status_code == 200 and r.headers["docker-content-digest"] == str(image.manifest)


async def test_docker_hub_alias_ns_is_normalised(client: httpx.AsyncClient) -> None:
    r = await client.head("/v2/library/nginx/manifests/1.25?ns=index.docker.io")
    assert r.status_code == 200


async def test_configured_default_registry(store: FakeStore) -> None:
    image = add_image(store, "127.0.0.1:5050", "team/app", "v1")
    app = create_app(store, options=RegistryConfig(default_registry="127.0.0.1:5050"))
    async with client_for(app) as c:
        r = await c.get("/v2/team/app/manifests/v1")
        assert r.status_code == 200 and r.content == image.manifest_bytes
        assert (await c.get("/v2/team/app/manifests/v1?ns=docker.io")).status_code == 404


async def test_tag_of_other_registry_is_unknown(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/library/nginx/manifests/1.25?ns=quay.io")
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"


async def test_manifest_by_digest(client: httpx.AsyncClient, image: Image) -> None:
    r = await client.get(f"/v2/library/nginx/manifests/{image.manifest}?ns=docker.io")
    assert r.status_code == 200 and r.content == image.manifest_bytes
    assert r.headers["docker-content-digest"] == str(image.manifest)


async def test_manifest_media_type_sniffed_when_store_does_not_know(store: FakeStore) -> None:
    image = add_image(store, "docker.io", "library/x", "1", manifest_type_known=False)
    async with client_for(create_app(store)) as c:
        for method in ("GET", "HEAD"):
            r = await c.request(method, "/v2/library/x/manifests/1")
            assert r.status_code == 200
            assert r.headers["content-type"] == mediatypes.OCI_MANIFEST
            assert r.headers["content-length"] == str(len(image.manifest_bytes))


async def test_index_served_with_its_media_type(store: FakeStore) -> None:
    doc = {"schemaVersion": 2, "mediaType": mediatypes.DOCKER_MANIFEST_LIST, "manifests": []}
    digest = store.add(json.dumps(doc).encode(), None)
    async with client_for(create_app(store)) as c:
        r = await c.get(f"/v2/any/repo/manifests/{digest}")
        assert r.status_code == 200
        assert r.headers["content-type"] == mediatypes.DOCKER_MANIFEST_LIST


async def test_layer_is_never_served_as_a_manifest(client: httpx.AsyncClient, image: Image,
                                                   store: FakeStore) -> None:
    r = await client.get(f"/v2/library/nginx/manifests/{image.layer}")
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
    junk = store.add(b"not json at all", None)
    r = await client.get(f"/v2/library/nginx/manifests/{junk}")
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"


async def test_oversized_manifest_is_unknown(store: FakeStore) -> None:
    big = store.add(b"{" + b" " * MAX_MANIFEST_SIZE + b"}", mediatypes.OCI_MANIFEST)
    async with client_for(create_app(store)) as c:
        r = await c.get(f"/v2/a/manifests/{big}")
        assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"


async def test_unknown_manifest(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/library/nginx/manifests/nope")
    assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
    assert r.headers["content-type"] == "application/json"
    h = await client.head("/v2/library/nginx/manifests/nope")
    assert h.status_code == 404 and h.content == b""
    d = await client.get(f"/v2/library/nginx/manifests/{Digest.of(b'x')}")
    assert d.status_code == 404 and error_code(d) == "MANIFEST_UNKNOWN"


async def test_name_with_slashes_and_keyword_components(store: FakeStore) -> None:
    image = add_image(store, "docker.io", "a/manifests/blobs/b", "t")
    async with client_for(create_app(store)) as c:
        r = await c.get("/v2/a/manifests/blobs/b/manifests/t")
        assert r.status_code == 200 and r.content == image.manifest_bytes
        r = await c.get(f"/v2/a/manifests/blobs/b/blobs/{image.layer}")
        assert r.status_code == 200 and r.content == image.layer_bytes


# -- blobs -------------------------------------------------------------------------

async def test_blob_get_and_head(client: httpx.AsyncClient, image: Image) -> None:
    r = await client.get(f"/v2/library/nginx/blobs/{image.layer}?ns=docker.io")
    assert r.status_code == 200 and r.content == image.layer_bytes
    for response in (r, await client.head(f"/v2/library/nginx/blobs/{image.layer}")):
        assert response.headers["content-length"] == str(len(image.layer_bytes))
        assert response.headers["docker-content-digest"] == str(image.layer)
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["docker-distribution-api-version"] == V2
        assert "content-range" not in response.headers


@pytest.mark.parametrize(("header", "first", "end"), [
    ("bytes=0-0", 0, 1),
    ("bytes=10-99", 10, 100),
    ("bytes=100-", 100, None),
    ("bytes=-300", 102400 - 300, None),
    ("bytes=5000-999999999", 5000, None),
    ("bytes=-999999", 0, None),
    ("BYTES = 7-8", 7, 9),
])
async def test_blob_ranges(client: httpx.AsyncClient, image: Image, header: str, first: int,
                           end: int | None) -> None:
    data = image.layer_bytes
    assert len(data) == 102400
    expected = data[first:end]
    r = await client.get(f"/v2/library/nginx/blobs/{image.layer}", headers={"Range": header})
    assert r.status_code == 206
    assert r.content == expected
    assert r.headers["content-range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    assert r.headers["content-length"] == str(len(expected))
    assert r.headers["docker-content-digest"] == str(image.layer)


@pytest.mark.parametrize("header", ["bytes=102400-", "bytes=999999-1000000", "bytes=-0"])
async def test_unsatisfiable_range(client: httpx.AsyncClient, image: Image, header: str) -> None:
    r = await client.get(f"/v2/library/nginx/blobs/{image.layer}", headers={"Range": header})
    assert r.status_code == 416 and error_code(r) == "RANGE_INVALID"
    assert r.headers["content-range"] == f"bytes */{len(image.layer_bytes)}"


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=5-1", "bytes=", "bytes=1-2-3",
                                    "bytes=--5", "garbage", "bytes=" + "9" * 30 + "-",
                                    "bytes=0-" + "x" * 2000])
async def test_malformed_range_is_416(client: httpx.AsyncClient, image: Image,
                                      header: str) -> None:
    r = await client.get(f"/v2/library/nginx/blobs/{image.layer}", headers={"Range": header})
    assert r.status_code == 416 and error_code(r) == "RANGE_INVALID"


@pytest.mark.parametrize("header", ["bytes=0-1,5-9", "items=0-5", "bytes=0-1, -5"])
async def test_ignored_ranges_serve_everything(client: httpx.AsyncClient, image: Image,
                                               header: str) -> None:
    r = await client.get(f"/v2/library/nginx/blobs/{image.layer}", headers={"Range": header})
    assert r.status_code == 200 and r.content == image.layer_bytes


async def test_if_range(client: httpx.AsyncClient, image: Image) -> None:
    url = f"/v2/library/nginx/blobs/{image.layer}"
    match = await client.get(url, headers={"Range": "bytes=1-2", "If-Range": f'"{image.layer}"'})
    assert match.status_code == 206 and match.content == image.layer_bytes[1:3]
    other = await client.get(url, headers={"Range": "bytes=1-2", "If-Range": '"other"'})
    assert other.status_code == 200 and other.content == image.layer_bytes


async def test_head_ignores_range(client: httpx.AsyncClient, image: Image) -> None:
    r = await client.head(f"/v2/library/nginx/blobs/{image.layer}",
                          headers={"Range": "bytes=0-9"})
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(image.layer_bytes))


async def test_empty_blob(store: FakeStore) -> None:
    empty = store.add(b"")
    async with client_for(create_app(store)) as c:
        r = await c.get(f"/v2/a/blobs/{empty}")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
        suffix = await c.get(f"/v2/a/blobs/{empty}", headers={"Range": "bytes=-5"})
        assert suffix.status_code == 200 and suffix.content == b""
        start = await c.get(f"/v2/a/blobs/{empty}", headers={"Range": "bytes=0-"})
        assert start.status_code == 416 and start.headers["content-range"] == "bytes */0"


async def test_blob_streams_in_store_chunks() -> None:
    store = FakeStore(chunk=1024)
    image = add_image(store, "docker.io", "library/nginx", "1.25",
                      layer=bytes(range(256)) * 400)
    sent = await call(create_app(store), "GET", f"/v2/library/nginx/blobs/{image.layer}")
    assert sent.status == 200 and sent.body == image.layer_bytes
    assert [len(c) for c in sent.chunks] == [1024] * 100


async def test_unknown_blob(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v2/library/nginx/blobs/{Digest.of(b'absent')}")
    assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"
    h = await client.head(f"/v2/library/nginx/blobs/{Digest.of(b'absent')}")
    assert h.status_code == 404 and h.content == b""


# -- malformed requests ---------------------------------------------------------------

@pytest.mark.parametrize(("path", "code"), [
    ("/v2/Library/nginx/manifests/1", "NAME_INVALID"),
    ("/v2/a..b/manifests/1", "NAME_INVALID"),
    ("/v2/../etc/manifests/1", "NAME_INVALID"),
    ("/v2//manifests/1", "NAME_INVALID"),
    ("/v2/a/manifests/-bad", "TAG_INVALID"),
    ("/v2/a/manifests/" + "t" * 129, "TAG_INVALID"),
    ("/v2/a/manifests/sha256:abc", "DIGEST_INVALID"),
    ("/v2/a/blobs/latest", "DIGEST_INVALID"),
    ("/v2/a/blobs/md5:" + "0" * 32, "DIGEST_INVALID"),
    ("/v2/a/blobs/sha256:" + "A" * 64, "DIGEST_INVALID"),
    ("/v2/a/blobs/sha256:..", "DIGEST_INVALID"),
    ("/v2/a/blobs/sha256:../../../../etc/passwd", "NOT_FOUND"),
    ("/v2/a/blobs/sha256:\x00" + "0" * 63, "DIGEST_INVALID"),
    ("/v2/a/tags/list", "NOT_FOUND"),
    ("/v2/_catalog", "NOT_FOUND"),
    ("/v2/a/blobs/uploads/", "NOT_FOUND"),
    ("/v2/a/manifests/", "TAG_INVALID"),
])
async def test_malformed_paths(store: FakeStore, image: Image, path: str, code: str) -> None:
    # Sent raw: an HTTP client would normalise "/../" away before we saw it.
    sent = await call(create_app(store), "GET", path)
    assert sent.status == (404 if code == "NOT_FOUND" else 400)
    assert json.loads(sent.body)["errors"][0]["code"] == code
    assert store.reads == []


@pytest.mark.parametrize("ns", ["bad host", "-x.io", "a:b:c", "x" * 300])
async def test_invalid_ns(client: httpx.AsyncClient, ns: str) -> None:
    r = await client.get("/v2/library/nginx/manifests/1.25", params={"ns": ns})
    assert r.status_code == 400 and error_code(r) == "NAME_INVALID"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_other_methods_unsupported(client: httpx.AsyncClient, image: Image,
                                         method: str) -> None:
    for path in ("/v2/", f"/v2/library/nginx/blobs/{image.layer}",
                 "/v2/library/nginx/manifests/1.25", "/v2/library/nginx/blobs/uploads/"):
        r = await client.request(method, path)
        assert r.status_code == 405 and error_code(r) == "UNSUPPORTED"
        assert r.headers["allow"] == "GET, HEAD"


# -- health --------------------------------------------------------------------------

async def test_health_and_readiness(client: httpx.AsyncClient, store: FakeStore) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).json() == {"ready": True}
    store.set_ready(False)
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"ready": False}


# -- store failures and the fallback ------------------------------------------------

async def test_store_failure_is_a_404_not_a_500(client: httpx.AsyncClient, store: FakeStore,
                                                image: Image) -> None:
    store.fail_with = ConnectionError("containerd restarting")
    assert (await client.get("/v2/library/nginx/manifests/1.25")).status_code == 404
    assert (await client.get(f"/v2/library/nginx/blobs/{image.layer}")).status_code == 404


async def test_blob_vanishing_between_stat_and_read_is_a_404(store: FakeStore,
                                                             image: Image) -> None:
    class Vanishing(FakeStore):
        async def read(self, digest: Digest, offset: int = 0,
                       length: int | None = None) -> AsyncIterator[bytes]:
            from meshmirror.store.base import NotFoundError
            raise NotFoundError(str(digest))
            yield b""

    vanishing = Vanishing()
    vanishing.add(image.layer_bytes)
    async with client_for(create_app(vanishing)) as c:
        r = await c.get(f"/v2/x/blobs/{image.layer}")
        assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"


def last_call(fallback: FakeFallback) -> tuple[str, ...]:
    return fallback.calls[-1]


async def test_fallback_serves_local_misses(store: FakeStore, image: Image) -> None:
    fallback = FakeFallback()
    remote = add_image(fallback.store, "quay.io", "team/app", "v2",
                       layer=b"remote-layer" * 500)
    app = create_app(store, fallback=fallback)
    async with client_for(app) as c:
        # local hits never reach the fallback
        assert (await c.get("/v2/library/nginx/manifests/1.25")).status_code == 200
        assert fallback.calls == []

        r = await c.get("/v2/team/app/manifests/v2?ns=quay.io")
        assert r.status_code == 200 and r.content == remote.manifest_bytes
        assert r.headers["docker-content-digest"] == str(remote.manifest)
        assert r.headers["content-type"] == mediatypes.OCI_MANIFEST
        assert last_call(fallback) == ("manifest", "quay.io", "team/app", "v2", "True")

        h = await c.head(f"/v2/team/app/manifests/{remote.manifest}?ns=quay.io")
        assert h.status_code == 200 and h.content == b""
        assert last_call(fallback)[-1] == "False"

        b = await c.get(f"/v2/team/app/blobs/{remote.layer}?ns=quay.io")
        assert b.status_code == 200 and b.content == remote.layer_bytes
        assert b.headers["content-length"] == str(len(remote.layer_bytes))

        part = await c.get(f"/v2/team/app/blobs/{remote.layer}?ns=quay.io",
                           headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == remote.layer_bytes[100:]
        assert part.headers["content-range"] == (
            f"bytes 100-{len(remote.layer_bytes) - 1}/{len(remote.layer_bytes)}")
        assert last_call(fallback)[-1] == "RangeSpec(first=100, last=None, suffix=None)"

        bad = await c.get(f"/v2/team/app/blobs/{remote.layer}?ns=quay.io",
                          headers={"Range": f"bytes={len(remote.layer_bytes)}-"})
        assert bad.status_code == 416
        assert bad.headers["content-range"] == f"bytes */{len(remote.layer_bytes)}"

        miss = await c.get(f"/v2/team/app/blobs/{Digest.of(b'nowhere')}?ns=quay.io")
        assert miss.status_code == 404 and error_code(miss) == "BLOB_UNKNOWN"
        miss = await c.get("/v2/team/app/manifests/none?ns=quay.io")
        assert miss.status_code == 404 and error_code(miss) == "MANIFEST_UNKNOWN"
    assert fallback.closed == 3  # every body handed out was closed


async def test_fallback_layer_is_never_served_as_a_manifest(store: FakeStore) -> None:
    fallback = FakeFallback()
    remote = add_image(fallback.store, "quay.io", "team/app", "v2")
    async with client_for(create_app(store, fallback=fallback)) as c:
        r = await c.get(f"/v2/team/app/manifests/{remote.layer}?ns=quay.io")
        assert r.status_code == 404 and error_code(r) == "MANIFEST_UNKNOWN"
        assert last_call(fallback)[0] == "manifest"


async def test_fallback_body_is_closed_when_the_response_never_starts(store: FakeStore) -> None:
    """The client is gone by the time the headers go out: the body was never iterated,
    and must still be closed (a mirror's body holds a peer's connection)."""

    class Body:
        closed = False

        def __aiter__(self) -> Body:
            return self

        async def __anext__(self) -> bytes:
            return b"x"

        async def aclose(self) -> None:
            self.closed = True

    body = Body()

    class Found(FakeFallback):
        async def open_blob(self, registry: str, repository: str, digest: Digest,
                            byte_range: RangeSpec | None, want_body: bool
                            ) -> FallbackContent | Miss:
            return FallbackContent(digest, 1, None, body)

    app = create_app(store, fallback=Found())
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": f"/v2/a/blobs/{Digest.of(b'x')}", "raw_path": b"", "query_string": b"",
             "root_path": "", "headers": [], "client": ("127.0.0.9", 4242),
             "server": ("127.0.0.1", 5000)}

    async def receive() -> Message:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise OSError("the client is gone")

    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    assert body.closed


async def test_failing_fallback_is_a_404(store: FakeStore,
                                         caplog: pytest.LogCaptureFixture) -> None:
    fallback = FakeFallback(raise_error=True)
    with caplog.at_level(logging.INFO, logger="meshmirror.access"):
        async with client_for(create_app(store, fallback=fallback)) as c:
            assert (await c.get("/v2/a/manifests/t")).status_code == 404
            assert (await c.get(f"/v2/a/blobs/{Digest.of(b'z')}")).status_code == 404
    records = [r for r in caplog.records if r.name == "meshmirror.access"]
    assert [access_fields(r)["reason"] for r in records] == ["error", "error"]


# -- observability -------------------------------------------------------------------

def access_fields(record: logging.LogRecord) -> dict[str, object]:
    """The ``fields`` an access-log record carries (set through ``extra``)."""
    fields = record.__dict__["fields"]
    assert isinstance(fields, dict), fields
    return fields


async def test_access_log_line_per_request(client: httpx.AsyncClient, image: Image,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="meshmirror.access"):
        await client.get(f"/v2/library/nginx/blobs/{image.layer}?ns=docker.io",
                         headers={"Range": "bytes=0-9"})
        await client.get("/v2/library/nginx/manifests/missing")
    records = [r for r in caplog.records if r.name == "meshmirror.access"]
    assert len(records) == 2
    blob = access_fields(records[0])
    assert blob["handler"] == "blob" and blob["method"] == "GET"
    assert blob["path"] == f"/v2/library/nginx/blobs/{image.layer}"
    assert blob["query"] == "ns=docker.io"
    assert blob["status"] == 206 and blob["bytes"] == 10 and blob["source"] == "local"
    assert isinstance(blob["latency_ms"], float) and blob["client"]
    assert "reason" not in blob, "a request served has no reason"
    missing = access_fields(records[1])
    assert missing["handler"] == "manifest" and missing["status"] == 404
    assert missing["reason"] == "not_held", "no fallback: the store is all there is"


async def test_an_aborted_fallback_body_logs_its_reason(
        store: FakeStore, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakeFallback):
        async def open_blob(self, registry: str, repository: str, digest: Digest,
                            byte_range: RangeSpec | None, want_body: bool
                            ) -> FallbackContent | Miss:
            async def body() -> AsyncIterator[bytes]:
                yield b"x"
                raise BodyAborted("did not verify")

            return FallbackContent(digest, 2, None, body())

    registry = CollectorRegistry()
    app = create_app(store, fallback=Broken(), metrics=RegistryMetrics(registry))
    with caplog.at_level(logging.INFO, logger="meshmirror.access"), \
            pytest.raises(BodyAborted):
        await call(app, "GET", f"/v2/a/blobs/{Digest.of(b'zz')}")
    [record] = [r for r in caplog.records if r.name == "meshmirror.access"]
    assert access_fields(record)["reason"] == "peers_failed"
    assert access_fields(record)["aborted"] is True
    assert registry.get_sample_value("meshmirror_mirror_misses_total",
                                     {"reason": "peers_failed"}) == 1


async def test_metrics_count_requests(store: FakeStore, image: Image) -> None:
    registry = CollectorRegistry()
    app = create_app(store, metrics=RegistryMetrics(registry))
    async with client_for(app) as c:
        await c.get(f"/v2/a/blobs/{image.layer}")
        await c.head(f"/v2/a/blobs/{image.layer}")
    labels = {"handler": "blob", "method": "GET", "code": "200"}
    assert registry.get_sample_value("meshmirror_http_request_duration_seconds_count",
                                     labels) == 1
    assert registry.get_sample_value("meshmirror_http_response_size_bytes_sum",
                                     labels) == len(image.layer_bytes)
    assert registry.get_sample_value("meshmirror_registry_response_bytes_total",
                                     {"handler": "blob", "source": "local"}) == len(
                                         image.layer_bytes)
    assert registry.get_sample_value("meshmirror_http_requests_inflight") == 0
