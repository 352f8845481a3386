"""Publisher -> HTTP endpoint -> directory -> router, over real loopback HTTP."""

from __future__ import annotations

import time

from tests.routing.fakes import KeyStore, digest_key, until
from tests.routing.servers import published_peer


async def test_a_new_key_on_one_node_is_routable_on_another_within_a_second() -> None:
    store = KeyStore({digest_key(i) for i in range(2000)})
    async with published_peer(store, timeout_s=1) as wired:
        router, registry, peer = wired.router, wired.registry, wired.peer
        assert router.candidates(digest_key(5)) == [peer]
        assert router.candidates(digest_key("layer")) == []

        started = time.monotonic()
        store.add(digest_key("layer"), "docker.io/library/app:1")
        await until(lambda: router.candidates(digest_key("layer")) == [peer])
        assert time.monotonic() - started < 1.0
        assert router.candidates("docker.io/library/app:1") == [peer]
        assert registry.get_sample_value(
            "meshmirror_summary_propagation_seconds_count") == 1
        propagation = registry.get_sample_value(
            "meshmirror_summary_propagation_seconds_sum")
        assert propagation is not None
        assert 0.1 <= propagation < 1.0  # at least the debounce, within the deadline
        assert registry.get_sample_value("meshmirror_peer_summaries_share") == 1.0
