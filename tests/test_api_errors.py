"""Every error of the HTTP API is JSON with `error` and `message`, including those aiohttp answers itself."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from service import keys
from service.app import MAX_REQUEST_BYTES
from tests.conftest import AppClient, token_for


async def _assert_json_error(response: aiohttp.ClientResponse, status: int, error: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json", await response.text()
    body: dict[str, Any] = await response.json()
    assert body["error"] == error
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


async def test_oversized_publish_body_gets_413_as_json(app_client: AppClient) -> None:
    client = await app_client()
    token = token_for(client.app[keys.SETTINGS], sub="backend", customers=[], roles=["publisher"])
    body = b'{"type": "transaction_update", "data": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
    response = await client.post(
        "/api/v1/publish", data=body, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    await _assert_json_error(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/v1/publish", "POST"),
        ("PUT", "/api/v1/publish", "POST"),
        ("DELETE", "/api/v1/presence/CUST-001", "GET"),
        ("POST", "/api/v1/presence/CUST-001", "GET"),
        ("POST", "/ws/transactions", "GET"),
    ],
)
async def test_wrong_method_gets_405_as_json_with_allow(
    app_client: AppClient, method: str, path: str, allowed: str
) -> None:
    client = await app_client()
    response = await client.request(method, path)
    await _assert_json_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["Allow"]


@pytest.mark.parametrize("path", ["/api/v1/nothing", "/api/v2/publish", "/api/v1/presence/", "/nowhere"])
async def test_unknown_path_gets_404_as_json(app_client: AppClient, path: str) -> None:
    client = await app_client()
    await _assert_json_error(await client.get(path), 404, "not_found")


async def test_handler_replies_are_unchanged(app_client: AppClient) -> None:
    # Errors the handlers build keep their own words.
    client = await app_client()
    await _assert_json_error(await client.post("/api/v1/publish", data=b"{}"), 401, "unauthorized")


async def test_wrong_method_on_an_upgrade_request_gets_405_as_json(app_client: AppClient) -> None:
    client = await app_client()
    response = await client.post("/ws/transactions", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    await _assert_json_error(response, 405, "method_not_allowed")
