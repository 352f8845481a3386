"""The mirror's knobs, each default written once.

Fields set by ``meshmirror run`` flags are named for the flag without its
``--mirror-`` prefix (``first_byte_timeout`` is ``--mirror-first-byte-timeout``),
except two flags that keep Spegel's names for what they are not:
``--mirror-resolve-timeout`` sets ``connect_timeout`` and
``--mirror-resolve-retries`` sets ``peers_tried``. The command line reads its
defaults from here.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from meshmirror.flags import parse_bool


class TagResolution(enum.Enum):
    """Who says what a tag means (``--resolve-tags``)."""

    # The upstream, asked anonymously each time; peers only while it cannot answer.
    UPSTREAM_FIRST = "upstream-first"
    # Peers holding the tag (Spegel's behaviour): a reused tag may resolve stale.
    PEERS = "peers"
    # Nobody: tags are answered 404 and containerd asks the upstream.
    OFF = "off"

    @classmethod
    def parse(cls, text: str) -> TagResolution:
        """A mode name; ``true``/``false`` are the older boolean spelling of peers/off."""
        value = text.strip().lower()
        if value in {mode.value for mode in cls}:
            return cls(value)
        try:
            return cls.PEERS if parse_bool(value) else cls.OFF
        except ValueError:
            raise ValueError("want upstream-first, peers or off (true or false mean peers "
                             "or off)") from None


class PrivateImages(enum.Enum):
    """Whether content the upstream serves only with credentials may come from peers."""

    UPSTREAM_ONLY = "upstream-only"
    SHARE = "share"


class UnknownVisibility(enum.Enum):
    """What to do with a repository of unknown visibility while the upstream is unreachable."""

    DENY = "deny"
    SHARE = "share"


class OutagePeerTags(enum.Enum):
    """When peers' word is accepted during an upstream outage: the tags they resolve
    (``--outage-peer-tags``), and the repositories they vouch public for
    (``--outage-vouches``)."""

    # Only inside an encrypted mesh: a member must hold the gossip key to answer.
    ENCRYPTED = "encrypted"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """Knobs of mirror mode; defaults follow Spegel where it has one."""

    # TCP connect to one peer (Spegel bounds the whole request at 20 ms in Go).
    connect_timeout: float = 0.1
    # Response headers from a peer that accepted the connection. Measured: a Python
    # peer on a loaded 2-core node needs 22-43 ms to start four concurrent
    # responses, so 20-50 ms sent a third of the bytes upstream (benchmarks/RESULTS.md).
    first_byte_timeout: float = 0.5
    # Peers tried for one request (Spegel: 3).
    peers_tried: int = 3
    # Blobs up to this size that the cache cannot hold are verified whole in memory
    # (counted against `memory_limit`) before the first byte is sent.
    verify_before_send_limit: int = 8 * 1024 * 1024
    # Larger ones are verified whole in a cache file (see `upstream_cache_dir`; this
    # directory is its default, None the system's temporary directory) ...
    spool_dir: Path | None = None
    # ... while the files pinned by requests in progress (being fetched, verified or
    # sent) total at most this many bytes; a blob that does not fit is streamed (0:
    # always stream).
    spool_limit: int = 4 * 1024 * 1024 * 1024
    # Where every blob a node fetches is held: a file per blob that readers follow
    # while it downloads, kept once verified for later readers (see `cache`). None:
    # ``spool_dir``, or the system's temporary directory.
    upstream_cache_dir: Path | None = None
    # Bytes of those files at once, complete or not (least recently used verified
    # ones are evicted; ones in use never are); a blob that does not fit is streamed.
    # None: ``spool_limit``, so the disk a node uses is what it was before the cache.
    upstream_cache_limit: int | None = None
    # What a body thread reads (and hashes, and spools) at once. Bursts set it: with
    # the memory budget below, 200 concurrent 64 MiB pulls stayed within +64 MiB of
    # RSS at 1 MiB chunks (tests/reliability/test_burst.py).
    chunk_size: int = 1024 * 1024
    # Pieces a body is handed to the server in. The server copies each piece two or
    # three times on its way to the socket (ASGI message, HTTP framing, transport
    # buffer) and holds them until a slow client has read it, so per response the
    # memory is a few pieces: small pieces keep a burst of responses small.
    send_size: int = 128 * 1024
    # A peer body that brings no byte for this long is abandoned; it is also the
    # window over which `min_rate` is measured, so a dripping peer goes within two.
    stall_timeout: float = 1.0
    # Bytes per second a peer body must average over each `stall_timeout` of waiting
    # on it (time spent waiting for our own client or memory does not count).
    min_rate: int = 1024 * 1024
    # Once a peer has answered, the rest of the request (failing over, verifying a
    # held body) may take this long plus its size at `min_rate`; past it the answer
    # is a 404. A wait in a peer's queue is bounded apart: the queue must move, and
    # a request that sees no request to that peer finish for this long gives up.
    deadline: float = 10.0
    # Requests at once to one peer; more wait in a first-come queue, so the connect
    # and first-byte bounds measure the peer, not our own burst.
    peer_connections: int = 8
    # Bytes of peer chunks held in memory at once across all requests (being read,
    # hashed or sent on); a reader waits for room rather than allocating.
    memory_limit: int = 16 * 1024 * 1024
    # Streamed bodies are read and hashed on two threads each (see `body.BodyPump`); at
    # most this many threads, later streams read on the event loop instead of waiting.
    body_threads: int = 64
    # Chunks a body thread may read ahead of the client: memory per stream stays
    # at a few chunks however fast the peer and however slow the client.
    read_ahead: int = 2
    resolve_tags: TagResolution = TagResolution.UPSTREAM_FIRST
    # A cold public blob (no peer holds it) is fetched from the upstream once, by its
    # owner, and read through a tree in which a node serves at most this many peers'
    # readers at once (see `rollout`); 0: no designated fetch, a cold blob is a 404.
    rollout_fanout: int = 8
    # With OutagePeerTags.ENCRYPTED, peer-resolved tags need a gossip key (see docs: Trust).
    outage_peer_tags: OutagePeerTags = OutagePeerTags.ENCRYPTED
    # Members' vouches that a repository is public, for a node with no verdict of its
    # own while the upstream cannot answer; same rule (see docs: Trust).
    outage_vouches: OutagePeerTags = OutagePeerTags.ENCRYPTED
    private_images: PrivateImages = PrivateImages.UPSTREAM_ONLY
    private_images_unknown: UnknownVisibility = UnknownVisibility.DENY
    # How long an anonymous visibility answer is trusted. A public repository made
    # private stays shared this long, so keep it minutes; a private verdict is
    # asked again sooner, since asking costs one HEAD and denying costs bandwidth.
    public_ttl: float = 600.0
    private_ttl: float = 60.0
    # Repositories whose visibility is remembered, least recently used dropped first.
    visibility_cache_size: int = 4096
    # Where verdicts are kept across restarts of the process (None: memory only). A
    # container restarted during an upstream outage still knows which repositories
    # it may share; the chart points it at an emptyDir, which outlives the container.
    state_dir: Path | None = None
    # Regexes on ``registry/repo:tag``; a match answers 404 at once.
    registry_filters: tuple[re.Pattern[str], ...] = ()
    # Hosts to mirror; empty means every registry.
    mirrored_registries: frozenset[str] = field(default_factory=frozenset)

    @property
    def hedge_delay(self) -> float:
        """When the hedged request to the next candidate starts: half the connect bound,
        so a dead first peer costs no more than a live second one needs to connect."""
        return self.connect_timeout / 2

    @property
    def cache_limit(self) -> int:
        """Bytes of blob cache files at once (see `upstream_cache_limit`)."""
        return self.spool_limit if self.upstream_cache_limit is None else self.upstream_cache_limit

    def deadline_for(self, size: int) -> float:
        """Seconds one request for ``size`` bytes may take in all (see `deadline`)."""
        return self.deadline + size / max(1, self.min_rate)

    def mirrors(self, registry: str) -> bool:
        return not self.mirrored_registries or registry in self.mirrored_registries

    def filtered(self, key: str) -> bool:
        return any(pattern.search(key) for pattern in self.registry_filters)

