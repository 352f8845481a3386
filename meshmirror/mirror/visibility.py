"""Whether a repository's content may come from peers: only if anyone may pull it.

Without this, an image one node pulled with a pull secret would reach every
other node's pods without one, because peers serve what they hold. So before
anything of a repository is served from peers, the upstream is asked
anonymously whether it serves that repository without credentials (one
manifest HEAD, see `meshmirror.upstream`); the answer is remembered per
(registry, repository), public for longer than private.

An outage must not turn into either a leak or a new failure: a repository known
public (however long ago) stays shared, one known private stays refused, and
one never seen follows ``--private-images-unknown``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshmirror.mirror.options import (
    MirrorConfig,
    OutagePeerTags,
    PrivateImages,
    UnknownVisibility,
)
from meshmirror.mirror.upstream_questions import UpstreamQuestions
from meshmirror.registry.fallback import MissReason
from meshmirror.routing.vouches import MAX_VOUCHES, VouchBook, Vouches, vouch_key
from meshmirror.upstream import Private, Public, Unknown, Visibility

VISIBILITY_FILE = "visibility.json"

# What a blob request asks about: a manifest digest that names nothing. A registry
# that wants credentials asks for them before it looks a reference up, and a public
# one answers 404; asking with the blob's own digest instead makes some registries
# (Distribution among them) try to read the blob as a manifest and fail with a 5xx,
# which would look like an outage.
BLOB_PROBE_REFERENCE = "sha256:" + "0" * 64
# How long a tag question the upstream could not answer stands in for the visibility
# question that follows it in the same request. Seconds, not minutes: it only has to
# outlive the step from the tag decision to the access check.
UNANSWERED_TTL = 5.0
_MAX_UNANSWERED = 1024
# The verdict file is written at most once per this many seconds (see VisibilityCache).
SAVE_INTERVAL = 1.0
# Probation holds a fifth of the cache for repositories seen once.
PROBATION_DIVISOR = 5
# Vouches whose verdicts were merely refreshed are republished at most this often.
VOUCH_REFRESH = 3600.0
# A repository's outage decision is logged at most once per this many seconds.
_LOG_EVERY = 60.0

log = logging.getLogger(__name__)


class Access(enum.Enum):
    """Whether peers may serve a repository, and if not, why not (its `MissReason`)."""

    SHARE = "share"  # peers may serve it
    # 404 at once, so containerd goes upstream with its own credentials:
    PRIVATE = "private"  # the upstream wants credentials (now, or when it last answered)
    UNKNOWN_OUTAGE = "unknown_outage"  # the upstream cannot say, nobody trusted vouches
    VOUCH_NOT_TRUSTED = "vouch_not_trusted"  # only members vouch, and they are not trusted

    @property
    def denied(self) -> bool:
        return self is not Access.SHARE

    @property
    def reason(self) -> MissReason | None:
        """Why peers are ruled out, for the access log and the miss metric."""
        return _REASONS.get(self)


_REASONS: dict[Access, MissReason] = {
    Access.PRIVATE: MissReason.PRIVATE_REPOSITORY,
    Access.UNKNOWN_OUTAGE: MissReason.UNKNOWN_REPOSITORY_OUTAGE,
    Access.VOUCH_NOT_TRUSTED: MissReason.VOUCH_NOT_TRUSTED,
}


@dataclass(frozen=True, slots=True)
class _Verdict:
    public: bool
    checked_at: float


class VisibilityCache:
    """Last anonymous verdict per (registry, repository), in two segments.

    Admission: a verdict enters *probation*, and moves to the *protected*
    segment when it is used again (a second request for the repository, which
    every pull makes: a manifest, then its layers). A flood of requests naming
    new repositories, each once, only churns probation, so the verdicts in use
    (the protected ones, which also decide which repositories this node vouches
    for) are never flushed by it. Probation may use whatever room protected
    leaves; protected holds at most `size` minus probation's share, and its
    least recently used verdict steps back into probation when a newer one is
    promoted. Least recently used goes first within each. (A client that names
    each new repository twice does get it admitted: admission keeps out the
    one-off, and the upstream rate limits bound the rest.)

    With a ``path`` the verdicts outlive the process: a container restarted during
    an outage (a failed liveness probe) would otherwise know no repository at all
    and deny every one. The file is rewritten whole and atomically, but batched:
    at most once per ``save_interval`` whatever the number of new verdicts, with
    the encoding and the write on a worker thread, so the event loop only copies
    the entries (once per batch). Outside an event loop (tools, tests) it is
    written at once. A missing or unreadable file means an empty cache, never a
    failure.
    """

    def __init__(self, options: MirrorConfig, clock: Callable[[], float],
                 path: Path | None = None,
                 wall_clock: Callable[[], float] = time.time, *,
                 save_interval: float = SAVE_INTERVAL,
                 on_vouches_changed: Callable[[], None] | None = None) -> None:
        self._options = options
        self._clock = clock
        self._wall_clock = wall_clock
        self._path = path
        self._size = max(1, options.visibility_cache_size)
        self._probation_share = max(1, self._size // PROBATION_DIVISOR)
        self._probation: OrderedDict[tuple[str, str], _Verdict] = OrderedDict()
        self._protected: OrderedDict[tuple[str, str], _Verdict] = OrderedDict()
        self._save_interval = save_interval
        self.on_vouches_changed = on_vouches_changed
        self._dirty = False
        self._vouches_dirty = False
        self._vouches_announced = -float("inf")
        self._batch: asyncio.Task[None] | None = None
        self.writes = 0  # times the file was written, for tests and the bound above
        # A write on the worker thread may still run when shutdown writes the last batch.
        self._write_lock = threading.Lock()
        if path is not None:
            self._load(path)

    def remember(self, registry: str, repository: str, public: bool) -> None:
        key = (registry, repository)
        verdict = _Verdict(public, self._clock())
        previous = self._protected.get(key)
        was_protected = previous is not None
        if previous is not None:
            self._protected[key] = verdict
            self._protected.move_to_end(key)
        else:
            previous = self._probation.pop(key, None)
            if previous is not None:
                self._promote(key, verdict)  # asked again: in use
            else:
                self._probation[key] = verdict
                self._evict()
        if previous is None or previous.public != public:
            self._dirty = True
        if public or (previous is not None and previous.public):
            self._note_vouch(key, refreshed=(was_protected and previous is not None
                                             and previous.public == public))
        self._schedule()

    def _promote(self, key: tuple[str, str], verdict: _Verdict) -> None:
        self._dirty = True  # the file keeps the segment, for the next process
        self._protected[key] = verdict
        self._protected.move_to_end(key)
        while len(self._protected) > self._size - self._probation_share:
            old_key, old = self._protected.popitem(last=False)
            self._probation[old_key] = old
            if old.public:
                self._vouches_dirty = True
        self._evict()

    def _evict(self) -> None:
        while len(self._probation) + len(self._protected) > self._size and self._probation:
            self._probation.popitem(last=False)

    def _note_vouch(self, key: tuple[str, str], *, refreshed: bool) -> None:
        """A vouch changed when a protected public verdict came, went or flipped; a mere
        refresh is announced only now and then, so peers see its age move on."""
        if key not in self._protected:
            return
        if not refreshed or self._clock() - self._vouches_announced >= VOUCH_REFRESH:
            self._vouches_dirty = True

    def _use(self, key: tuple[str, str]) -> _Verdict | None:
        verdict = self._protected.get(key)
        if verdict is not None:
            self._protected.move_to_end(key)
            return verdict
        verdict = self._probation.pop(key, None)
        if verdict is not None:
            self._promote(key, verdict)
            if verdict.public:
                self._vouches_dirty = True
                self._schedule()
        return verdict

    def _get(self, key: tuple[str, str]) -> _Verdict | None:
        return self._protected.get(key) or self._probation.get(key)

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_bytes())
            entries = raw["verdicts"]
            assert isinstance(entries, list)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
            if not isinstance(err, FileNotFoundError):
                log.warning("ignoring unreadable visibility file %s: %s", path, err)
            return
        now, wall = self._clock(), self._wall_clock()
        for entry in entries[-self._size:]:
            try:
                registry, repository = str(entry["registry"]), str(entry["repository"])
                public, checked = bool(entry["public"]), float(entry["checked_unix"])
                protected = bool(entry.get("protected", True))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            verdict = _Verdict(public, now - max(0.0, wall - checked))
            if protected:
                self._promote((registry, repository), verdict)
            else:
                self._probation[(registry, repository)] = verdict
                self._evict()
        self._vouches_dirty = True

    def _pending(self) -> bool:
        return ((self._dirty and self._path is not None)
                or (self._vouches_dirty and self.on_vouches_changed is not None))

    def _schedule(self) -> None:
        """Write the file and announce vouches soon: one batch per ``save_interval``."""
        if not self._pending():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._batch is None or self._batch.done():
            self._batch = loop.create_task(self._batches(), name="visibility-batch")

    async def _batches(self) -> None:
        """Every ``save_interval`` while there is something new: what changed meanwhile
        goes into the next batch, never into a write of its own."""
        while self._pending():
            await asyncio.sleep(self._save_interval)
            if self._dirty:
                self._dirty = False
                rows = self._rows()
                await asyncio.to_thread(self._write, rows)
            self._announce()

    def flush(self) -> None:
        """Write what is pending now (outside a loop, and at shutdown)."""
        if self._batch is not None and not self._batch.done():
            self._batch.cancel()
        self._batch = None
        if self._dirty:
            self._dirty = False
            self._write(self._rows())
        self._announce()

    def _announce(self) -> None:
        if self._vouches_dirty and self.on_vouches_changed is not None:
            self._vouches_dirty = False
            self._vouches_announced = self._clock()
            try:
                self.on_vouches_changed()
            except Exception:
                log.exception("announcing changed vouches failed")

    def _rows(self) -> list[tuple[tuple[str, str], _Verdict, bool, float]]:
        """The entries as they are now: a shallow copy, once per batch; the encoding and
        the write run off the loop."""
        offset = self._wall_clock() - self._clock()
        return ([(key, v, False, offset) for key, v in self._probation.items()]
                + [(key, v, True, offset) for key, v in self._protected.items()])

    def _write(self, rows: list[tuple[tuple[str, str], _Verdict, bool, float]]) -> None:
        if self._path is None:
            return
        verdicts = [{"registry": registry, "repository": repository, "public": v.public,
                     "checked_unix": round(offset + v.checked_at, 3), "protected": protected}
                    for (registry, repository), v, protected, offset in rows]
        temporary = self._path.with_name(self._path.name + ".tmp")
        try:
            with self._write_lock:
                temporary.write_text(json.dumps({"verdicts": verdicts}))
                os.replace(temporary, self._path)
                self.writes += 1
        except OSError as err:
            log.warning("cannot keep visibility verdicts in %s: %s", self._path, err)

    def last(self, registry: str, repository: str) -> _Verdict | None:
        """The last verdict, however old (for an outage); using it counts as a use."""
        return self._use((registry, repository))

    def fresh(self, registry: str, repository: str) -> bool | None:
        """The verdict while its TTL lasts (True: public), else None."""
        key = (registry, repository)
        verdict = self._get(key)
        if verdict is None:
            return None
        ttl = self._options.public_ttl if verdict.public else self._options.private_ttl
        if self._clock() - verdict.checked_at >= ttl:
            return None
        self._use(key)
        return verdict.public

    def known_private(self, registry: str, repository: str) -> bool:
        """Whether the last verdict was private: peers' requests for it are refused."""
        verdict = self._get((registry, repository))
        return verdict is not None and not verdict.public

    def vouches(self) -> Vouches:
        """What this node vouches for: public verdicts in use (protected), each learned
        from the upstream itself, most recently used first, with their wall-clock age."""
        offset = self._wall_clock() - self._clock()
        chosen: list[tuple[int, float]] = []
        for (registry, repository), verdict in reversed(self._protected.items()):
            if verdict.public:
                chosen.append((vouch_key(registry, repository), offset + verdict.checked_at))
                if len(chosen) == MAX_VOUCHES:
                    break
        return Vouches.of(chosen)

    def __contains__(self, key: object) -> bool:
        return key in self._protected or key in self._probation

    def protected(self, registry: str, repository: str) -> bool:
        """Whether the verdict is in the protected segment (in use)."""
        return (registry, repository) in self._protected

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)


