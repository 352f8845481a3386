"""Real Distribution registries of the three kinds, each holding pushed images.

Module-scoped: one registry of each kind serves every test in a module, and
tests only read from them (faults are set on a token server and reset after).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.upstream import UpstreamClient, UpstreamEndpoints
from tests.support.distribution import DistributionRegistry, HtpasswdAuth, TokenAuth
from tests.support.skopeo import push_layout
from tests.support.token_server import ISSUER, LOOPBACK_ALLOWED, SERVICE, TokenServer

TAG = "1"
PUBLIC_REPO = "pub/app"
PRIVATE_REPO = "priv/app"
USER = ("alice", "alice-secret")


class FakeClock:
    """Monotonic time a test moves by hand, for token lifetimes and breaker cool-downs."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Upstream:
    registry: DistributionRegistry
    digest: Digest  # what skopeo pushed as every repository's TAG
    token_server: TokenServer | None = None

    @property
    def name(self) -> str:
        return self.registry.address


def client_for(*upstreams: Upstream | tuple[str, str], **options: object) -> UpstreamClient:
    """A client whose mapping sends each upstream's name to its plain-http URL."""
    overrides = dict(u if isinstance(u, tuple) else (u.name, u.registry.url) for u in upstreams)
    options.setdefault("guard", LOOPBACK_ALLOWED)
    return UpstreamClient(UpstreamEndpoints(overrides=overrides), **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_image(f"example.com/demo/app:{TAG}", tmp_path_factory.mktemp("layout"))


@pytest.fixture(scope="module")
def public_upstream(image: BuiltImage) -> Iterator[Upstream]:
    with DistributionRegistry() as registry:
        yield Upstream(registry, push_layout(image.layout, TAG, registry.address, PUBLIC_REPO))


@pytest.fixture(scope="module")
def token_upstream(image: BuiltImage,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    directory = tmp_path_factory.mktemp("token")
    with TokenServer(directory, public={PUBLIC_REPO}) as tokens:
        auth = TokenAuth(tokens.realm, SERVICE, ISSUER, tokens.rootcertbundle)
        with DistributionRegistry(auth=auth) as registry:
            digest = push_layout(image.layout, TAG, registry.address, PUBLIC_REPO, tokens.pusher)
            push_layout(image.layout, TAG, registry.address, PRIVATE_REPO, tokens.pusher)
            yield Upstream(registry, digest, tokens)


@pytest.fixture
def token_faults(token_upstream: Upstream) -> Iterator[TokenServer]:
    """The module's token server, its fault switches reset after the test."""
    assert token_upstream.token_server is not None
    yield token_upstream.token_server
    token_upstream.token_server.garbage = False
    token_upstream.token_server.refuse_anonymous = False


@pytest.fixture(scope="module")
def htpasswd_upstream(image: BuiltImage,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    auth = HtpasswdAuth.write(Path(tmp_path_factory.mktemp("htpasswd")) / "htpasswd",
                              {USER[0]: USER[1]})
    with DistributionRegistry(auth=auth) as registry:
        yield Upstream(registry,
                       push_layout(image.layout, TAG, registry.address, PRIVATE_REPO, USER))
