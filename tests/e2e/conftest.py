"""Shared, expensive things for the end-to-end modules: one upstream and one big image."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from tests.support.distribution import DistributionRegistry
from tests.support.proxy import CountingProxy

MiB = 1024 * 1024
BIG_LAYER = 200 * MiB


@dataclass(frozen=True, slots=True)
class Upstream:
    registry: DistributionRegistry
    proxy: CountingProxy  # what nodes' hosts.toml name as the registry

    @property
    def address(self) -> str:
        return self.proxy.address


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    with DistributionRegistry() as registry, \
            CountingProxy(registry.host, registry.port) as proxy:
        yield Upstream(registry, proxy)


@pytest.fixture(scope="session")
def big_image(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """One 200 MiB layer, built once; seeded into nodes with ``ctr images import``."""
    base: Path = tmp_path_factory.mktemp("big")
    return build_image(f"{upstream.address}/e2e/big:1", base / "layout",
                       layer_sizes=(BIG_LAYER,), seed=200, archive=base / "big.tar")
