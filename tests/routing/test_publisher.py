from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypedDict

import pytest
from prometheus_client import CollectorRegistry

from meshmirror.oci.imagebuilder import build_image
from meshmirror.routing.bloom import MASK
from meshmirror.routing.publisher import EpochClock, SummaryPublisher
from meshmirror.routing.summary import Summary
from meshmirror.store.memory import MemoryStore
from tests.routing.fakes import KeyStore, digest_key, until


class Recorder:
    def __init__(self) -> None:
        self.versions: list[Summary] = []

    def __call__(self, summary: Summary) -> None:
        self.versions.append(summary)


Started = tuple[KeyStore, SummaryPublisher, Recorder, CollectorRegistry]


@pytest.fixture
async def started() -> AsyncIterator[Started]:
    store = KeyStore({digest_key(i) for i in range(1000)})
    registry = CollectorRegistry()
    recorder = Recorder()
    publisher = SummaryPublisher(store, 0.01, registry=registry, on_publish=recorder,
                                 debounce_s=0.15)
    await publisher.start()
    try:
        yield store, publisher, recorder, registry
    finally:
        await publisher.close()


async def _next_version(publisher: SummaryPublisher, after: int) -> Summary:
    async with asyncio.timeout(2):
        return await publisher.wait_for(lambda s: s.epoch > after)


async def test_first_version_is_published_by_start(started: Started) -> None:
    _store, publisher, recorder, registry = started
    current = publisher.current
    assert current is not None
    assert current.count == 1000
    assert all(digest_key(i) in current for i in range(1000))
    assert recorder.versions == [current]
    assert publisher.ranged_payload == current.encode()
    legacy = Summary.decode(publisher.payload)  # version 1 for peers that read only that
    assert legacy.reduction == MASK and legacy.epoch == current.epoch
    assert all(digest_key(i) in legacy for i in range(1000))
    assert registry.get_sample_value("meshmirror_summary_keys") == 1000
    assert registry.get_sample_value("meshmirror_summary_epoch") == current.epoch


async def test_a_change_is_published_within_a_second_in_one_version(started: Started) -> None:
    store, publisher, recorder, registry = started
    first = publisher.current
    assert first is not None
    before = time.monotonic()
    for i in range(30):  # a pulled image: a burst of keys
        store.add(digest_key(f"new{i}"))
        await asyncio.sleep(0.002)
    summary = await _next_version(publisher, first.epoch)
    elapsed = time.monotonic() - before
    assert elapsed < 1.0
    await asyncio.sleep(0.3)
    # Debounced: the whole burst went into one version.
    assert len(recorder.versions) == 2
    summary = recorder.versions[-1]
    assert summary.count == 1030
    assert all(digest_key(f"new{i}") in summary for i in range(30))
    assert registry.get_sample_value("meshmirror_summary_keys") == 1030
    assert registry.get_sample_value("meshmirror_summary_epoch") == summary.epoch
    # Additions are OR-ed in, not rebuilt.
    assert registry.get_sample_value("meshmirror_summary_rebuilds_total") == 1


async def test_a_continuous_stream_of_changes_still_publishes_within_a_second(
        started: Started) -> None:
    store, publisher, _recorder, _ = started
    first = publisher.current
    assert first is not None

    async def trickle() -> None:
        for i in range(200):
            store.add(digest_key(f"trickle{i}"))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(trickle())
    try:
        await asyncio.sleep(0.02)
        before = time.monotonic()
        await _next_version(publisher, first.epoch)
        assert time.monotonic() - before < 1.0
    finally:
        task.cancel()


async def test_born_at_is_the_arrival_of_the_oldest_new_key(started: Started) -> None:
    store, publisher, _, _ = started
    first = publisher.current
    assert first is not None
    arrived = time.time_ns() // 1_000_000
    store.add(digest_key("fresh"))
    summary = await _next_version(publisher, first.epoch)
    assert arrived - 5 <= summary.born_at_ms <= arrived + 100
    assert summary.born_at_ms > first.born_at_ms
    # A removal-only version carries no new key: born_at does not move.
    store.remove(digest_key("fresh"))
    later = await _next_version(publisher, summary.epoch)
    assert later.born_at_ms == summary.born_at_ms


