"""The quick HMAC token check accepts only what PyJWT accepts, with the same claims; it never refuses on its own."""

from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.hmac_tokens import HmacTokenCheck, plain_header

# Long enough for HS512 (PyJWT warns below 64 bytes).
SECRET = "k" * 64
LEEWAY_S = 30
NOW = int(time.time())
VALID = {"sub": "user-1", "customerIds": ["C1"], "iat": NOW, "exp": NOW + 3600}


def _short_id(value: object) -> str:
    return repr(value)[:60]


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _sign(header: Any, payload: Any, key: str = SECRET, digest: str = "sha256") -> str:
    """A compact token of any header and payload (JSON-encoded unless already bytes), properly signed."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = _b64(head) + b"." + _b64(body)
    return (signing_input + b"." + _b64(hmac.digest(key.encode(), signing_input, digest))).decode()


def _pyjwt(token: str, key: str, algorithms: tuple[str, ...], audience: str | None, issuer: str | None) -> Any:
    """What TokenVerifier asks PyJWT for: the claims, or the exception it raised."""
    try:
        return jwt.decode(
            token,
            key,
            algorithms=list(algorithms),
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "sub"], "strict_aud": audience is not None},
        )
    except Exception as error:  # any refusal counts
        return error


def _agrees(
    token: str,
    *,
    key: str = SECRET,
    algorithms: tuple[str, ...] = ("HS256",),
    audience: str | None = None,
    issuer: str | None = None,
) -> dict[str, Any] | None:
    """The quick check's answer, after asserting that PyJWT accepts with the same claims whenever it does."""
    quick = HmacTokenCheck(algorithms, audience=audience, issuer=issuer, leeway_s=LEEWAY_S).claims(token, key)
    if quick is not None:
        assert _pyjwt(token, key, algorithms, audience, issuer) == quick
    return quick


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("header_extra", [{}, {"typ": "JWT"}, {"kid": "k1"}, {"typ": "JWT", "kid": "k1"}])
def test_plain_valid_tokens_take_the_quick_path(alg, header_extra):
    token = jwt.encode(VALID, SECRET, alg, headers=header_extra or None)
    assert _agrees(token, algorithms=("HS256", "HS384", "HS512")) == VALID


def test_audience_and_issuer_in_their_configured_form_take_the_quick_path():
    claims = {**VALID, "aud": "eva", "iss": "https://issuer.example", "nbf": NOW - 5, "jti": "j-1"}
    assert _agrees(jwt.encode(claims, SECRET, "HS256"), audience="eva", issuer="https://issuer.example") == claims


_HEADERS: list[Any] = [
    {"alg": "none"},
    {"alg": "HS256 "},
    {"alg": "hs256"},
    {"alg": "RS256"},
    {"alg": None},
    {"alg": ["HS256"]},
    {"typ": "JWT"},
    {"alg": "HS256", "kid": 5},
    {"alg": "HS256", "kid": None},
    {"alg": "HS256", "crit": ["b64"], "b64": False},
    {"alg": "HS256", "crit": ["exp"]},
    {"alg": "HS256", "b64": True},
    {"alg": "HS256", "jku": "https://attacker.example/keys"},
    ["HS256"],
    "HS256",
    b'{"alg":"none","alg":"HS256"}',
    b'{"alg":"HS256","alg":"none"}',
    b'{"alg":"HS256",}',
    b"\xef\xbb\xbf" + b'{"alg":"HS256"}',
    b'{"alg":"HS\\u0032\\u00356"}',
    # orjson reads 1024 levels, the standard library stops near its recursion limit.
    b'{"alg":"HS256","typ":' + b"[" * 1000 + b"]" * 1000 + b"}",
]


@pytest.mark.parametrize("header", _HEADERS, ids=_short_id)
def test_unusual_headers_are_never_accepted_alone(header):
    _agrees(_sign(header, VALID))


def _header_agrees(token: str) -> dict[str, Any] | None:
    """plain_header's answer, after asserting that PyJWT reads the same header whenever it answers."""
    quick = plain_header(token)
    if quick is not None:
        assert jwt.get_unverified_header(token) == quick
    return quick


@pytest.mark.parametrize("header", [*_HEADERS, {"alg": "RS256", "kid": "k1"}], ids=_short_id)
def test_headers_are_read_as_pyjwt_reads_them(header):
    _header_agrees(_sign(header, VALID))


def test_a_plain_keyed_header_is_read_without_pyjwt():
    token = jwt.encode(VALID, SECRET, "HS256", headers={"kid": "k1"})
    assert _header_agrees(token) == {"alg": "HS256", "typ": "JWT", "kid": "k1"}


