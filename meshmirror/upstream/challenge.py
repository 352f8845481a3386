"""``WWW-Authenticate`` challenges (RFC 7235), parsed without trusting the sender.

A registry's ``Bearer realm="...",service="...",scope="repository:a/b:pull"``
carries commas and colons inside quoted values, and a header may hold several
challenges (``Basic realm="x", Bearer realm="y"``), so splitting on commas is
wrong. This is a small tokenizer for the RFC grammar instead; anything outside
it raises :class:`ChallengeError`, which the client turns into a clear
answer rather than a crash.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

# A header longer than this is not a challenge any registry sends; refuse it
# before doing any work on it.
MAX_HEADER_LENGTH = 8192

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_SPACE = re.compile(r"[ \t]*")


class ChallengeError(ValueError):
    """A ``WWW-Authenticate`` value outside the RFC 7235 grammar, or a Bearer one unusable."""


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge: its scheme (lower case) and its parameters (names lower case)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    token68: str | None = None


@dataclass(frozen=True, slots=True)
class BearerChallenge:
    """The parameters of the token flow, checked: an absolute http(s) realm."""

    realm: str
    service: str | None
    scope: str | None

    @classmethod
    def of(cls, challenge: Challenge) -> BearerChallenge:
        if challenge.scheme != "bearer":
            raise ChallengeError(f"not a Bearer challenge: {challenge.scheme!r}")
        realm = challenge.params.get("realm")
        if not realm:
            raise ChallengeError("Bearer challenge without a realm")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ChallengeError(f"Bearer realm is not an http(s) URL: {realm[:200]!r}")
        if parts.username is not None or parts.password is not None:
            # aiohttp would send these as Basic credentials: this client sends none.
            raise ChallengeError("Bearer realm carries credentials")
        return cls(realm, challenge.params.get("service"), challenge.params.get("scope"))


class _Cursor:
    """Position in the header text, with the few moves the grammar needs."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        match = _SPACE.match(self.text, self.pos)
        assert match is not None  # the pattern matches the empty string
        self.pos = match.end()

    def skip_separators(self) -> None:
        """Empty list elements and whitespace, which the list grammar allows anywhere."""
        while self.peek() in (",", " ", "\t") and not self.at_end():
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, pattern: re.Pattern[str]) -> str | None:
        match = pattern.match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        return match.group()

    def fail(self, what: str) -> ChallengeError:
        return ChallengeError(f"{what} at offset {self.pos} of {self.text[:200]!r}")

    def quoted_string(self) -> str:
        """A quoted-string after its opening quote, backslash escapes undone."""
        out: list[str] = []
        self.pos += 1
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\":
                self.pos += 1
                if self.pos >= len(self.text):
                    break
                char = self.text[self.pos]
            if char in "\r\n\0":
                raise self.fail("control character in quoted string")
            out.append(char)
            self.pos += 1
        raise self.fail("unterminated quoted string")


def _is_param_start(cur: _Cursor) -> bool:
    """Whether ``name = value`` comes next, rather than a new scheme or a token68.

    A token68 may end in ``=`` (``abc==``), so a parameter needs a value after its
    ``=``: a quote or a token character.
    """
    match = _TOKEN.match(cur.text, cur.pos)
    if match is None:
        return False
    after_name = _SPACE.match(cur.text, match.end())
    assert after_name is not None
    if cur.text[after_name.end():after_name.end() + 1] != "=":
        return False
    after_equals = _SPACE.match(cur.text, after_name.end() + 1)
    assert after_equals is not None
    following = cur.text[after_equals.end():after_equals.end() + 1]
    return following == '"' or _TOKEN.match(following) is not None


def _params(cur: _Cursor) -> dict[str, str]:
    """``name=value`` pairs separated by commas, up to the next challenge or the end."""
    params: dict[str, str] = {}
    while True:
        name = cur.take(_TOKEN)
        if name is None:
            raise cur.fail("expected a parameter name")
        cur.skip_space()
        if cur.peek() != "=":
            raise cur.fail(f"expected '=' after {name!r}")
        cur.pos += 1
        cur.skip_space()
        if cur.peek() == '"':
            value = cur.quoted_string()
        else:
            token = cur.take(_TOKEN)
            if token is None:
                raise cur.fail(f"expected a value for {name!r}")
            value = token
        key = name.lower()
        if key in params:
            raise cur.fail(f"parameter {key!r} given twice")
        params[key] = value
        cur.skip_space()
        if cur.at_end():
            return params
        if cur.peek() != ",":
            raise cur.fail("expected ',' between parameters")
        # Skip empty list elements, then see whether a parameter or a new challenge follows.
        cur.skip_separators()
        if cur.at_end() or not _is_param_start(cur):
            return params


def parse_challenges(header: str) -> tuple[Challenge, ...]:
    """Every challenge in one ``WWW-Authenticate`` value, in order.

    Raises :class:`ChallengeError` for anything the grammar does not allow,
    including an empty header and one longer than :data:`MAX_HEADER_LENGTH`.
    """
    if len(header) > MAX_HEADER_LENGTH:
        raise ChallengeError(f"WWW-Authenticate longer than {MAX_HEADER_LENGTH} characters")
    cur = _Cursor(header)
    challenges: list[Challenge] = []
    while True:
        cur.skip_separators()
        if cur.at_end():
            break
        scheme = cur.take(_TOKEN)
        if scheme is None:
            raise cur.fail("expected an auth scheme")
        if not cur.at_end() and cur.peek() not in (" ", "\t", ","):
            raise cur.fail("expected a space after the auth scheme")
        cur.skip_space()
        if cur.at_end() or cur.peek() == ",":
            challenges.append(Challenge(scheme.lower()))
        elif _is_param_start(cur):
            challenges.append(Challenge(scheme.lower(), MappingProxyType(_params(cur))))
        else:
            token68 = cur.take(_TOKEN68)
            if token68 is None:
                raise cur.fail("expected parameters or a token68")
            cur.skip_space()
            if not cur.at_end() and cur.peek() != ",":
                raise cur.fail("expected ',' after token68")
            challenges.append(Challenge(scheme.lower(), token68=token68))
    if not challenges:
        raise ChallengeError("empty WWW-Authenticate header")
    return tuple(challenges)


def parse_all(headers: list[str]) -> tuple[Challenge, ...]:
    """The challenges of every ``WWW-Authenticate`` header of one response."""
    return tuple(c for header in headers for c in parse_challenges(header))
