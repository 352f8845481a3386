"""The questions the mirror asks an upstream registry, and the count of their answers.

`UpstreamQuestions` is what the mirror needs of `meshmirror.upstream.UpstreamClient`,
so tests can answer with a fake; `CountedUpstream` wraps one, counts every
answer by registry and result in ``meshmirror_upstream_answers_total``, and
names the registry client whose request asks (the upstream paces new questions
per client).
"""

from __future__ import annotations

from typing import Protocol

from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.registry.requester import requester
from meshmirror.upstream import (
    AuthRequired,
    BreakerHealth,
    NotFound,
    Private,
    Public,
    TagDigest,
    TagResult,
    Unknown,
    Unreachable,
    Visibility,
)


class UpstreamQuestions(Protocol):
    async def resolve_tag(self, registry: str, repository: str, tag: str, *,
                          client: str | None = None) -> TagResult: ...

    async def check_public(self, registry: str, repository: str, reference: str, *,
                           client: str | None = None) -> Visibility: ...

    def health(self, registry: str) -> BreakerHealth: ...

    def mirrors(self, registry: str) -> bool:
        """Whether containerd sends the registry's pulls here (its hosts.toml says so)."""
        ...


def _result(answer: TagResult | Visibility) -> str:
    if isinstance(answer, TagDigest) or (isinstance(answer, Public) and answer.found):
        return "answered"
    if isinstance(answer, NotFound | Public):
        return "not_found"
    if isinstance(answer, AuthRequired | Private):
        return "auth_required"
    assert isinstance(answer, Unreachable | Unknown)
    return answer.kind.value


class CountedUpstream:
    """An `UpstreamQuestions` that counts each answer it passes on."""

    def __init__(self, upstream: UpstreamQuestions, metrics: MirrorMetrics) -> None:
        self._upstream = upstream
        self._metrics = metrics

    async def resolve_tag(self, registry: str, repository: str, tag: str, *,
                          client: str | None = None) -> TagResult:
        answer = await self._upstream.resolve_tag(registry, repository, tag,
                                                  client=client or requester())
        self._metrics.upstream_answers.labels(self._metrics.registry_label(registry),
                                              _result(answer)).inc()
        return answer

    async def check_public(self, registry: str, repository: str, reference: str, *,
                           client: str | None = None) -> Visibility:
        answer = await self._upstream.check_public(registry, repository, reference,
                                                   client=client or requester())
        self._metrics.upstream_answers.labels(self._metrics.registry_label(registry),
                                              _result(answer)).inc()
        return answer

    def health(self, registry: str) -> BreakerHealth:
        return self._upstream.health(registry)

    def mirrors(self, registry: str) -> bool:
        return self._upstream.mirrors(registry)
