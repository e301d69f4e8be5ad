"""Forged, confused, malformed and rotated tokens: refused before the upgrade, or in-band on an open socket."""

from __future__ import annotations

import asyncio
import base64
import configparser
import functools
import hashlib
import hmac
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.auth import AuthError, TokenVerifier
from service.config import ConfigError, load_settings
from service.protocol import CloseCode
from tests.conftest import (
    BASE_ENV,
    SECRET,
    connect,
    make_settings,
    publish,
    receive_json,
    receive_type,
    subscribe,
    token_for,
    txn,
    wait_closed,
)

OTHER_SECRET = "rotated-secret-" + "z" * 40
ROOT = Path(__file__).resolve().parent.parent


def _claims(**overrides):
    now = int(time.time())
    claims = {"sub": "u1", "customerId": "C1", "iat": now, "exp": now + 600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], payload: bytes | dict[str, Any], key: bytes, digest=hashlib.sha256) -> str:
    """Sign by hand what PyJWT refuses to produce (HMAC with a public key, odd JSON)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(body)}"
    return f"{signing_input}.{_b64(hmac.new(key, signing_input.encode(), digest).digest())}"


async def _status(client, token: str) -> int:
    response = await client.get(
        "/ws/transactions",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            "Authorization": f"Bearer {token}",
        },
    )
    if response.status != 101:
        body = await response.json()
        # The reply never repeats the token, nor any of its three parts.
        assert all(part not in json.dumps(body) for part in token.split(".") if len(part) > 8)
    return response.status


@functools.cache
def _rsa_key(index: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _pem_public(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _pem_private(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _rs256_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in BASE_ENV.items() if k != "EVA_WS_JWT_SECRET"}
    env.update({"EVA_WS_JWT_ALGORITHMS": "RS256", "EVA_WS_JWT_PUBLIC_KEY": _pem_public(_rsa_key())})
    env.update(extra)
    return env


# -- algorithm confusion ----------------------------------------------------------


def _public_key_encodings() -> dict[str, bytes]:
    public = _rsa_key().public_key()
    pem = _pem_public(_rsa_key()).encode()
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public)
    return {
        "pem": pem,
        "pem without trailing newline": pem.rstrip(b"\n"),
        "pkcs1 pem": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        "der": public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "ssh": public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "jwk json": jwk.encode(),
        "jwk n": json.loads(jwk)["n"].encode(),
    }


@pytest.mark.parametrize("encoding", list(_public_key_encodings()))
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_token_signed_with_the_public_key_is_refused(app_client, encoding, alg):
    client = await app_client(load_settings(_rs256_env()))
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    key = _public_key_encodings()[encoding]
    assert await _status(client, _forge({"alg": alg, "typ": "JWT"}, _claims(), key, digest)) == 401


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "AAAA"])
async def test_alg_none_is_refused_in_every_spelling(app_client, alg, signature):
    client = await app_client(make_settings())
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    assert await _status(client, f"{header}.{payload}.{signature}") == 401


async def test_rs256_token_is_refused_when_the_service_expects_hs256(app_client):
    client = await app_client(make_settings())
    token = jwt.encode(_claims(), _pem_private(_rsa_key()), algorithm="RS256")
    assert await _status(client, token) == 401


# -- claims -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("exp a string", _claims(exp="tomorrow")),
        ("exp infinite", b'{"sub":"u1","iat":1,"exp":1e400}'),
        ("exp NaN", b'{"sub":"u1","iat":1,"exp":NaN}'),
        ("exp beyond year 9999", _claims(exp=10**13)),
        ("iat infinite", b'{"sub":"u1","iat":1e400,"exp":9999999999}'),
        ("nbf infinite", b'{"sub":"u1","iat":1,"exp":9999999999,"nbf":-1e400}'),
        ("payload an array", b"[1,2]"),
        ("payload not json", b"\xff\xfe"),
        ("sub a number", _claims(sub=42)),
        ("sub empty", _claims(sub="")),
        ("roles a string", _claims(roles="admin")),
        ("customerId with a wildcard", _claims(customerId="C*")),
        ("customerIds too many", _claims(customerIds=["a"] * 1001)),
    ],
)
async def test_malformed_claims_get_401_not_500(app_client, name, payload):
    client = await app_client(make_settings())
    assert await _status(client, _forge({"alg": "HS256", "typ": "JWT"}, payload, SECRET.encode())) == 401, name


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"exp": -5}, 101),  # within the 30 s leeway
        ({"exp": -60}, 401),
        ({"nbf": 5}, 101),
        ({"nbf": 60}, 401),
        ({"iat": 5}, 101),
        ({"iat": 60}, 401),
    ],
)
async def test_time_claims_honour_the_leeway_and_no_more(app_client, claims, status):
    client = await app_client(make_settings(jwt_leeway_s="30"))
    now = int(time.time())
    token = jwt.encode(_claims(**{k: now + v for k, v in claims.items()}), SECRET, algorithm="HS256")
    assert await _status(client, token) == status


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "eva-ws-admin"},
        {"aud": "eva"},
        {"aud": "EVA-WS"},
        {"aud": " eva-ws"},
        {"aud": ["eva-ws-admin"]},
        {"aud": []},
        {"iss": "https://idp.example.com.evil"},
        {"iss": "https://idp.example.co"},
        {"iss": "HTTPS://IDP.EXAMPLE.COM"},
        {"iss": None},
        {"aud": None},
    ],
)
async def test_audience_and_issuer_partial_matches_are_refused(app_client, claims):
    client = await app_client(make_settings(jwt_audience="eva-ws", jwt_issuer="https://idp.example.com"))
    full = {"aud": "eva-ws", "iss": "https://idp.example.com", **claims}
    assert await _status(client, jwt.encode(_claims(**full), SECRET, algorithm="HS256")) == 401


async def test_issuer_as_a_list_is_refused(app_client):
    client = await app_client(make_settings(jwt_issuer="https://idp.example.com"))
    forged = _forge({"alg": "HS256"}, _claims(iss=["https://idp.example.com"]), SECRET.encode())
    assert await _status(client, forged) == 401


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "crit": ["x-unknown"], "x-unknown": 1},
        {"alg": "HS256", "crit": ["b64"], "b64": False},
        {"alg": "HS256", "crit": "x-unknown"},
        {"alg": "HS256", "crit": []},
    ],
)
async def test_unknown_or_malformed_crit_header_is_refused(app_client, header):
    client = await app_client(make_settings())
    assert await _status(client, _forge(header, _claims(), SECRET.encode())) == 401


@pytest.mark.parametrize(
    "token",
    [
        "a.b.c",
        "..",
        "...",
        "Bearer",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "é.é.é",
        "%00",
    ],
)
async def test_garbage_tokens_get_401(app_client, token):
    client = await app_client(make_settings())
    response = await client.get(
        "/ws/transactions",
        params={"token": token},
        headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
    )
    assert response.status == 401
    assert token not in await response.text()


# -- key rotation ------------------------------------------------------------------


async def test_keys_are_chosen_by_kid_and_tokens_without_kid_use_the_default(app_client):
    settings = make_settings(jwt_keys=json.dumps({"2026-01": OTHER_SECRET, "2025-12": "old-secret-" + "o" * 40}))
    client = await app_client(settings)
    sign = functools.partial(jwt.encode, _claims(), algorithm="HS256")
    assert await _status(client, sign(OTHER_SECRET, headers={"kid": "2026-01"})) == 101
    assert await _status(client, sign("old-secret-" + "o" * 40, headers={"kid": "2025-12"})) == 101
    assert await _status(client, sign(SECRET)) == 101
    # A kid selects exactly one key: another configured key does not verify it.
    assert await _status(client, sign(SECRET, headers={"kid": "2026-01"})) == 401
    assert await _status(client, sign(OTHER_SECRET)) == 401
    assert await _status(client, sign(OTHER_SECRET, headers={"kid": "2027-01"})) == 401
    assert await _status(client, _forge({"alg": "HS256", "kid": ["2026-01"]}, _claims(), OTHER_SECRET.encode())) == 401


async def test_without_a_default_key_a_token_needs_a_kid(app_client, tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"k1": OTHER_SECRET}))
    env = {k: v for k, v in BASE_ENV.items() if k != "EVA_WS_JWT_SECRET"}
    client = await app_client(load_settings({**env, "EVA_WS_JWT_KEYS_FILE": str(keys_file)}))
    assert await _status(client, jwt.encode(_claims(), OTHER_SECRET, algorithm="HS256", headers={"kid": "k1"})) == 101
    assert await _status(client, jwt.encode(_claims(), OTHER_SECRET, algorithm="HS256")) == 401


async def test_a_single_configured_key_ignores_the_kid(app_client):
    client = await app_client(make_settings())
    assert await _status(client, jwt.encode(_claims(), SECRET, algorithm="HS256", headers={"kid": "whatever"})) == 101


async def test_rs256_keys_by_kid_and_key_confusion_through_them(app_client):
    old, new = _rsa_key(0), _rsa_key(1)
    settings = load_settings(_rs256_env(EVA_WS_JWT_KEYS=json.dumps({"old": _pem_public(old), "new": _pem_public(new)})))
    client = await app_client(settings)
    assert (
        await _status(client, jwt.encode(_claims(), _pem_private(new), algorithm="RS256", headers={"kid": "new"}))
        == 101
    )
    assert (
        await _status(client, jwt.encode(_claims(), _pem_private(old), algorithm="RS256", headers={"kid": "old"}))
        == 101
    )
    assert (
        await _status(client, jwt.encode(_claims(), _pem_private(old), algorithm="RS256", headers={"kid": "new"}))
        == 401
    )
    forged = _forge({"alg": "HS256", "kid": "new"}, _claims(), _pem_public(new).encode())
    assert await _status(client, forged) == 401


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EVA_WS_JWT_KEYS": "{not json"}, "not JSON"),
        ({"EVA_WS_JWT_KEYS": "[]"}, "object"),
        ({"EVA_WS_JWT_KEYS": "{}"}, "object"),
        ({"EVA_WS_JWT_KEYS": '{"k": "short"}'}, "at least 32 bytes"),
        ({"EVA_WS_JWT_KEYS": '{"k": 5}'}, "must be a string"),
        ({"EVA_WS_JWKS_URL": "https://idp.example.com/jwks"}, "public-key"),
    ],
)
def test_bad_key_settings_refuse_to_start(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({**BASE_ENV, **env})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EVA_WS_JWT_KEYS": json.dumps({"k": SECRET})}, "not a PEM public key"),
        ({"EVA_WS_JWT_KEYS": json.dumps({"k": _pem_private(_rsa_key())})}, "not a PEM public key"),
        ({"EVA_WS_JWKS_URL": "http://idp.example.com/jwks"}, "https"),
        ({"EVA_WS_JWKS_URL": "ftp://idp.example.com/jwks"}, "http"),
    ],
)
def test_bad_public_key_settings_refuse_to_start(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(_rs256_env(**env))


def test_jwks_url_over_http_is_allowed_for_loopback_only():
    assert load_settings(_rs256_env(EVA_WS_JWKS_URL="http://127.0.0.1:9/jwks")).jwks_url


# -- in-band refresh ----------------------------------------------------------------


async def test_refresh_with_garbage_or_another_user_is_refused_and_the_socket_stays(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="alice"))
    await subscribe(ws)
    other = token_for(settings, sub="mallory")
    expired = token_for(settings, sub="alice", ttl_s=-120)
    for token in ("garbage", other, expired, jwt.encode(_claims(sub="alice"), OTHER_SECRET, algorithm="HS256")):
        await ws.send_json({"type": "refresh", "token": token, "correlationId": "r"})
        error = await receive_type(ws, "error")
        assert error["code"] == "invalid_token"
        assert token not in error["message"]
    for bad in ({"type": "refresh"}, {"type": "refresh", "token": 5}, {"type": "refresh", "token": "x" * 9000}):
        await ws.send_json(bad)
        assert (await receive_type(ws, "error"))["code"] == "invalid_message"
    await publish(client, settings, {"type": "transaction_new", "data": txn()})
    assert (await receive_json(ws))["type"] == "transaction_new"


async def test_refresh_with_fewer_customers_drops_those_subscriptions(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="alice", customers=["C1", "C2"]))
    await subscribe(ws, filters={"customerId": "C1"})
    await subscribe(ws, filters={"customerId": "C2"})
    await ws.send_json({"type": "refresh", "token": token_for(settings, sub="alice", customers=["C2"])})
    dropped = await receive_type(ws, "unsubscribed")
    assert (dropped["subscription"], dropped["reason"]) == ("transactions:C1", "forbidden")
    assert (await receive_type(ws, "refreshed"))["type"] == "refreshed"
    await publish(client, settings, {"type": "transaction_new", "data": txn("T1", "C1")})
    await publish(client, settings, {"type": "transaction_new", "data": txn("T2", "C2")})
    assert (await receive_json(ws))["data"]["id"] == "T2"
    assert (await subscribe(ws, filters={"customerId": "C1"}))["code"] == "forbidden"


async def test_refresh_with_another_sub_after_expiry_still_closes_with_4001(app_client):
    settings = make_settings(jwt_leeway_s="0", token_refresh_grace_s="1")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="alice", ttl_s=1))
    assert (await receive_type(ws, "error"))["code"] == "token_expiring"
    await ws.send_json({"type": "refresh", "token": token_for(settings, sub="mallory")})
    assert (await receive_type(ws, "error"))["code"] == "invalid_token"
    assert await wait_closed(ws) == CloseCode.TOKEN_EXPIRED


async def test_refresh_after_the_close_cannot_reopen_the_socket(app_client):
    settings = make_settings(jwt_leeway_s="0", token_refresh_grace_s="1")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="alice", ttl_s=1))
    assert await wait_closed(ws) == CloseCode.TOKEN_EXPIRED
    with pytest.raises(ConnectionError):
        await ws.send_json({"type": "refresh", "token": token_for(settings, sub="alice")})
    # A new connection is the way back.
    again = await connect(client, token_for(settings, sub="alice"))
    assert (await subscribe(again))["type"] == "subscribed"


async def test_early_refresh_moves_the_expiry(app_client):
    settings = make_settings(jwt_leeway_s="0", token_refresh_grace_s="1")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="alice", ttl_s=2))
    await ws.send_json({"type": "refresh", "token": token_for(settings, sub="alice", ttl_s=600)})
    assert (await receive_type(ws, "refreshed"))["type"] == "refreshed"
    await asyncio.sleep(3.5)  # past the first token's expiry and grace
    await ws.send_json({"type": "ping"})
    assert (await receive_json(ws))["type"] == "pong"


# -- errors no library documents -----------------------------------------------------


def _deep_header_token() -> str:
    """A token whose header nests 1,500 arrays: deeper than Python's recursion limit lets `json` read."""
    header = b'{"alg":"HS256","x":' + b"[" * 1500 + b"]" * 1500 + b"}"
    return f"{_b64(header)}.{_b64(json.dumps(_claims()).encode())}.{_b64(b'signature')}"


