"""Fixtures shared by the suite: settings, tokens, a running app and WebSocket helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from service.app import create_app
from service.auth import mint_token
from service.config import Settings, load_settings
from tests.backends import absent_store, module_cluster, store  # noqa: F401  # fixtures of the contract suites
from tests.outbox_testing import module_postgres, postgres  # noqa: F401  # fixtures of the outbox tests
from tests.protocol_schemas import assert_client_message, assert_server_message

SECRET = "test-secret-" + "x" * 60

BASE_ENV = {
    "EVA_WS_MODE": "production",
    "EVA_WS_JWT_SECRET": SECRET,
    "EVA_WS_POD_ID": "pod-test",
    "EVA_WS_DEMO_PUBLISHER": "false",
    "EVA_WS_ALLOWED_ORIGINS": "https://app.example.com",
}


def make_settings(**overrides: str) -> Settings:
    env = dict(BASE_ENV)
    env.update({f"EVA_WS_{k.upper()}": v for k, v in overrides.items()})
    return load_settings(env)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


def token_for(
    settings: Settings,
    sub: str = "u1",
    customers: list[str] | None = None,
    roles: list[str] | None = None,
    ttl_s: int = 3600,
) -> str:
    return mint_token(settings, sub=sub, customers=["C1"] if customers is None else customers, roles=roles, ttl_s=ttl_s)


AppClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def app_client(aiohttp_client: Any) -> AppClient:
    """Start the real app on a real socket; keyword arguments override settings."""

    async def start(settings: Settings | None = None, **overrides: str) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(settings or make_settings(**overrides))
        )
        return client

    return start


async def connect(
    client: TestClient[web.Request, web.Application], token: str, **kwargs: Any
) -> aiohttp.ClientWebSocketResponse:
    return await client.ws_connect(f"/ws/transactions?token={token}", **kwargs)


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout_s)
    assert message.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {message.type} {message.data!r}"
    result: dict[str, Any] = message.json()
    # Every server message the suite reads must match its schema in docs/schemas.
    assert_server_message(result)
    return result


async def receive_type(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The next message of a type, failing if another type arrives first."""
    message = await receive_json(ws, timeout_s)
    assert message["type"] == kind, message
    return message


async def subscribe(
    ws: aiohttp.ClientWebSocketResponse, channel: str = "transactions", **fields: Any
) -> dict[str, Any]:
    request = {"type": "subscribe", "channel": channel, **fields}
    await ws.send_json(request)
    reply = await receive_json(ws)
    if reply["type"] == "subscribed":
        # What the server accepts, the schema must accept too (hostile tests send the rest).
        assert_client_message(request)
    return reply


async def wait_closed(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 10.0) -> int | None:
    """Read until the server closes; return the close code it sent (None if it sent none)."""
    async with asyncio.timeout(timeout_s):
        while True:
            message = await ws.receive()
            if message.type is aiohttp.WSMsgType.CLOSE:
                return int(message.data)
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code
            if message.type is aiohttp.WSMsgType.ERROR:
                return ws.close_code


async def publish(
    client: TestClient[web.Request, web.Application], settings: Settings, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    token = token_for(settings, sub="backend", customers=[], roles=["publisher"])
    return await client.post("/api/v1/publish", json=body, headers={"Authorization": f"Bearer {token}"})


def metric_value(text: str, name: str) -> float:
    """The value of one sample line of Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def txn(txn_id: str = "T1", customer: str = "C1", **fields: Any) -> dict[str, Any]:
    return {"id": txn_id, "customerId": customer, "status": "pending", "stage": "kyc", **fields}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server without persistence, stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client of the test's redis-server, to look at (or tamper with) what pods wrote."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def persistent_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Like `redis_server`, but every acknowledged write survives a restart or kill -9."""
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.kill()
