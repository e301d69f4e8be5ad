"""POST /api/v1/disconnect, /revoke and /unsubscribe on one pod with the embedded broker, through real sockets."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from service import keys
from service.auth import MAX_TOKEN_LIFETIME_S
from service.config import Settings
from service.protocol import CloseCode
from tests.conftest import SECRET, AppClient, connect, publish, receive_type, subscribe, token_for, txn, wait_closed

Client = TestClient[web.Request, web.Application]


def _settings(client: Client) -> Settings:
    return client.app[keys.SETTINGS]


def admin_token(client: Client) -> str:
    return token_for(_settings(client), sub="ops-1", customers=[], roles=["admin"])


async def control(client: Client, path: str, body: Any, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with client.post(f"/api/v1/{path}", json=body, headers=headers) as response:
        return response.status, await response.json()


async def handshake_status(client: Client, token: str) -> tuple[int, dict[str, Any]]:
    async with client.get(f"/ws/transactions?token={token}") as response:
        return response.status, await response.json()


async def test_disconnect_closes_every_socket_of_the_user_with_4003_and_no_other(app_client: AppClient) -> None:
    client = await app_client()
    settings = _settings(client)
    alice = [await connect(client, token_for(settings, sub="alice")) for _ in range(3)]
    bob = await connect(client, token_for(settings, sub="bob"))
    status, body = await control(client, "disconnect", {"userId": "alice", "reason": "logged out"}, admin_token(client))
    assert (status, body) == (202, {"userId": "alice", "disconnected": True})
    for ws in alice:
        assert await wait_closed(ws) == CloseCode.DISCONNECTED_BY_SERVER
        assert ws.close_code == 4003
    # Bob's socket is untouched: it still answers.
    await bob.send_json({"type": "ping", "correlationId": "p"})
    assert (await receive_type(bob, "pong"))["correlationId"] == "p"


@pytest.mark.parametrize("path", ["disconnect", "revoke", "unsubscribe"])
async def test_control_needs_an_admin_token(app_client: AppClient, path: str) -> None:
    client = await app_client()
    settings = _settings(client)
    body = {"userId": "alice"}
    status, answer = await control(client, path, body)
    assert status == 401
    assert answer["error"] == "unauthorized"
    for roles in ([], ["publisher"]):
        status, answer = await control(client, path, body, token_for(settings, sub="x", roles=roles))
        assert status == 403
        assert answer == {"error": "forbidden", "message": "the token needs the admin role"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("disconnect", {}),
        ("disconnect", {"userId": "bad id"}),
        ("disconnect", {"userId": "alice", "reason": 5}),
        ("disconnect", {"userId": "alice", "reason": "x" * 200}),
        ("disconnect", {"userId": "alice", "extra": 1}),
        ("disconnect", ["alice"]),
        ("revoke", {"userId": "alice"}),
        ("revoke", {"userId": "alice", "issuedBefore": "now"}),
        ("revoke", {"userId": "alice", "issuedBefore": 10**12}),
        ("revoke", {"jti": ""}),
        ("revoke", {"jti": "a", "userId": "alice"}),
        ("unsubscribe", {"userId": "alice", "channel": "nope"}),
        ("unsubscribe", {"userId": "alice", "channel": "transactions", "filters": {"customerId": "bad id"}}),
        ("unsubscribe", {"userId": "alice", "channel": "transactions", "filters": {"color": "red"}}),
    ],
)
async def test_bad_control_requests_get_a_json_400(app_client: AppClient, path: str, body: Any) -> None:
    client = await app_client()
    status, answer = await control(client, path, body, admin_token(client))
    assert status == 400
    assert answer["error"] == "invalid_request"
    assert answer["message"]


async def test_a_body_that_is_not_json_gets_invalid_json(app_client: AppClient) -> None:
    client = await app_client()
    headers = {"Authorization": f"Bearer {admin_token(client)}"}
    async with client.post("/api/v1/disconnect", data=b"{", headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_json"


async def test_revoking_a_user_refuses_older_tokens_everywhere_and_closes_their_sockets(app_client: AppClient) -> None:
    client = await app_client()
    settings = _settings(client)
    now = int(time.time())
    old = token_for(settings, sub="alice", roles=["publisher"])
    open_socket = await connect(client, old)
    status, body = await control(client, "revoke", {"userId": "alice", "issuedBefore": now + 1}, admin_token(client))
    assert (status, body) == (202, {"userId": "alice", "issuedBefore": now + 1, "revoked": True})
    assert await wait_closed(open_socket) == CloseCode.DISCONNECTED_BY_SERVER
    # The handshake, the publish API and an in-band refresh all refuse the old token.
    assert await handshake_status(client, old) == (401, {"error": "token_revoked", "message": "token has been revoked"})
    async with client.post(
        "/api/v1/publish", json={"type": "transaction_new", "data": txn()}, headers={"Authorization": f"Bearer {old}"}
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "token_revoked"
    newer = _token(sub="alice", iat=now + 2)
    ws = await connect(client, newer)
    await ws.send_json({"type": "refresh", "token": old, "correlationId": "r"})
    error = await receive_type(ws, "error")
    assert (error["code"], error["correlationId"]) == ("token_revoked", "r")
    # Tokens of other users, and the user's tokens issued afterwards, still work.
    assert (await subscribe(ws))["type"] == "subscribed"
    other = await connect(client, token_for(settings, sub="bob"))
    assert (await subscribe(other))["type"] == "subscribed"


async def test_revoking_a_jti_refuses_that_token_only(app_client: AppClient) -> None:
    client = await app_client()
    settings = _settings(client)
    leaked, kept = token_for(settings, sub="alice"), token_for(settings, sub="alice")
    leaked_socket, kept_socket = await connect(client, leaked), await connect(client, kept)
    jti = jwt.decode(leaked, options={"verify_signature": False})["jti"]
    status, body = await control(client, "revoke", {"jti": jti}, admin_token(client))
    assert (status, body) == (202, {"jti": jti, "revoked": True})
    assert await wait_closed(leaked_socket) == CloseCode.DISCONNECTED_BY_SERVER
    assert (await handshake_status(client, leaked))[1]["error"] == "token_revoked"
    assert (await subscribe(kept_socket))["type"] == "subscribed"


async def test_unsubscribe_ends_the_matching_subscriptions_with_a_reason(app_client: AppClient) -> None:
    client = await app_client()
    settings = _settings(client)
    ws = await connect(client, token_for(settings, sub="alice", customers=["C1", "C2"]))
    for customer in ("C1", "C2"):
        assert (await subscribe(ws, filters={"customerId": customer}))["type"] == "subscribed"
    body = {"userId": "alice", "channel": "transactions", "filters": {"customerId": "C1"}, "reason": "access removed"}
    status, answer = await control(client, "unsubscribe", body, admin_token(client))
    assert status == 202
    assert answer == {
        "userId": "alice",
        "channel": "transactions",
        "filters": {"customerId": "C1"},
        "unsubscribed": True,
    }
    ended = await receive_type(ws, "unsubscribed")
    assert (ended["subscription"], ended["reason"]) == ("transactions:C1", "access removed")
    # C2 still delivers, C1 no longer does.
    for customer in ("C1", "C2"):
        assert (
            await publish(client, settings, {"type": "transaction_new", "data": txn(customer=customer)})
        ).status == 202
    event = await receive_type(ws, "transaction_new")
    assert event["subscription"] == "transactions:C2"


async def test_a_token_living_longer_than_the_maximum_lifetime_is_refused(app_client: AppClient) -> None:
    client = await app_client()
    now = int(time.time())
    token = _token(sub="alice", iat=now, exp=now + MAX_TOKEN_LIFETIME_S + 1)
    status, body = await handshake_status(client, token)
    assert status == 401
    assert "lifetime" in body["message"]


def _token(*, sub: str, iat: int, exp: int | None = None) -> str:
    claims = {"sub": sub, "customerId": "C1", "iat": iat, "exp": exp or iat + 600, "roles": []}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.mark.parametrize("path", ["/api/v1/presence/C1", "/api/v1/connections?userId=ops-1", "/api/v1/channels"])
async def test_the_read_endpoints_refuse_a_revoked_token_as_token_revoked(app_client: AppClient, path: str) -> None:
    client = await app_client()
    settings = _settings(client)
    revoked = token_for(settings, sub="ops-1", customers=["C1"], roles=["admin"])
    body = {"userId": "ops-1", "issuedBefore": int(time.time()) + 1}
    assert (await control(client, "revoke", body, admin_token(client)))[0] == 202
    async with client.get(path, headers={"Authorization": f"Bearer {revoked}"}) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "token_revoked"