async def _refusal(response) -> tuple[int, str]:
    return response.status, (await response.json())["message"]


@pytest.mark.parametrize("keys", ["one key", "keys by kid"])
async def test_a_deeply_nested_header_gets_401_at_the_handshake_on_publish_and_on_refresh(app_client, keys):
    settings = make_settings(**({"jwt_keys": json.dumps({"k1": OTHER_SECRET})} if keys == "keys by kid" else {}))
    client = await app_client(settings)
    token = _deep_header_token()
    headers = {"Authorization": f"Bearer {token}"}
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    handshake = await client.get("/ws/transactions", headers={**upgrade, "Sec-WebSocket-Version": "13", **headers})
    assert await _refusal(handshake) == (401, "token is malformed")
    published = await client.post("/api/v1/publish", json={"type": "transaction_new", "data": txn()}, headers=headers)
    assert await _refusal(published) == (401, "token is malformed")
    ws = await connect(client, token_for(settings))
    await ws.send_json({"type": "refresh", "token": token, "correlationId": "deep"})
    error = await receive_type(ws, "error")
    assert (error["code"], error["message"], error["correlationId"]) == ("invalid_token", "token is malformed", "deep")
    await ws.send_json({"type": "ping", "correlationId": "still-open"})
    assert (await receive_type(ws, "pong"))["correlationId"] == "still-open"