_PAYLOADS: list[Any] = [
    {**VALID, "exp": NOW - LEEWAY_S - 1},
    {**VALID, "exp": NOW - LEEWAY_S},
    {**VALID, "exp": NOW - LEEWAY_S + 5},
    {**VALID, "exp": float(NOW + 3600)},
    {**VALID, "exp": str(NOW + 3600)},
    {**VALID, "exp": True},
    {**VALID, "exp": None},
    {**VALID, "exp": 10**30},
    {**VALID, "iat": NOW + LEEWAY_S + 5},
    {**VALID, "iat": NOW + LEEWAY_S - 5},
    {**VALID, "iat": None},
    {**VALID, "iat": "now"},
    {**VALID, "nbf": NOW + LEEWAY_S + 5},
    {**VALID, "nbf": None},
    {**VALID, "nbf": "soon"},
    {**VALID, "sub": None},
    {**VALID, "sub": 42},
    {**VALID, "jti": 7},
    {**VALID, "jti": None},
    {**VALID, "aud": "eva"},
    {**VALID, "aud": ["eva"]},
    {**VALID, "aud": ""},
    {**VALID, "aud": []},
    {**VALID, "aud": None},
    {**VALID, "iss": ["https://issuer.example"]},
    {k: v for k, v in VALID.items() if k != "iat"},
    {k: v for k, v in VALID.items() if k != "sub"},
    [VALID],
    "claims",
    b'{"sub":"user-1","iat":1,"exp":1e999}',
    b'{"sub":"user-1","iat":NaN,"exp":99999999999}',
    b'{"sub":"user-1","iat":1,"exp":99999999999,"exp":1}',
    b'{"sub":"\\ud800","iat":1,"exp":99999999999}',
    b"\xff\xfe",
    # Beyond 64 bits orjson gives a float where the standard library keeps the exact integer.
    {**VALID, "x": 2**64 + 1},
    {**VALID, "x": -(2**63) - 1},
    b'{"sub":"user-1","iat":1,"exp":99999999999,"x":' + b"[" * 1000 + b"]" * 1000 + b"}",
]


@pytest.mark.parametrize("audience", [None, "eva"])
@pytest.mark.parametrize("payload", _PAYLOADS, ids=_short_id)
def test_unusual_claims_are_never_accepted_alone(payload, audience):
    _agrees(_sign({"alg": "HS256"}, payload), audience=audience, issuer="https://issuer.example" if audience else None)


def test_an_empty_audience_setting_accepts_no_empty_aud():
    # PyJWT counts an empty `aud` as missing whatever audience it is asked for.
    assert _agrees(jwt.encode({**VALID, "aud": ""}, SECRET, "HS256"), audience="") is None


def test_a_key_without_utf8_bytes_is_left_to_pyjwt():
    key = "k" * 63 + "\udcff"  # a lone surrogate, as os.environ gives undecodable bytes
    assert HmacTokenCheck(("HS256",), audience=None, issuer=None, leeway_s=LEEWAY_S).claims("a.b.c", key) is None


def test_wrong_key_or_disallowed_algorithm_is_left_to_pyjwt():
    token = jwt.encode(VALID, SECRET, "HS256")
    assert _agrees(token, key="x" * 64) is None
    assert _agrees(token, algorithms=("HS512",)) is None
    assert _agrees(jwt.encode(VALID, SECRET, "HS512"), algorithms=("HS256",)) is None


@pytest.mark.parametrize("key", ["", "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----", "ssh-rsa AAAA"])
def test_keys_pyjwt_refuses_are_refused_here_too(key):
    # PyJWT refuses these as HMAC secrets (empty, or a public key: the key-confusion attack).
    assert _agrees(_sign({"alg": "HS256"}, VALID, key=key), key=key) is None


def test_spellings_of_the_same_bytes_are_left_to_pyjwt():
    head, body, signature = jwt.encode(VALID, SECRET, "HS256").split(".")
    # The last character of a 43-character HS256 signature carries 2 unused bits: set one.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    other = alphabet[alphabet.index(signature[-1]) ^ 1]
    spellings = (f"{head}.{body}.{signature[:-1]}{other}", f"{head}.{body}.{signature}=", f"{head}=.{body}.{signature}")
    for token in spellings:
        assert _agrees(token) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    token=st.just(jwt.encode(VALID, SECRET, "HS256")),
    edits=st.lists(st.tuples(st.integers(0, 400), st.characters(codec="utf-8")), min_size=1, max_size=4),
)
def test_edited_tokens_are_never_accepted_alone(token, edits):
    for position, char in edits:
        position %= len(token) + 1
        token = token[:position] + char + token[position + 1 :]
    _agrees(token)
    _header_agrees(token)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_TIMES = st.integers(NOW - 2 * LEEWAY_S, NOW + 2 * LEEWAY_S) | _JSON


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claims=st.fixed_dictionaries(
        {},
        optional={
            "sub": st.just("user-1") | _JSON,
            "exp": _TIMES,
            "iat": _TIMES,
            "nbf": _TIMES,
            "aud": st.sampled_from(["eva", "other", ["eva"], ""]) | _JSON,
            "iss": st.sampled_from(["https://issuer.example", "other"]) | _JSON,
            "jti": st.just("j") | _JSON,
        },
    ),
    audience=st.sampled_from([None, "eva"]),
    issuer=st.sampled_from([None, "https://issuer.example"]),
)
def test_signed_claims_of_any_shape_are_accepted_only_as_pyjwt_does(claims, audience, issuer):
    _agrees(_sign({"alg": "HS256", "typ": "JWT"}, claims), audience=audience, issuer=issuer)


def test_the_check_is_off_without_hmac_algorithms():
    check = HmacTokenCheck(("RS256",), audience=None, issuer=None, leeway_s=LEEWAY_S)
    assert not check.enabled
    assert check.claims(jwt.encode(VALID, SECRET, "HS256"), SECRET) is None
