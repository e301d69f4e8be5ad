"""Keys from a JWKS endpoint (a real aiohttp server started here): rotation, outages, and no IdP hammering."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleet.waiting import eventually
from service import keys
from service.config import load_settings
from service.jwks import MAX_JWKS_BYTES, parse_jwks
from tests.conftest import BASE_ENV, connect, receive_type

SECRET_FOR_OCT = "o" * 48


@functools.cache
def _rsa_key(kid: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _token(kid: str, signer: str | None = None) -> str:
    now = int(time.time())
    private = _rsa_key(signer or kid).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    claims = {"sub": "u1", "customerId": "C1", "iat": now, "exp": now + 600}
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})


class IdentityProvider:
    """A JWKS endpoint whose key set, status and timing the test controls; it counts fetches."""

    def __init__(self) -> None:
        self.kids: list[str] = []
        self.extra: list[dict[str, Any]] = []
        self.status = 200
        self.fetches = 0
        self.requested = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.requested.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.Response(status=self.status)
        entries = [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_rsa_key(kid).public_key())), "kid": kid, "use": "sig"}
            for kid in self.kids
        ]
        return web.json_response({"keys": entries + self.extra})


@pytest.fixture
async def idp(aiohttp_server):
    provider = IdentityProvider()
    app = web.Application()
    app.router.add_get("/jwks", provider.jwks)
    server = await aiohttp_server(app)
    provider.url = str(server.make_url("/jwks"))  # type: ignore[attr-defined]
    return provider


def _settings(idp: IdentityProvider, **extra: str):
    env = {k: v for k, v in BASE_ENV.items() if k != "EVA_WS_JWT_SECRET"}
    env.update({"EVA_WS_JWT_ALGORITHMS": "RS256", "EVA_WS_JWKS_URL": idp.url})  # type: ignore[attr-defined]
    env.update({f"EVA_WS_{k.upper()}": v for k, v in extra.items()})
    return load_settings(env)


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
    response.release()
    return response.status


def _random_kid_token() -> str:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": uuid.uuid4().hex}).encode())
    return f"{header.rstrip(b'=').decode()}.e30.c2ln"


async def test_token_signed_by_a_jwks_key_is_accepted(app_client, idp):
    idp.kids = ["a"]
    client = await app_client(_settings(idp))
    assert idp.fetches == 1  # at start, so the first clients do not wait for it
    assert await _status(client, _token("a")) == 101
    assert await _status(client, _token("a", signer="b")) == 401
    assert idp.fetches == 1


async def test_a_thousand_random_kids_cost_at_most_one_fetch_per_cooldown(app_client, idp):
    idp.kids = ["a"]
    client = await app_client(_settings(idp, jwks_cooldown_s="30"))
    for _ in range(10):
        statuses = await asyncio.gather(*(_status(client, _random_kid_token()) for _ in range(100)))
        assert set(statuses) == {401}
    # One fetch at start; the cooldown started then, so the random kids add none.
    assert idp.fetches == 1
    assert client.app[keys.JWKS].fetches == 1
    assert await _status(client, _token("a")) == 101


async def test_concurrent_misses_share_one_fetch(app_client, idp):
    client = await app_client(_settings(idp, jwks_cooldown_s="0"))
    before = idp.fetches
    idp.gate = asyncio.Event()
    pending = asyncio.gather(*(_status(client, _random_kid_token()) for _ in range(50)))
    await asyncio.wait_for(idp.requested.wait(), 10)
    await asyncio.sleep(0.2)  # let the other 49 handshakes reach the key lookup
    idp.gate.set()
    assert set(await pending) == {401}
    # Each fetch served every miss that was waiting for it; far fewer than 50.
    assert idp.fetches - before < 10


async def test_a_new_kid_works_after_a_refetch_and_a_removed_kid_stops_working(app_client, idp):
    idp.kids = ["a"]
    client = await app_client(_settings(idp, jwks_cooldown_s="0.2", jwks_max_age_s="1"))
    assert await _status(client, _token("a")) == 101
    idp.kids = ["a", "b"]

    async def b_accepted() -> bool:
        return await _status(client, _token("b")) == 101

    await eventually(b_accepted, "the new kid to be fetched")
    idp.kids = ["b"]

    async def a_refused() -> bool:
        return await _status(client, _token("a")) == 401

    await eventually(a_refused, "the removed kid to stop working")
    assert await _status(client, _token("b")) == 101


async def test_idp_down_at_start_refuses_tokens_then_recovers(app_client, idp):
    idp.kids = ["a"]
    idp.status = 503
    client = await app_client(_settings(idp, jwks_cooldown_s="0.2"))
    assert await _status(client, _token("a")) == 401
    idp.status = 200

    async def accepted() -> bool:
        return await _status(client, _token("a")) == 101

    await eventually(accepted, "the JWKS to be fetched once the IdP is back")


async def test_idp_outage_keeps_the_last_good_keys(app_client, idp):
    idp.kids = ["a"]
    client = await app_client(_settings(idp, jwks_cooldown_s="0", jwks_max_age_s="1"))
    idp.status = 500
    await asyncio.sleep(1.2)  # the cached set is now stale: the next lookup refetches and fails
    assert await _status(client, _token("a")) == 101
    assert idp.fetches >= 2


async def test_a_slow_idp_does_not_block_other_clients(app_client, idp):
    idp.kids = ["a"]
    client = await app_client(_settings(idp, jwks_cooldown_s="0"))
    control = await connect(client, _token("a"))
    idp.requested.clear()
    idp.gate = asyncio.Event()
    handshake = asyncio.ensure_future(_status(client, _random_kid_token()))
    await asyncio.wait_for(idp.requested.wait(), 10)
    # The fetch is in flight and held by the IdP: the pod still serves the control client.
    await control.send_json({"type": "ping", "correlationId": "during-fetch"})
    assert (await receive_type(control, "pong"))["correlationId"] == "during-fetch"
    assert not handshake.done()
    idp.gate.set()
    assert await handshake == 401


async def test_symmetric_and_encryption_keys_in_the_jwks_are_ignored(app_client, idp):
    oct_key = base64.urlsafe_b64encode(SECRET_FOR_OCT.encode()).rstrip(b"=").decode()
    enc = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_rsa_key("e").public_key())), "kid": "e", "use": "enc"}
    idp.extra = [{"kty": "oct", "kid": "h", "k": oct_key}, enc]
    client = await app_client(_settings(idp))
    now = int(time.time())
    claims = {"sub": "u1", "customerId": "C1", "iat": now, "exp": now + 600}
    assert await _status(client, jwt.encode(claims, SECRET_FOR_OCT, algorithm="HS256", headers={"kid": "h"})) == 401
    assert await _status(client, _token("e")) == 401


def _private_jwks() -> dict[str, tuple[str, Any, dict[str, Any]]]:
    """kid -> (algorithm, private key, its JWK): keys an IdP must never publish (the JWK carries `d`)."""
    keys: dict[str, tuple[str, Any, type[jwt.algorithms.Algorithm]]] = {
        "rsa-private": ("RS256", _rsa_key("rsa-private"), jwt.algorithms.RSAAlgorithm),
        "ec-private": ("ES256", ec.generate_private_key(ec.SECP256R1()), jwt.algorithms.ECAlgorithm),
        "ed-private": ("EdDSA", ed25519.Ed25519PrivateKey.generate(), jwt.algorithms.OKPAlgorithm),
    }
    return {
        kid: (alg, key, {**json.loads(kind.to_jwk(key)), "kid": kid, "use": "sig"})
        for kid, (alg, key, kind) in keys.items()
    }


async def test_private_keys_in_the_jwks_are_skipped_and_the_public_ones_kept(app_client, idp):
    private = _private_jwks()
    idp.kids = ["a"]
    idp.extra = [jwk for _, _, jwk in private.values()]
    assert all("d" in entry for entry in idp.extra)
    client = await app_client(_settings(idp, jwt_algorithms="RS256,ES256,EdDSA"))
    now = int(time.time())
    claims = {"sub": "u1", "customerId": "C1", "iat": now, "exp": now + 600}
    for kid, (alg, key, _) in private.items():
        # Whoever read the document could sign this token: refused, and never a 500.
        assert await _status(client, jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})) == 401, kid
    assert await _status(client, _token("a")) == 101
    assert list(parse_jwks(json.dumps({"keys": idp.extra}).encode()) or {}) == []


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"keys": 5}', b'{"nokeys": []}'],
)
def test_a_document_that_is_not_a_jwks_is_refused(body):
    assert parse_jwks(body) is None


def test_broken_entries_are_skipped_and_good_ones_kept():
    good = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_rsa_key("g").public_key())), "kid": "g"}
    body = json.dumps(
        {"keys": [5, {"kid": 7, "kty": "RSA"}, {"kid": "x", "kty": "RSA", "n": "!!", "e": "AQAB"}, {"kid": "y"}, good]}
    )
    assert list(parse_jwks(body.encode()) or {}) == ["g"]


class TricklingKeyServer:
    """A JWKS endpoint on a raw socket that writes its answer in pieces, pausing between them.

    As a key server behind a proxy may: chunked, or with a Content-Length and the body split
    over several TCP segments. Either way the client sees a body that arrives a piece at a time.
    """

    def __init__(self, body: bytes, *, chunked: bool, pieces: int = 4) -> None:
        self.body = body
        self.chunked = chunked
        self.pieces = pieces
        self.url = ""

    async def __aenter__(self) -> TricklingKeyServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/jwks"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        framing = "Transfer-Encoding: chunked" if self.chunked else f"Content-Length: {len(self.body)}"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n{framing}\r\n\r\n"
        writer.write(head.encode())
        size = -(-len(self.body) // self.pieces)
        try:
            for start in range(0, len(self.body), size):
                await writer.drain()
                # Pacing, not a timing assertion: the client has read what came before.
                await asyncio.sleep(0.05)
                piece = self.body[start : start + size]
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece) if self.chunked else piece)
            if self.chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the client stopped reading: a body it refused
        finally:
            writer.close()


def _key_set(kids: list[str], *, size: int | None = None) -> bytes:
    """A JWKS document, padded with whitespace to exactly `size` bytes when given."""
    entries = [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_rsa_key(kid).public_key())), "kid": kid, "use": "sig"}
        for kid in kids
    ]
    body = json.dumps({"keys": entries}).encode()
    return body if size is None else body[:-1] + b" " * (size - len(body)) + b"}"


def _trickled_settings(server: TricklingKeyServer):
    env = {k: v for k, v in BASE_ENV.items() if k != "EVA_WS_JWT_SECRET"}
    return load_settings({**env, "EVA_WS_JWT_ALGORITHMS": "RS256", "EVA_WS_JWKS_URL": server.url})


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize("size", [None, MAX_JWKS_BYTES], ids=["small", "at-the-cap"])
async def test_a_key_set_written_in_pieces_is_read_to_the_end(app_client, chunked, size):
    async with TricklingKeyServer(_key_set(["a", "b"], size=size), chunked=chunked) as server:
        client = await app_client(_trickled_settings(server))
        assert await _status(client, _token("a")) == 101
        assert await _status(client, _token("b")) == 101


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_a_key_set_over_the_size_cap_is_refused_however_it_arrives(app_client, chunked):
    async with TricklingKeyServer(_key_set(["a"], size=MAX_JWKS_BYTES + 1), chunked=chunked) as server:
        client = await app_client(_trickled_settings(server))
        assert await _status(client, _token("a")) == 401
