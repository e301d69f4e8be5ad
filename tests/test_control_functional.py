"""Disconnect and revoke across two real pods sharing one Redis or a Redis Cluster, through real sockets."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from fleet.process import ServiceProcess
from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.auth import mint_token
from service.protocol import CloseCode
from tests.conftest import SECRET, make_settings, token_for

SETTINGS = make_settings()
ADMIN = token_for(SETTINGS, sub="ops-1", customers=[], roles=["admin"])
FAST_POD = {"redis_reconnect_max_s": "0.5", "drain_delay_s": "0", "drain_spread_s": "0"}


@pytest.fixture(params=["redis", "cluster"])
def redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One Redis of the test's own, or the module's Redis Cluster."""
    if request.param == "redis":
        server = RedisServer(tmp_path)
        server.start()
        yield server.url
        server.kill()
    else:
        cluster: RedisCluster = request.getfixturevalue("module_cluster")
        yield cluster.url


@pytest.fixture
def pods(tmp_path: Path, redis_url: str) -> Iterator[list[ServiceProcess]]:
    """Two pods on the Redis, with a prefix of their own (the cluster is shared by the module's tests)."""
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    started = [
        ServiceProcess(tmp_path, jwt_secret=SECRET, redis_url=redis_url, redis_prefix=prefix, **FAST_POD)
        for _ in range(2)
    ]
    for pod in started:
        pod.start(wait=False)
    for pod in started:
        pod.wait_healthy()
    yield started
    for pod in started:
        pod.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def control(
    session: aiohttp.ClientSession, pod: ServiceProcess, path: str, body: dict[str, Any], token: str = ADMIN
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"{pod.url}/api/v1/{path}", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, await response.json()


async def handshake(session: aiohttp.ClientSession, pod: ServiceProcess, token: str) -> tuple[int, str | None]:
    """The status of a plain GET of the socket's URL and its `error`: 400 (no upgrade) means the token passed."""
    async with session.get(f"{pod.url}/ws/transactions?token={token}") as response:
        return response.status, (await response.json()).get("error")


async def publish_status(session: aiohttp.ClientSession, pod: ServiceProcess, token: str) -> tuple[int, str | None]:
    body = {"type": "transaction_new", "data": {"id": "T1", "customerId": "C1"}}
    async with session.post(
        f"{pod.url}/api/v1/publish", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        return response.status, (await response.json()).get("error")


async def test_a_disconnect_closes_every_socket_of_the_user_on_both_pods_with_4003(
    pods: list[ServiceProcess], session: aiohttp.ClientSession
) -> None:
    alice = token_for(SETTINGS, sub="alice")
    sockets = [await session.ws_connect(f"{pod.url}/ws/transactions?token={alice}") for pod in pods for _ in range(2)]
    others = [
        await session.ws_connect(f"{pod.url}/ws/transactions?token={token_for(SETTINGS, sub='bob')}") for pod in pods
    ]
    status, body = await control(session, pods[0], "disconnect", {"userId": "alice", "reason": "logged out"})
    assert (status, body) == (202, {"userId": "alice", "disconnected": True})
    for ws in sockets:
        message = await ws.receive()
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == CloseCode.DISCONNECTED_BY_SERVER
        assert message.extra == "logged out"
    for ws in others:
        await ws.send_json({"type": "ping", "correlationId": "still-here"})
        assert (await ws.receive_json())["type"] == "pong"
        await ws.close()


async def test_a_revoked_token_is_refused_on_both_pods_also_after_they_restart(
    pods: list[ServiceProcess], session: aiohttp.ClientSession
) -> None:
    old = token_for(SETTINGS, sub="alice", roles=["publisher"])
    open_socket = await session.ws_connect(f"{pods[1].url}/ws/transactions?token={old}")
    before = int(time.time()) + 1
    status, body = await control(session, pods[0], "revoke", {"userId": "alice", "issuedBefore": before})
    assert (status, body) == (202, {"userId": "alice", "issuedBefore": before, "revoked": True})
    # The socket open on the other pod closes: that pod got the command.
    message = await open_socket.receive()
    assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, CloseCode.DISCONNECTED_BY_SERVER)
    newer = mint_token(SETTINGS, sub="alice", customers=["C1"], roles=["publisher"], now=before)
    for restarted in (False, True):
        if restarted:
            for pod in pods:
                pod.stop()
                pod.start(wait=False)
            for pod in pods:
                pod.wait_healthy()
        for pod in pods:

            async def refused(pod: ServiceProcess = pod) -> bool:
                return await handshake(session, pod, old) == (401, "token_revoked")

            await eventually(refused, f"{pod.url} accepts the revoked token (restarted: {restarted})")
            assert await publish_status(session, pod, old) == (401, "token_revoked")
            # A token issued at issuedBefore or later is not revoked.
            assert await handshake(session, pod, newer) == (400, "bad_request")
            assert (await publish_status(session, pod, newer))[0] == 202


async def test_a_revoked_jti_is_refused_on_both_pods_and_other_tokens_of_the_user_work(
    pods: list[ServiceProcess], session: aiohttp.ClientSession
) -> None:
    leaked, other = token_for(SETTINGS, sub="alice"), token_for(SETTINGS, sub="alice")
    jti = jwt.decode(leaked, options={"verify_signature": False})["jti"]
    assert (await control(session, pods[1], "revoke", {"jti": jti}))[0] == 202
    for pod in pods:

        async def refused(pod: ServiceProcess = pod) -> bool:
            return await handshake(session, pod, leaked) == (401, "token_revoked")

        await eventually(refused, f"{pod.url} accepts the revoked token")
        assert await handshake(session, pod, other) == (400, "bad_request")


async def test_only_admin_tokens_may_send_control_commands(
    pods: list[ServiceProcess], session: aiohttp.ClientSession
) -> None:
    for roles in ([], ["publisher"]):
        token = token_for(SETTINGS, sub="mallory", roles=roles)
        for path in ("disconnect", "revoke"):
            status, body = await control(session, pods[0], path, {"userId": "alice"}, token)
            assert (status, body["error"]) == (403, "forbidden")


async def test_an_unsubscribe_ends_the_users_matching_subscriptions_on_both_pods(
    pods: list[ServiceProcess], session: aiohttp.ClientSession
) -> None:
    alice = token_for(SETTINGS, sub="alice", customers=["C1", "C2"])
    sockets = [await session.ws_connect(f"{pod.url}/ws/transactions?token={alice}") for pod in pods]
    for ws in sockets:
        for customer in ("C1", "C2"):
            await ws.send_json({"type": "subscribe", "channel": "transactions", "filters": {"customerId": customer}})
            assert (await ws.receive_json())["type"] == "subscribed"
    body = {"userId": "alice", "channel": "transactions", "filters": {"customerId": "C1"}, "reason": "access removed"}
    status, answer = await control(session, pods[1], "unsubscribe", body)
    assert (status, answer["unsubscribed"]) == (202, True)
    for ws in sockets:
        ended = await ws.receive_json()
        assert (ended["type"], ended["subscription"], ended["reason"]) == (
            "unsubscribed",
            "transactions:C1",
            "access removed",
        )
        # The socket and its other subscription stay.
        await ws.send_json({"type": "unsubscribe", "channel": "transactions", "filters": {"customerId": "C2"}})
        assert (await ws.receive_json())["type"] == "unsubscribed"
        await ws.close()
