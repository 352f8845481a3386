"""The status model, the activity rings, the hosts.toml check and `members` formatting."""

from __future__ import annotations

import json
from pathlib import Path

from meshmirror.members import table
from meshmirror.mirror.metrics import MirrorRequest
from meshmirror.status.activity import MirrorActivity
from meshmirror.status.hostscheck import HostsConfigCollector, points_here
from meshmirror.status.model import printable


def _request(result: str, size: int | None, at: float) -> MirrorRequest:
    return MirrorRequest("docker.io", "blob", "/v2/r/blobs/sha256:ab", result,
                         "node1" if result == "hit" else None, size, 0.01, at)


def test_names_with_undecodable_bytes_become_valid_json() -> None:
    name = b"node\xff\xfe".decode("utf-8", "surrogateescape")
    shown = printable(name)
    assert shown == "node\\xff\\xfe"
    assert json.loads(json.dumps({"name": shown}, ensure_ascii=False).encode()) == {
        "name": shown}


def test_activity_counts_and_samples_at_most_once_per_interval() -> None:
    now = [1000.0]
    activity = MirrorActivity(interval=5.0, clock=lambda: now[0])
    activity.observe(_request("hit", 100, now[0]))
    now[0] += 1
    activity.observe(_request("miss", None, now[0]))
    now[0] += 1
    activity.observe(_request("hit", 50, now[0]))
    assert (activity.hits, activity.misses, activity.peer_bytes) == (2, 1, 150)
    assert activity.hit_ratio == 2 / 3
    assert activity.last_success_unix_seconds == 1002.0
    # Within one interval the newest sample is updated in place.
    assert [s.hits for s in activity.history] == [1, 2]
    now[0] += 10
    activity.sample()
    assert len(activity.history) == 3
    now[0] += 16 * 60
    activity.sample()
    assert len(activity.history) == 1, "samples older than 15 minutes are dropped"


def test_recent_requests_keep_the_last_fifty() -> None:
    activity = MirrorActivity()
    for i in range(60):
        activity.observe(_request("hit", i, float(i)))
    assert len(activity.recent) == 50 and activity.recent[0].size_bytes == 10


def test_hosts_config_points_here(tmp_path: Path) -> None:
    ours = tmp_path / "docker.io"
    ours.mkdir()
    (ours / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        '[host."http://10.0.0.7:5000"]\n  capabilities = ["pull", "resolve"]\n')
    other = tmp_path / "ghcr.io"
    other.mkdir()
    (other / "hosts.toml").write_text('server = "https://ghcr.io"\n')
    assert points_here(ours / "hosts.toml", "http://10.0.0.7:5000")
    assert not points_here(ours / "hosts.toml", "http://10.0.0.8:5000")
    assert not points_here(tmp_path / "missing.toml", "http://10.0.0.7:5000")
    [family] = HostsConfigCollector(tmp_path, "http://10.0.0.7:5000").collect()
    assert {s.labels["registry"]: s.value for s in family.samples} == {
        "docker.io": 1.0, "ghcr.io": 0.0}


def test_hosts_config_gauge_skips_configures_backup(tmp_path: Path) -> None:
    """configure moves what the directory held into _backup: no registry, no alert."""
    from meshmirror.cli import main

    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "hosts.toml").write_text('server = "https://ghcr.io"\n')
    assert main(["configure", "--containerd-registry-config-path", str(tmp_path),
                 "--mirror-targets", "http://10.0.0.7:5000"]) == 0
    assert (tmp_path / "_backup").is_dir()
    [family] = HostsConfigCollector(tmp_path, "http://10.0.0.7:5000").collect()
    assert {s.labels["registry"]: s.value for s in family.samples} == {"_default": 1.0}



def test_hosts_config_gauge_reports_only_mirrored_registries(tmp_path: Path) -> None:
    """With --mirrored-registries docker.io, the owner's ghcr.io/ is not an alert."""
    for name in ("docker.io", "ghcr.io"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "hosts.toml").write_text('server = "https://x"\n')
    [family] = HostsConfigCollector(tmp_path, "http://10.0.0.7:5000",
                                    frozenset({"docker.io"})).collect()
    assert {s.labels["registry"]: s.value for s in family.samples} == {"docker.io": 0.0}


def test_members_table_is_aligned() -> None:
    text = table([
        {"name": "node1", "address": "127.0.0.11:7946", "state": "alive",
         "registry": "http://127.0.0.11:5000", "self": True, "advertised_epoch": 5,
         "summary_current": None},
        {"name": "a-longer-name", "address": "127.0.0.12:7946", "state": "suspect",
         "registry": None, "self": False, "advertised_epoch": 7, "summary_current": False},
    ])
    lines = text.splitlines()
    assert lines[0].split() == ["Node", "Address", "Status", "Registry", "Summary"]
    assert lines[1].index("127.0.0.11") == lines[2].index("127.0.0.12")
    assert lines[2].split() == ["a-longer-name", "127.0.0.12:7946", "suspect", "-", "stale"]


async def test_status_lists_startup_conditions() -> None:
    from meshmirror.status.model import node_status
    from meshmirror.store.memory import MemoryStore

    store = MemoryStore()
    assert (await node_status(store, None))["conditions"] == []
    problem = {"check": "containerd transfer service", "problem": "p", "fix": "f"}
    assert (await node_status(store, None, conditions=[problem]))["conditions"] == [problem]