async def _raw_response(client, head: bytes) -> tuple[int, bytes]:
    """Status and body of a request written byte for byte (aiohttp's client would not send these bytes)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head + b"Connection: close\r\nContent-Length: 0\r\n\r\n")
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_a_token_that_is_not_utf8_gets_401_not_500(app_client):
    # aiohttp hands header bytes that are not UTF-8 on as lone surrogates, which no JWT library
    # expects: with keys chosen by kid, PyJWT's header reader raised UnicodeEncodeError.
    client = await app_client(make_settings(jwt_keys=json.dumps({"k1": OTHER_SECRET})))
    for request_line in (b"GET /ws/transactions", b"POST /api/v1/publish"):
        status, body = await _raw_response(
            client,
            request_line + b" HTTP/1.1\r\nHost: eva.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: Bearer \xff\xfe.\xfd.\xfc\r\n",
        )
        assert status == 401, (request_line, body)
        assert json.loads(body)["message"] == "token is malformed"


def test_the_pyjwt_floor_leaves_out_the_releases_that_raise_on_deep_nesting():
    # PyJWT 2.12.0 to 2.13.0 let a RecursionError out of a header nested 1,500 deep.
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requires = [Requirement(line) for line in config["options"]["install_requires"].splitlines() if line.strip()]
    (pyjwt,) = [r for r in requires if canonicalize_name(r.name) == "pyjwt"]
    assert not [v for v in ("2.12.0", "2.12.1", "2.13.0") if pyjwt.specifier.contains(v)]
    assert pyjwt.specifier.contains(metadata.version("PyJWT"))


# -- the verifier itself --------------------------------------------------------------


@pytest.mark.parametrize("value", [None, 5, b"bytes", ["a"], {"t": 1}, "", "x" * 10_000])
async def test_verifier_refuses_non_tokens_with_auth_error(value):
    with pytest.raises(AuthError) as caught:
        await TokenVerifier(make_settings()).verify(value)
    assert caught.value.reason == "malformed"