class RepositoryAccess:
    """Decides, per request, whether peers may serve a repository's content.

    Concurrent requests for one repository of unknown visibility (containerd
    fetches layers in parallel) share one upstream question.

    When the upstream cannot answer, the node's own last verdict decides, of any
    age (a private one always wins). With none, members' vouches (``vouches``,
    see `meshmirror.routing.vouches`) may say public: trusted when ``trust_vouches``
    (by default only in an encrypted mesh, the trust peers' tags get). Without a
    trusted vouch ``--private-images-unknown`` decides. ``on_outage(decision)``
    counts each such decision: own_verdict, vouch, vouch_not_trusted or policy.
    """

    def __init__(self, upstream: UpstreamQuestions | None, options: MirrorConfig,
                 clock: Callable[[], float] = time.monotonic, *,
                 vouches: VouchBook | None = None, trust_vouches: bool = False,
                 on_outage: Callable[[str], None] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._upstream = upstream
        self._options = options
        path = options.state_dir / VISIBILITY_FILE if options.state_dir is not None else None
        self.cache = VisibilityCache(options, clock, path, wall_clock)
        self._clock = clock
        self._wall_clock = wall_clock
        self.vouches = vouches
        self.trust_vouches = trust_vouches
        self._on_outage = on_outage
        self._logged: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._asking: dict[tuple[str, str], asyncio.Task[Visibility]] = {}
        self._unanswered: OrderedDict[tuple[str, str], float] = OrderedDict()

    @staticmethod
    def trusts_vouches(rule: OutagePeerTags, mesh_encrypted: bool) -> bool:
        """``--outage-vouches``: trusted always, never, or only in an encrypted mesh."""
        return rule is OutagePeerTags.ALWAYS or (
            rule is OutagePeerTags.ENCRYPTED and mesh_encrypted)

    def close(self) -> None:
        """Write pending verdicts now (the process is stopping)."""
        self.cache.flush()
    def refuses_peers(self, registry: str, repository: str) -> bool:
        """Whether this node keeps the repository from peers: known private, unless shared."""
        return (self._options.private_images is PrivateImages.UPSTREAM_ONLY
                and self.cache.known_private(registry, repository))

    def learned(self, registry: str, repository: str, public: bool) -> None:
        """A verdict learned elsewhere (a tag resolved anonymously means public)."""
        self.cache.remember(registry, repository, public)

    def unanswered(self, registry: str, repository: str) -> None:
        """The upstream was just asked about the repository (a tag) and could not answer.

        A tag lookup in an outage goes on to ask whether peers may serve the
        repository; asking the same unreachable upstream again would double what
        the outage costs that lookup (two timeouts instead of one) before the
        breaker opens. So the next check of this repository decides from what is
        known, as if it had asked and heard nothing.
        """
        key = (registry, repository)
        self._unanswered[key] = self._clock()
        self._unanswered.move_to_end(key)
        while len(self._unanswered) > _MAX_UNANSWERED:
            self._unanswered.popitem(last=False)

    def _just_unanswered(self, registry: str, repository: str) -> bool:
        noted = self._unanswered.pop((registry, repository), None)
        return noted is not None and self._clock() - noted < UNANSWERED_TTL

    async def check(self, registry: str, repository: str, reference: str) -> Access:
        """``reference``: a tag or digest in the repository; any digest will do, since
        a registry that wants credentials asks for them before looking the reference up."""
        if self._options.private_images is PrivateImages.SHARE or self._upstream is None:
            return Access.SHARE
        known = self.cache.fresh(registry, repository)
        if known is not None:
            return Access.SHARE if known else Access.PRIVATE
        if self._just_unanswered(registry, repository):
            return self._unknown(registry, repository)
        visibility = await self._ask(registry, repository, reference)
        if isinstance(visibility, Public):
            return Access.SHARE
        if isinstance(visibility, Private):
            return Access.PRIVATE
        return self._unknown(registry, repository)

    def _unknown(self, registry: str, repository: str) -> Access:
        """The upstream cannot say now: the last verdict of any age, else a trusted
        member's vouch, else the policy."""
        last = self.cache.last(registry, repository)
        if last is not None:
            self._count("own_verdict")
            return Access.SHARE if last.public else Access.PRIVATE
        vouched = (self.vouches.newest(registry, repository, self._wall_clock())
                   if self.vouches is not None else None)
        if vouched is not None and self.trust_vouches:
            self._count("vouch")
            self._say(registry, repository, "shared: a member vouches it public", vouched,
                      logging.INFO)
            return Access.SHARE
        if self._options.private_images_unknown is UnknownVisibility.SHARE:
            self._count("policy")
            return Access.SHARE
        if vouched is not None:
            self._count("vouch_not_trusted")
            self._say(registry, repository,
                      "refused: members vouch it public, but this node does not trust "
                      f"vouches ({MissReason.VOUCH_NOT_TRUSTED.value}; --outage-vouches "
                      "trusts them only in a mesh with a gossip key by default)", vouched,
                      logging.WARNING)
            return Access.VOUCH_NOT_TRUSTED
        self._count("policy")
        return Access.UNKNOWN_OUTAGE

    def _count(self, decision: str) -> None:
        if self._on_outage is not None:
            self._on_outage(decision)

    def _say(self, registry: str, repository: str, what: str, vouched: float,
             level: int) -> None:
        """Log an outage decision, once a minute per repository at most."""
        key = (registry, repository)
        now = self._clock()
        said = self._logged.get(key)
        if said is not None and now - said < _LOG_EVERY:
            return
        self._logged[key] = now
        self._logged.move_to_end(key)
        while len(self._logged) > _MAX_UNANSWERED:
            self._logged.popitem(last=False)
        log.log(level, "upstream unreachable; repository %s/%s %s", registry, repository, what,
                extra={"fields": {"registry": registry, "repository": repository,
                                  "vouch_age_s": round(max(0.0, self._wall_clock() - vouched)),
                                  "reason": (None if level == logging.INFO
                                             else MissReason.VOUCH_NOT_TRUSTED.value)}})

    async def _ask(self, registry: str, repository: str, reference: str) -> Visibility:
        """One question per repository at a time, in a task of its own: a request
        that goes away does not cancel the answer others wait for (it is bounded by
        the upstream client's timeout)."""
        key = (registry, repository)
        task = self._asking.get(key)
        if task is None:
            task = asyncio.create_task(self._question(registry, repository, reference),
                                       name=f"visibility {registry}/{repository}")
            self._asking[key] = task
            task.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(task)

    async def _question(self, registry: str, repository: str, reference: str) -> Visibility:
        assert self._upstream is not None
        visibility = await self._upstream.check_public(registry, repository, reference)
        if not isinstance(visibility, Unknown):
            self.cache.remember(registry, repository, isinstance(visibility, Public))
        return visibility
