from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from meshmirror.routing.bloom import MASK
from meshmirror.routing.publisher import SummaryPublisher
from meshmirror.routing.summary import MEDIA_TYPE, MEDIA_TYPE_V3, Summary, summary_route
from tests.routing.fakes import KeyStore, digest_key

Client = tuple[httpx.AsyncClient, SummaryPublisher]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    publisher = SummaryPublisher(KeyStore({digest_key(i) for i in range(50)}))
    await publisher.start()
    app = Starlette(routes=[summary_route(publisher)])
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://peer") as c:
            yield c, publisher
    finally:
        await publisher.close()


async def test_get_returns_the_binary_summary_with_its_epoch_as_etag(client: Client) -> None:
    c, publisher = client
    current = publisher.current
    assert current is not None  # start() publishes the first version
    resp = await c.get("/_mesh/v1/summary")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == MEDIA_TYPE
    assert resp.headers["etag"] == f'"{current.epoch}"'
    # Asked for nothing in particular: version 1, which every meshmirror reads.
    summary = Summary.decode(resp.content)
    assert summary.reduction == MASK and summary.m & (summary.m - 1) == 0
    assert (summary.epoch, summary.count) == (current.epoch, current.count)
    assert all(digest_key(i) in summary for i in range(50))
    resp = await c.get("/_mesh/v1/summary", headers={"Accept": MEDIA_TYPE_V3})
    assert resp.headers["content-type"] == MEDIA_TYPE_V3
    assert Summary.decode(resp.content) == current


@pytest.mark.parametrize("header", ['"{e}"', 'W/"{e}"', '"1", "{e}"', "*"])
async def test_if_none_match_on_the_current_epoch_is_304(client: Client, header: str) -> None:
    c, publisher = client
    current = publisher.current
    assert current is not None  # start() publishes the first version
    resp = await c.get("/_mesh/v1/summary",
                       headers={"If-None-Match": header.format(e=current.epoch)})
    assert resp.status_code == 304
    assert resp.content == b""
    assert resp.headers["etag"] == f'"{current.epoch}"'


async def test_an_older_etag_gets_the_new_summary(client: Client) -> None:
    c, publisher = client
    current = publisher.current
    assert current is not None  # start() publishes the first version
    resp = await c.get("/_mesh/v1/summary",
                       headers={"If-None-Match": f'"{current.epoch - 1}"'})
    assert resp.status_code == 200
    assert Summary.decode(resp.content).epoch == current.epoch


async def test_head_has_the_headers_and_no_body(client: Client) -> None:
    c, publisher = client
    current = publisher.current
    assert current is not None  # start() publishes the first version
    resp = await c.head("/_mesh/v1/summary")
    assert resp.status_code == 200
    assert resp.headers["etag"] == f'"{current.epoch}"'
    assert resp.content == b""


async def test_before_the_first_version_the_endpoint_says_retry() -> None:
    publisher = SummaryPublisher(KeyStore())
    app = Starlette(routes=[summary_route(publisher)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://peer") as c:
        resp = await c.get("/_mesh/v1/summary")
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"
