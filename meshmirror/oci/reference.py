"""Repository names, tags and image references per the OCI distribution grammar.

One definition shared by the registry (which validates every path it is asked
for), the stores (which turn ``io.containerd.image.name`` annotations into tag
keys) and the CLI. A bare Docker Hub name is normalised the way Docker does it
(``nginx`` -> ``docker.io/library/nginx``) because that is the name containerd
records and therefore the tag key peers advertise.

The patterns are written so that every repetition must consume a separator;
the grammar's ``[-]*`` form is equivalent but backtracks exponentially on
near-miss inputs, and names arrive from untrusted request paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshmirror.oci.digest import Digest, DigestError

DOCKER_HUB = "docker.io"
# Names Docker Hub has gone by; all normalise to DOCKER_HUB.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# Distribution limits the whole name (registry host, "/", repository) to 255
# characters, as most clients do; the repository path alone can be no longer.
NAME_TOTAL_LENGTH_MAX = 255
TAG_LENGTH_MAX = 128

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]{{1,5}})?"
)
# Long enough for any legal domain; checked before the regex so hostile input
# never reaches it at length.
_DOMAIN_LENGTH_MAX = NAME_TOTAL_LENGTH_MAX


class InvalidReferenceError(ValueError):
    """Text that is not a valid name, tag, registry or reference."""


class InvalidNameError(InvalidReferenceError):
    """A repository name outside the grammar (maps to NAME_INVALID)."""


class InvalidTagError(InvalidReferenceError):
    """A tag outside the grammar (maps to TAG_INVALID)."""


class InvalidRegistryError(InvalidReferenceError):
    """A registry host[:port] that is not a domain, IPv4 or bracketed IPv6 address."""


def _shown(text: str) -> str:
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def validate_repository(name: str) -> str:
    """Return ``name`` if it is a legal repository path, else raise InvalidNameError."""
    if not name:
        raise InvalidNameError("invalid repository name: empty")
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidNameError(
            f"invalid repository name {_shown(name)}: "
            f"longer than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    if _REPOSITORY_RE.fullmatch(name) is None:
        if _REPOSITORY_RE.fullmatch(name.lower()) is not None:
            raise InvalidNameError(f"invalid repository name {_shown(name)}: must be lowercase")
        raise InvalidNameError(
            f"invalid repository name {_shown(name)}: want lowercase components "
            "[a-z0-9] separated by '.', '_', '__' or '-', joined by '/'"
        )
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a legal tag, else raise InvalidTagError."""
    if len(tag) > TAG_LENGTH_MAX or _TAG_RE.fullmatch(tag) is None:
        raise InvalidTagError(
            f"invalid tag {_shown(tag)}: want [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}"
        )
    return tag


def validate_registry(host: str) -> str:
    """Return the normalised registry host (Docker Hub aliases become ``docker.io``)."""
    if not host or len(host) > _DOMAIN_LENGTH_MAX or _DOMAIN_RE.fullmatch(host) is None:
        raise InvalidRegistryError(f"invalid registry {_shown(host)}: want HOST[:PORT]")
    return normalise_registry(host)


def normalise_registry(host: str) -> str:
    return DOCKER_HUB if host.lower() in _DOCKER_HUB_ALIASES else host


def is_digest_reference(ref: str) -> bool:
    """Whether a manifest path reference names a digest rather than a tag.

    A tag may not contain ':', a digest always does, so this is exact.
    """
    return ":" in ref


@dataclass(frozen=True, slots=True)
class Reference:
    """``registry/repository[:tag][@digest]`` with the registry always explicit."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    def __post_init__(self) -> None:
        validate_registry(self.registry)
        if normalise_registry(self.registry) != self.registry:
            raise InvalidRegistryError(
                f"registry {self.registry!r} must be given as {DOCKER_HUB!r}"
            )
        validate_repository(self.repository)
        if len(self.name) > NAME_TOTAL_LENGTH_MAX:
            raise InvalidNameError(
                f"invalid name {_shown(self.name)}: longer than {NAME_TOTAL_LENGTH_MAX} characters"
            )
        if self.tag is not None:
            validate_tag(self.tag)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse a reference as ``docker pull`` or ``ctr images pull`` would take it.

        A first path component is a registry when it contains '.' or ':', is
        ``localhost``, or has upper-case letters (a repository cannot); anything
        else is a Docker Hub repository, and a single-component Hub name gets
        ``library/``.
        """
        if not text:
            raise InvalidReferenceError("invalid reference: empty")
        if len(text) > NAME_TOTAL_LENGTH_MAX + 1 + TAG_LENGTH_MAX + 1 + 7 + 128:
            raise InvalidReferenceError(f"invalid reference {_shown(text)}: too long")
        remainder, at, digest_text = text.partition("@")
        digest: Digest | None = None
        if at:
            try:
                digest = Digest.parse(digest_text)
            except DigestError as err:
                raise InvalidReferenceError(f"invalid reference {_shown(text)}: {err}") from err
        tag: str | None = None
        last_slash = remainder.rfind("/")
        colon = remainder.rfind(":")
        if colon > last_slash:
            remainder, tag = remainder[:colon], remainder[colon + 1 :]
            validate_tag(tag)
        registry, repository = _split_registry(remainder)
        return cls(registry=registry, repository=repository, tag=tag, digest=digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def _split_registry(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, repository = validate_registry(first), rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    validate_repository(repository)
    return registry, repository


def tag_key(registry: str, repository: str, tag: str) -> str:
    """The key under which a tag is advertised, e.g. ``docker.io/library/nginx:1.25``."""
    return f"{registry}/{repository}:{tag}"