async def test_few_removals_do_not_rebuild(started: Started) -> None:
    store, publisher, _, _registry = started
    first = publisher.current
    assert first is not None
    store.remove(*[digest_key(i) for i in range(40)])  # 4% of 1000
    summary = await _next_version(publisher, first.epoch)
    assert summary.count == 960
    assert publisher.rebuilds == 1
    # Bloom filters cannot delete: the removed keys still match until a rebuild.
    assert all(digest_key(i) in summary for i in range(40))


async def test_removals_over_five_percent_rebuild_from_the_store(started: Started) -> None:
    store, publisher, _, registry = started
    first = publisher.current
    assert first is not None
    removed = [digest_key(i) for i in range(60)]  # 6% of 1000
    store.remove(*removed)
    summary = await _next_version(publisher, first.epoch)
    assert summary.count == 940
    assert publisher.rebuilds == 2
    assert registry.get_sample_value("meshmirror_summary_rebuilds_total") == 2
    assert sum(key in summary for key in removed) <= 3  # only false positives remain
    assert all(digest_key(i) in summary for i in range(60, 1000))


async def test_growth_past_capacity_rebuilds_a_bigger_filter(started: Started) -> None:
    store, publisher, _, _ = started
    first = publisher.current
    assert first is not None
    store.add(*[digest_key(f"grow{i}") for i in range(4000)])
    summary = await _next_version(publisher, first.epoch)
    assert publisher.rebuilds == 2
    assert summary.m > first.m
    assert summary.count == 5000
    assert summary.filter().estimated_fp_rate() <= 0.01


async def test_a_store_whose_keys_arrive_at_once_is_rebuilt_for_them() -> None:
    # containerd's store is empty until its first sync, then adds everything in one event:
    # the publisher builds the filter from the store's keys, born when they arrived.
    store = KeyStore(set())
    publisher = SummaryPublisher(store, 0.01, debounce_s=0.05)
    await publisher.start()
    try:
        first = publisher.current
        assert first is not None and first.count == 0
        before_ms = time.time_ns() // 1_000_000
        store.add(*[digest_key(f"synced{i}") for i in range(5000)])
        summary = await _next_version(publisher, first.epoch)
        assert publisher.rebuilds == 2 and summary.count == 5000
        assert all(digest_key(f"synced{i}") in summary for i in range(5000))
        assert summary.born_at_ms >= before_ms
        assert summary.filter().estimated_fp_rate() <= 0.01
    finally:
        await publisher.close()


async def test_events_lost_by_the_store_are_repaired_by_reconcile() -> None:
    store = KeyStore({digest_key(i) for i in range(10)})
    publisher = SummaryPublisher(store, debounce_s=0.01, reconcile_interval_s=0.2)
    await publisher.start()
    try:
        first = publisher.current
        assert first is not None
        store.lose_events = True
        store.add(digest_key("lost"))
        summary = await _next_version(publisher, first.epoch)
        assert digest_key("lost") in summary
        assert summary.count == 11
    finally:
        await publisher.close()


async def test_events_racing_a_rebuild_are_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore({digest_key(i) for i in range(100)})
    publisher = SummaryPublisher(store, debounce_s=0.01, reconcile_interval_s=0)
    await publisher.start()
    try:
        real_keys = store.keys

        async def slow_keys() -> frozenset[str]:
            snapshot = await real_keys()
            # A key arrives after the snapshot was taken but before it is installed.
            store.add(digest_key("racer"))
            await asyncio.sleep(0.05)
            return snapshot

        monkeypatch.setattr(store, "keys", slow_keys)
        store.remove(*[digest_key(i) for i in range(20)])  # forces a rebuild
        async with asyncio.timeout(2):
            summary = await publisher.wait_for(lambda s: digest_key("racer") in s)
        assert summary.count == 81
    finally:
        await publisher.close()


def test_epochs_never_go_backwards_even_within_one_millisecond() -> None:
    now = [1000]
    clock = EpochClock(lambda: now[0])
    assert [clock.next(), clock.next(), clock.next()] == [1000, 1001, 1002]
    now[0] = 5000
    assert clock.next() == 5000
    now[0] = 10  # wall clock stepped back
    assert clock.next() == 5001


def test_a_restarted_node_starts_past_its_old_epochs() -> None:
    first = EpochClock()
    old = [first.next() for _ in range(5)]
    time.sleep(0.01)
    assert EpochClock().next() > max(old)


class Settings(TypedDict, total=False):
    fp_rate: float
    debounce_s: float
    rebuild_fraction: float
    max_fp_factor: float


@pytest.mark.parametrize("kwargs", [Settings(fp_rate=0), Settings(debounce_s=-1),
                                    Settings(rebuild_fraction=0), Settings(max_fp_factor=1)])
