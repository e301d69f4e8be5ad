"""Why was my socket refused: a plain GET of the WebSocket URL that names its origin gets the handshake's answer."""

from __future__ import annotations

from typing import Any

from tests.conftest import make_settings, token_for

UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


async def _answer(client: Any, token: str, headers: dict[str, str], **query: str) -> tuple[int, str]:
    response = await client.get(
        "/ws/transactions",
        params={"customerId": "C1", **query},
        headers={"Authorization": f"Bearer {token}", **headers},
    )
    try:
        if response.status == 101:
            return 101, ""
        body = await response.json()
        return response.status, body["error"]
    finally:
        response.release()


async def test_a_probe_naming_a_refused_origin_gets_403_forbidden_origin(app_client):
    settings = make_settings()
    client = await app_client(settings)
    assert await _answer(client, token_for(settings), {}, origin="http://127.0.0.1:8090") == (403, "forbidden_origin")


async def test_a_probe_naming_an_allowed_origin_passes_every_check_but_the_upgrade(app_client):
    settings = make_settings()
    client = await app_client(settings)
    assert await _answer(client, token_for(settings), {}, origin="https://app.example.com") == (400, "bad_request")
    assert await _answer(client, "garbage", {}, origin="https://app.example.com") == (401, "unauthorized")


async def test_the_browsers_origin_header_outranks_a_named_origin(app_client):
    settings = make_settings()
    client = await app_client(settings)
    token = token_for(settings)
    allowed = {**UPGRADE, "Origin": "https://app.example.com"}
    assert await _answer(client, token, allowed, origin="https://evil.example") == (101, "")
    refused = {**UPGRADE, "Origin": "https://evil.example"}
    assert await _answer(client, token, refused, origin="https://app.example.com") == (403, "forbidden_origin")
