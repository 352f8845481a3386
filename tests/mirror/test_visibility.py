"""Visibility verdicts kept in a file outlive the process that learned them, and
verdicts in use survive a flood of new repositories."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.visibility import (
    BLOB_PROBE_REFERENCE,
    SAVE_INTERVAL,
    VISIBILITY_FILE,
    Access,
    RepositoryAccess,
    VisibilityCache,
)
from meshmirror.upstream import FailureKind, Unknown
from tests.mirror.upstreams import ScriptedUpstream


class Clocks:
    """A monotonic clock that restarts at 0 with each process, and a wall clock."""

    def __init__(self) -> None:
        self.monotonic = 0.0
        self.wall = 1_800_000_000.0


def _cache(path: Path, clocks: Clocks, size: int = 4096) -> VisibilityCache:
    options = MirrorConfig(state_dir=path.parent, visibility_cache_size=size)
    return VisibilityCache(options, lambda: clocks.monotonic, path, lambda: clocks.wall)


def test_a_restarted_process_knows_what_the_last_one_learned(tmp_path: Path) -> None:
    path = tmp_path / VISIBILITY_FILE
    clocks = Clocks()
    first = _cache(path, clocks)
    first.remember("docker.io", "library/nginx", True)
    first.remember("ghcr.io", "acme/secret", False)

    clocks.monotonic, clocks.wall = 0.0, clocks.wall + 30  # a new process, 30 s later
    second = _cache(path, clocks)
    nginx = second.last("docker.io", "library/nginx")
    assert nginx is not None and nginx.public
    assert second.known_private("ghcr.io", "acme/secret")
    # Its age carried over: 30 s old, so still fresh under the 600 s public TTL.
    assert second.fresh("docker.io", "library/nginx") is True
    clocks.monotonic = 600
    assert second.fresh("docker.io", "library/nginx") is None
    assert second.last("docker.io", "library/nginx") is not None


def test_a_changed_verdict_replaces_the_kept_one(tmp_path: Path) -> None:
    path = tmp_path / VISIBILITY_FILE
    clocks = Clocks()
    cache = _cache(path, clocks)
    cache.remember("docker.io", "team/app", True)
    cache.remember("docker.io", "team/app", False)
    verdicts = json.loads(path.read_text())["verdicts"]
    assert [(v["repository"], v["public"]) for v in verdicts] == [("team/app", False)]


def test_an_unreadable_file_is_an_empty_cache(tmp_path: Path) -> None:
    path = tmp_path / VISIBILITY_FILE
    for content in ("not json", '{"verdicts": 3}', '{"verdicts": [{"registry": 1}]}'):
        path.write_text(content)
        assert len(_cache(path, Clocks())) == 0


def test_the_file_keeps_at_most_the_cache_size(tmp_path: Path) -> None:
    path = tmp_path / VISIBILITY_FILE
    clocks = Clocks()
    cache = _cache(path, clocks, size=2)
    for name in ("a", "b", "c"):
        cache.remember("docker.io", name, True)
    assert [v["repository"] for v in json.loads(path.read_text())["verdicts"]] == ["b", "c"]


def test_a_file_from_before_segments_loads_as_verdicts_in_use(tmp_path: Path) -> None:
    path = tmp_path / VISIBILITY_FILE
    path.write_text(json.dumps({"verdicts": [
        {"registry": "docker.io", "repository": "library/nginx", "public": True,
         "checked_unix": 1_800_000_000.0}]}))
    cache = _cache(path, Clocks())
    assert cache.protected("docker.io", "library/nginx")


async def test_a_flood_of_new_repositories_neither_evicts_verdicts_in_use_nor_rewrites_the_file(
        tmp_path: Path) -> None:
    """4,200 repositories seen once each, then an upstream outage: the repository in
    use still has its verdict, and the file was written a bounded number of times."""
    clock = [0.0]
    upstream = ScriptedUpstream()
    options = MirrorConfig(state_dir=tmp_path)
    access = RepositoryAccess(upstream, options, lambda: clock[0])
    announced: list[bool] = []
    access.cache.on_vouches_changed = lambda: announced.append(True)
    # The repository in use: a pull checks it for its manifest and each layer.
    for _ in range(3):
        assert await access.check("docker.io", "team/app", BLOB_PROBE_REFERENCE) is Access.SHARE
    started = time.monotonic()
    for i in range(4200):
        await access.check("docker.io", f"flood/repo-{i}", BLOB_PROBE_REFERENCE)
    await asyncio.sleep(SAVE_INTERVAL * 1.5)  # let the last batch land
    elapsed = time.monotonic() - started
    # The flood outgrew the cache (4,200 > 4,096), so it evicted: only its own.
    assert len(access.cache) == options.visibility_cache_size
    assert access.cache.last("docker.io", "flood/repo-0") is None
    assert access.cache.protected("docker.io", "team/app")
    # One batch per SAVE_INTERVAL at most, whatever the number of new verdicts.
    assert 1 <= access.cache.writes <= elapsed / SAVE_INTERVAL + 2
    print(f"4200 new verdicts in {elapsed:.2f} s: {access.cache.writes} writes")
    kept = json.loads((tmp_path / VISIBILITY_FILE).read_text())["verdicts"]
    assert ("docker.io", "team/app") in {(v["registry"], v["repository"]) for v in kept}
    # Only the verdict in use is vouched for, not the flood seen once each.
    assert len(access.cache.vouches()) == 1 and announced
    # Now the upstream is down and every verdict stale: the one in use still decides.
    upstream.visibility = Unknown(FailureKind.CONNECTION, "refused")
    clock[0] = 1e6
    assert await access.check("docker.io", "team/app", BLOB_PROBE_REFERENCE) is Access.SHARE
    access.close()
