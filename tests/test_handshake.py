"""What happens before the upgrade: tokens, origins and draining decide, and no socket opens."""

from __future__ import annotations

import time
from types import SimpleNamespace
from urllib.parse import parse_qsl

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from service.auth import query_value
from service.config import Settings, load_settings
from tests.conftest import BASE_ENV, SECRET, connect, make_settings, receive_type, subscribe, token_for


def _claims(**overrides):
    now = int(time.time())
    claims = {"sub": "u1", "customerId": "C1", "iat": now, "exp": now + 600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


async def _status(client, token: str | None, headers=None) -> int:
    url = "/ws/transactions" if token is None else f"/ws/transactions?token={token}"
    response = await client.get(
        url,
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        },
    )
    if response.status != 101:
        body = await response.json()
        assert body["error"]
        assert body["message"]
    return response.status


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("missing", None),
        ("garbage", "not-a-token"),
        ("bad signature", jwt.encode(_claims(), "another-secret-" + "y" * 40, algorithm="HS256")),
        ("expired", jwt.encode(_claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256")),
        ("not yet valid", jwt.encode(_claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256")),
        ("issued in the future", jwt.encode(_claims(iat=int(time.time()) + 600), SECRET, algorithm="HS256")),
        ("no exp", jwt.encode(_claims(exp=None), SECRET, algorithm="HS256")),
        ("no sub", jwt.encode(_claims(sub=None), SECRET, algorithm="HS256")),
        ("no iat", jwt.encode(_claims(iat=None), SECRET, algorithm="HS256")),
        ("algorithm outside the allow-list", jwt.encode(_claims(), SECRET, algorithm="HS512")),
        ("alg none", jwt.encode(_claims(), "", algorithm="none")),
        ("aud without configured audience", jwt.encode(_claims(aud="other"), SECRET, algorithm="HS256")),
        ("sub with glob characters", jwt.encode(_claims(sub="u*"), SECRET, algorithm="HS256")),
        ("customerIds not a list", jwt.encode(_claims(customerIds="C1"), SECRET, algorithm="HS256")),
    ],
)
async def test_bad_token_gets_401_and_no_socket(app_client, name, token):
    client = await app_client(make_settings())
    assert await _status(client, token) == 401, name


async def test_expired_within_leeway_is_accepted(app_client):
    client = await app_client(make_settings(jwt_leeway_s="30"))
    token = jwt.encode(_claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert await _status(client, token) == 101


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"aud": "eva-ws", "iss": "https://idp.example.com"}, 101),
        ({"aud": "other", "iss": "https://idp.example.com"}, 401),
        ({"aud": ["eva-ws", "other"], "iss": "https://idp.example.com"}, 401),
        ({"iss": "https://idp.example.com"}, 401),
        ({"aud": "eva-ws", "iss": "__https://idp.example.com__"}, 401),
        ({"aud": "eva-ws"}, 401),
    ],
)
async def test_audience_and_issuer_are_checked_exactly(app_client, claims, status):
    client = await app_client(make_settings(jwt_audience="eva-ws", jwt_issuer="https://idp.example.com"))
    token = jwt.encode(_claims(**claims), SECRET, algorithm="HS256")
    assert await _status(client, token) == status


async def test_token_in_bearer_header_and_bare_header_are_accepted(app_client):
    settings = make_settings()
    client = await app_client(settings)
    token = token_for(settings)
    assert await _status(client, None, {"Authorization": f"Bearer {token}"}) == 101
    assert await _status(client, None, {"Authorization": token}) == 101


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("https://app.example.com", 101),
        ("https://evil.example", 403),
        ("https://app.example.com.evil", 403),
        ("http://app.example.com", 403),
        ("null", 403),
    ],
)
async def test_origin_allow_list_is_an_exact_match(app_client, origin, status):
    settings = make_settings()
    client = await app_client(settings)
    assert await _status(client, token_for(settings), {"Origin": origin}) == status


async def test_no_origin_header_is_allowed_with_a_token(app_client):
    settings = make_settings()
    client = await app_client(settings)
    assert await _status(client, token_for(settings)) == 101


def _asymmetric_settings(private_key, algorithm: str) -> tuple[Settings, str]:
    pem_private = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    pem_public = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    env = {k: v for k, v in BASE_ENV.items() if k != "EVA_WS_JWT_SECRET"}
    env.update(
        {"EVA_WS_JWT_ALGORITHMS": algorithm, "EVA_WS_JWT_PUBLIC_KEY": pem_public, "EVA_WS_JWT_PRIVATE_KEY": pem_private}
    )
    return load_settings(env), pem_public


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_public_key_algorithms_verify_tokens(app_client, algorithm):
    key = rsa.generate_private_key(65537, 2048) if algorithm == "RS256" else ec.generate_private_key(ec.SECP256R1())
    settings, _ = _asymmetric_settings(key, algorithm)
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    assert (await subscribe(ws))["type"] == "subscribed"


async def test_hs256_token_signed_with_the_rsa_public_key_is_rejected(app_client):
    settings, pem_public = _asymmetric_settings(rsa.generate_private_key(65537, 2048), "RS256")
    client = await app_client(settings)
    # PyJWT refuses to HMAC-sign with a PEM key, which is the attack: forge it by hand.
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(_claims()).encode())
    signature = hmac.new(pem_public.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert await _status(client, f"{header}.{payload}.{b64(signature)}") == 401


async def test_draining_pod_refuses_new_sockets_with_503(app_client):
    from service import keys

    settings = make_settings()
    client = await app_client(settings)
    client.app[keys.LIFECYCLE].draining = True
    assert await _status(client, token_for(settings)) == 503
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "draining" in (await ready.json())["reasons"]


async def test_plain_get_without_upgrade_gets_400(app_client):
    settings = make_settings()
    client = await app_client(settings)
    response = await client.get(f"/ws/transactions?token={token_for(settings)}")
    assert response.status == 400


async def test_pong_for_a_valid_connection(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await ws.send_json({"type": "ping", "timestamp": "2026-01-01T00:00:00Z"})
    assert (await receive_type(ws, "pong"))["timestamp"].endswith("Z")


@given(query=st.text(alphabet="tokenrc=&%+;3D5aé", max_size=24), name=st.sampled_from(["token", "reconnect"]))
def test_query_values_are_read_as_parse_qsl_reads_them(query, name):
    request = SimpleNamespace(raw_path=f"/ws/transactions?{query}")
    expected = next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == name), None)
    assert query_value(request, name) == expected  # type: ignore[arg-type]
