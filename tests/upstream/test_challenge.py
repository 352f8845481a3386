"""WWW-Authenticate parsing: registries' real challenges, quoting, and hostile input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.upstream.challenge import (
    MAX_HEADER_LENGTH,
    BearerChallenge,
    ChallengeError,
    parse_all,
    parse_challenges,
)


def test_docker_hub_challenge() -> None:
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/nginx:pull"')
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == "bearer"
    assert BearerChallenge.of(challenge) == BearerChallenge(
        "https://auth.docker.io/token", "registry.docker.io", "repository:library/nginx:pull")


def test_commas_quotes_and_escapes_inside_values() -> None:
    header = (r'Bearer realm="https://a.example/t?x=1,2", scope="repository:a/b:pull,push",'
              r' error="say \"no\", twice"')
    (challenge,) = parse_challenges(header)
    assert challenge.params == {"realm": "https://a.example/t?x=1,2",
                                "scope": "repository:a/b:pull,push",
                                "error": 'say "no", twice'}


def test_several_challenges_in_one_header_and_in_several() -> None:
    challenges = parse_challenges('Basic realm="r", Bearer realm="https://t/x",service=s')
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[1].params == {"realm": "https://t/x", "service": "s"}
    both = parse_all(['Basic realm="r"', "Bearer realm=\"https://t/x\""])
    assert [c.scheme for c in both] == ["basic", "bearer"]


def test_token_values_case_and_whitespace() -> None:
    (challenge,) = parse_challenges('  BEARER  Realm = "https://t/x" ,, Service=svc  ')
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://t/x", "service": "svc"}


def test_bare_scheme_and_token68() -> None:
    assert [(c.scheme, c.token68) for c in parse_challenges("Negotiate abc==, Basic")] == [
        ("negotiate", "abc=="), ("basic", None)]


@pytest.mark.parametrize("header", [
    "",
    "   ",
    'Bearer realm="unterminated',
    'Bearer realm="a" service="b"',  # no comma between parameters
    'Bearer realm="a", realm="b"',  # duplicate
    '"quoted" realm=x',
    "Bearer realm=\"a\r\nb\"",
    "Bearer a=b=c",
    "x" * (MAX_HEADER_LENGTH + 1),
])
def test_malformed_headers_raise_challenge_error(header: str) -> None:
    with pytest.raises(ChallengeError):
        parse_challenges(header)


@pytest.mark.parametrize("header", [
    'Bearer service="s"',  # no realm
    "Bearer realm=",  # a token68, by the grammar: still no realm
    'Bearer realm="/relative/token"',
    'Bearer realm="ftp://t/x"',
    'Bearer realm="https://user:pw@t/x"',  # would be sent as credentials
])
def test_unusable_bearer_challenges(header: str) -> None:
    (challenge,) = parse_challenges(header)
    with pytest.raises(ChallengeError):
        BearerChallenge.of(challenge)


def test_basic_is_not_bearer() -> None:
    (challenge,) = parse_challenges('Basic realm="r"')
    with pytest.raises(ChallengeError):
        BearerChallenge.of(challenge)


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_challenge_error(header: str) -> None:
    with contextlib.suppress(ChallengeError):
        parse_challenges(header)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@given(_token, st.dictionaries(_token, _value, min_size=1, max_size=5))
def test_quoted_values_round_trip(scheme: str, params: dict[str, str]) -> None:
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = f"{scheme} " + ", ".join(f"{k}={quote(v)}" for k, v in params.items())
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == scheme.lower()
    assert dict(challenge.params) == {k.lower(): v for k, v in params.items()}
