"""Fuzzing of the two parsers that see untrusted input first: client messages and tokens.

A few hundred examples each in the suite; `scripts/fuzz` runs the same properties for much longer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.auth import MAX_EXP_S, MAX_TOKEN_LIFETIME_S, AuthError, Principal, TokenVerifier
from service.protocol import (
    MAX_TRANSACTION_IDS,
    ClientMessage,
    ErrorCode,
    ProtocolError,
    is_valid_id,
    parse_client_message,
)
from tests.conftest import SECRET, make_settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KID_SECRET = "kid-secret-" + "k" * 40
AUTH_MESSAGES = frozenset(
    {
        "token is missing or too long",
        "token is malformed",
        "token kid must be a string",
        "token is signed with an unknown key",
        "token has expired",
        "token is not valid yet",
        "token is for another audience or issuer",
        "token algorithm is not allowed",
        "token signature is invalid",
        "sub must be 1-128 characters of A-Z a-z 0-9 . _ ~ @ + | : = -",
        "customerId must be a valid id",
        "customerIds must be a list of valid ids",
        "roles must be a list of strings",
        "exp must be a number of seconds before year 10000",
        "iat must be a number of seconds before year 10000",
        f"token lifetime (exp - iat) exceeds {MAX_TOKEN_LIFETIME_S} s",
        *(f"token lacks the {claim} claim" for claim in ("exp", "iat", "sub", "aud", "iss", "nbf")),
    }
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
ids = st.one_of(
    st.sampled_from(["C1", "u1", "T1", "a:b"]),
    st.sampled_from(["C1", "u1", "T1", "", "*", "C1\n", "x" * 129, "é"]),
    st.from_regex(r"[A-Za-z0-9._~@+|:=-]{1,8}", fullmatch=True),
    st.text(max_size=20),
)
NOW = int(time.time())


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes any JSON at all, so that examples get past the first check."""
    return st.one_of(strategy, strategy, strategy, json_values)


client_messages = st.fixed_dictionaries(
    {
        "type": _maybe(st.sampled_from(["subscribe", "unsubscribe", "ping", "refresh", "dance"])),
        "channel": _maybe(st.sampled_from(["transactions", "user_updates", "notifications", "x"])),
    },
    optional={
        "filters": _maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "customerId": _maybe(ids),
                    "userId": _maybe(ids),
                    "transactionIds": _maybe(st.lists(ids, max_size=MAX_TRANSACTION_IDS + 2)),
                },
            )
        ),
        "since": _maybe(
            st.fixed_dictionaries(
                {"offset": _maybe(st.integers(-(2**63), 2**64 - 1)), "epoch": _maybe(st.text(max_size=70))}
            )
        ),
        "correlationId": _maybe(st.text(min_size=1, max_size=130)),
        "timestamp": _maybe(st.just("2026-01-01T00:00:00Z")),
        "token": _maybe(st.text(max_size=50)),
    },
)


def _check_parse(text: str) -> None:
    refused: ProtocolError | None = None
    try:
        message = parse_client_message(text)
    except ProtocolError as error:
        refused = error
    if refused is not None:
        event(f"refused: {refused.code}")
        assert isinstance(refused.code, ErrorCode)
        # Error messages quote at most a short prefix of what the client sent.
        assert len(refused.message) <= 300
        return
    event(f"accepted: {message.type}")
    assert isinstance(message, ClientMessage)
    if message.type in ("subscribe", "unsubscribe"):
        assert message.channel is not None
        for value in (message.filters.customer_id, message.filters.user_id):
            assert value is None or is_valid_id(value)
        if message.filters.transaction_ids is not None:
            assert 0 < len(message.filters.transaction_ids) <= MAX_TRANSACTION_IDS
            assert all(is_valid_id(i) for i in message.filters.transaction_ids)
    else:
        assert message.type in ("ping", "refresh")


@FUZZ
@given(st.text())
def test_parse_client_message_on_any_text(text):
    _check_parse(text)


@FUZZ
@given(json_values)
def test_parse_client_message_on_any_json(value):
    _check_parse(orjson.dumps(value).decode())


@FUZZ
@given(client_messages)
def test_parse_client_message_on_near_valid_messages(message):
    _check_parse(orjson.dumps(message).decode())


# -- tokens ------------------------------------------------------------------------------


def _verifier() -> TokenVerifier:
    return TokenVerifier(make_settings(jwt_keys=json.dumps({"k1": KID_SECRET}), jwt_audience="eva-ws"))


VERIFIER = _verifier()


def _verify(token: object) -> None:
    refused: AuthError | None = None
    try:
        principal = asyncio.run(VERIFIER.verify(token))
    except AuthError as error:
        refused = error
    if refused is not None:
        event(f"refused: {refused.reason}")
        # Every message is a fixed text: nothing of the token is ever echoed.
        assert refused.message in AUTH_MESSAGES, refused.message
        return
    event("accepted")
    assert isinstance(principal, Principal)
    assert is_valid_id(principal.user_id)
    assert 0 < principal.expires_at <= MAX_EXP_S
    assert all(is_valid_id(c) for c in principal.customer_ids)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300) | json_values)
def test_verify_on_anything(value):
    _verify(value)


@FUZZ
@given(st.lists(st.text(alphabet="ABCDEFabcdef0123456789-_=.+/", max_size=80), min_size=1, max_size=5))
def test_verify_on_dotted_base64ish_strings(parts):
    _verify(".".join(parts))


hostile_values = st.one_of(
    json_values,
    ids,
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 2**64, -1, 0, 1e300, True, "", None]),
    st.integers(NOW - 10**6, NOW + 10**6),
)
HEADER_FIELDS = ("alg", "kid", "crit", "typ", "b64", "jku", "x5u", "jwk")
CLAIM_FIELDS = ("sub", "exp", "iat", "nbf", "aud", "iss", "customerId", "customerIds", "roles", "jti")
KEYS = (SECRET, KID_SECRET, "other-secret-" + "o" * 40, "")


@FUZZ
@given(st.data())
def test_verify_on_mutations_of_a_valid_token(data):
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    claims: dict[str, Any] = {"sub": "u1", "iat": NOW, "exp": NOW + 600, "aud": "eva-ws", "customerIds": ["C1", "C2"]}
    key = SECRET
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        where = data.draw(st.sampled_from(["header", "claims", "delete", "key"]))
        if where == "header":
            header[data.draw(st.sampled_from(HEADER_FIELDS))] = data.draw(hostile_values)
        elif where == "claims":
            claims[data.draw(st.sampled_from(CLAIM_FIELDS))] = data.draw(hostile_values)
        elif where == "delete" and claims:
            del claims[data.draw(st.sampled_from(sorted(claims)))]
        else:
            key = data.draw(st.sampled_from(KEYS))
    # Python's json writes NaN and Infinity, as a hostile issuer could.
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = _b64(hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest())
    _verify(f"{signing_input}.{signature}")
