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
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshmirror.mirror.options import MirrorOptions, PrivateImages, UnknownVisibility
from meshmirror.mirror.upstream_questions import UpstreamQuestions
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

log = logging.getLogger(__name__)


class Access(enum.Enum):
    SHARE = "share"  # peers may serve it
    DENY = "deny"  # 404 at once: containerd goes upstream with its own credentials


@dataclass(frozen=True, slots=True)
class _Verdict:
    public: bool
    checked_at: float


class VisibilityCache:
    """Last anonymous verdict per (registry, repository), least recently used dropped.

    With a ``path`` the verdicts outlive the process: a container restarted during
    an outage (a failed liveness probe) would otherwise know no repository at all
    and deny every one. The file is rewritten whole, atomically, when a verdict
    changes; a missing or unreadable file means an empty cache, never a failure.
    """

    def __init__(self, options: MirrorOptions, clock: Callable[[], float],
                 path: Path | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._options = options
        self._clock = clock
        self._wall_clock = wall_clock
        self._path = path
        self._entries: OrderedDict[tuple[str, str], _Verdict] = OrderedDict()
        if path is not None:
            self._load(path)

    def remember(self, registry: str, repository: str, public: bool) -> None:
        key = (registry, repository)
        previous = self._entries.get(key)
        self._entries[key] = _Verdict(public, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self._options.visibility_cache_size:
            self._entries.popitem(last=False)
        if previous is None or previous.public != public:
            self._save()

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
        for entry in entries[-self._options.visibility_cache_size:]:
            try:
                registry, repository = str(entry["registry"]), str(entry["repository"])
                public, checked = bool(entry["public"]), float(entry["checked_unix"])
            except (KeyError, TypeError, ValueError):
                continue
            self._entries[(registry, repository)] = _Verdict(public, now - max(0.0, wall - checked))

    def _save(self) -> None:
        if self._path is None:
            return
        now, wall = self._clock(), self._wall_clock()
        verdicts = [{"registry": registry, "repository": repository, "public": v.public,
                     "checked_unix": round(wall - (now - v.checked_at), 3)}
                    for (registry, repository), v in self._entries.items()]
        temporary = self._path.with_name(self._path.name + ".tmp")
        try:
            temporary.write_text(json.dumps({"verdicts": verdicts}))
            os.replace(temporary, self._path)
        except OSError as err:
            log.warning("cannot keep visibility verdicts in %s: %s", self._path, err)

    def last(self, registry: str, repository: str) -> _Verdict | None:
        """The last verdict, however old (for an outage)."""
        return self._entries.get((registry, repository))

    def fresh(self, registry: str, repository: str) -> bool | None:
        """The verdict while its TTL lasts (True: public), else None."""
        verdict = self._entries.get((registry, repository))
        if verdict is None:
            return None
        ttl = self._options.public_ttl if verdict.public else self._options.private_ttl
        if self._clock() - verdict.checked_at >= ttl:
            return None
        self._entries.move_to_end((registry, repository))
        return verdict.public

    def known_private(self, registry: str, repository: str) -> bool:
        """Whether the last verdict was private: peers' requests for it are refused."""
        verdict = self._entries.get((registry, repository))
        return verdict is not None and not verdict.public

    def __len__(self) -> int:
        return len(self._entries)


class RepositoryAccess:
    """Decides, per request, whether peers may serve a repository's content.

    Concurrent requests for one repository of unknown visibility (containerd
    fetches layers in parallel) share one upstream question.
    """

    def __init__(self, upstream: UpstreamQuestions | None, options: MirrorOptions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._upstream = upstream
        self._options = options
        path = options.state_dir / VISIBILITY_FILE if options.state_dir is not None else None
        self.cache = VisibilityCache(options, clock, path)
        self._clock = clock
        self._asking: dict[tuple[str, str], asyncio.Task[Visibility]] = {}
        self._unanswered: OrderedDict[tuple[str, str], float] = OrderedDict()

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
            return Access.SHARE if known else Access.DENY
        if self._just_unanswered(registry, repository):
            return self._unknown(registry, repository)
        visibility = await self._ask(registry, repository, reference)
        if isinstance(visibility, Public):
            return Access.SHARE
        if isinstance(visibility, Private):
            return Access.DENY
        return self._unknown(registry, repository)

    def _unknown(self, registry: str, repository: str) -> Access:
        """The upstream cannot say now: the last verdict of any age, else the policy."""
        last = self.cache.last(registry, repository)
        if last is not None:
            return Access.SHARE if last.public else Access.DENY
        if self._options.private_images_unknown is UnknownVisibility.SHARE:
            return Access.SHARE
        return Access.DENY

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
