"""Visibility verdicts kept in a file outlive the process that learned them."""

from __future__ import annotations

import json
from pathlib import Path

from meshmirror.mirror.options import MirrorOptions
from meshmirror.mirror.visibility import VISIBILITY_FILE, VisibilityCache


class Clocks:
    """A monotonic clock that restarts at 0 with each process, and a wall clock."""

    def __init__(self) -> None:
        self.monotonic = 0.0
        self.wall = 1_800_000_000.0


def _cache(path: Path, clocks: Clocks, size: int = 4096) -> VisibilityCache:
    options = MirrorOptions(state_dir=path.parent, visibility_cache_size=size)
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