def test_bad_settings_are_refused(kwargs: Settings) -> None:
    with pytest.raises(ValueError):
        SummaryPublisher(KeyStore(), **kwargs)


async def test_start_twice_is_an_error(started: Started) -> None:
    _, publisher, _, _ = started
    with pytest.raises(RuntimeError, match="already started"):
        await publisher.start()


async def test_with_the_real_memory_store() -> None:
    from meshmirror.store.memory import MemoryStore

    store = MemoryStore()
    first_blob = store.add_blob(b"config")
    publisher = SummaryPublisher(store, debounce_s=0.05)
    await publisher.start()
    try:
        current = publisher.current
        assert current is not None
        assert str(first_blob) in current
        blob = store.add_blob(b"a layer")
        store.tag("docker.io", "library/app", "1", blob)
        async with asyncio.timeout(1):
            summary = await publisher.wait_for(
                lambda s: "docker.io/library/app:1" in s and str(blob) in s)
        assert summary.count == 3
    finally:
        await publisher.close()
        await store.close()


async def test_image_digests_are_counted_per_registry_from_the_tags(tmp_path: Path) -> None:
    store = MemoryStore()
    one = build_image("docker.io/library/one:1", tmp_path / "one", (100,), seed=1)
    two = build_image("ghcr.io/acme/two:1", tmp_path / "two", (100,), seed=2)
    store.add_image(one)
    store.add_image(two)
    store.tag("docker.io", "library/one", "latest", one.digest)  # a second tag, same image
    registry = CollectorRegistry()
    publisher = SummaryPublisher(store, registry=registry, debounce_s=0.01)
    await publisher.start()
    try:
        def gauge(name: str, reg: str) -> float | None:
            return registry.get_sample_value(name, {"registry": reg})

        await until(lambda: gauge("meshmirror_advertised_image_digests", "ghcr.io") == 1)
        assert gauge("meshmirror_advertised_image_digests", "docker.io") == 1
        assert gauge("meshmirror_advertised_image_tags", "docker.io") == 2
        assert gauge("meshmirror_advertised_image_tags", "ghcr.io") == 1
    finally:
        await publisher.close()


async def test_the_published_bytes_for_given_keys_never_change() -> None:
    """Peers and older nodes decode these bytes: how the publisher holds its keys
    (strings, hashes) must not change what it publishes for them, including after
    additions and removals. The digests were taken from the publisher that held a
    set of strings."""
    store = KeyStore({digest_key(i) for i in range(5000)} | {"docker.io/library/app:1"})
    publisher = SummaryPublisher(store, debounce_s=0.01, reconcile_interval_s=0,
                                 epochs=EpochClock(lambda: 1000), wall_ms=lambda: 7)
    await publisher.start()
    try:
        got = [publisher.ranged_payload, publisher.payload]
        store.add(*[digest_key(f"new{i}") for i in range(30)], "docker.io/library/app:2")
        store.remove(digest_key(0), "docker.io/library/app:1")
        summary = await _next_version(publisher, 1000)
        got += [publisher.ranged_payload, publisher.payload, publisher.delta_since(1000) or b""]
        assert summary.count == 5030
    finally:
        await publisher.close()
    assert [hashlib.sha256(b).hexdigest() for b in got] == [
        "12f86e4c8cb2affb3e91ea1d0671f6c9e0083c297c6fbe7eb81c807c6e343001",
        "03f345914137e2455143ab6cca834e907f7ec9a3f08dd1d39436ed58b8c103c9",
        "b687cd04f047ff3a33a043a1e7d9127f1044734d6d5cca283c6ac5f1e6cf0ae5",
        "ba6c84071ff107553c91d6a356e541eae0129b0256d28441f526f26d5439b375",
        "1ee435586b2c7db714b17156648c4f3a5cb32e8ee139b714270034ec2fefee59"]


async def test_removals_lost_by_the_store_are_repaired_by_reconcile() -> None:
    store = KeyStore({digest_key(i) for i in range(10)})
    publisher = SummaryPublisher(store, debounce_s=0.01, reconcile_interval_s=0.2)
    await publisher.start()
    try:
        first = publisher.current
        assert first is not None
        store.lose_events = True
        store.remove(digest_key(3))
        summary = await _next_version(publisher, first.epoch)
        assert summary.count == 9
        assert digest_key(3) not in summary.filter()
    finally:
        await publisher.close()
