"""GET /api/v1/connections and /api/v1/channels on two real pods sharing a real Redis or Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleet.process import ServiceProcess
from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from tests.conftest import SECRET, make_settings, metric_value, token_for
from tests.openapi_document import assert_response
from tests.protocol_schemas import assert_server_message

SETTINGS = make_settings()
ADMIN = token_for(SETTINGS, sub="root", customers=[], roles=["admin"])
CUSTOMERS = ["C1", "C2"]


@pytest.fixture(params=["redis", "cluster"])
def pods(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Two pods on one Redis, or on a Redis Cluster."""
    server: RedisServer | None = None
    if request.param == "redis":
        server = RedisServer(tmp_path)
        server.start()
        url = server.url
    else:
        cluster: RedisCluster = request.getfixturevalue("module_cluster")
        url = cluster.url
    started = [ServiceProcess(tmp_path, jwt_secret=SECRET, redis_url=url, drain_delay_s="0") for _ in range(2)]
    try:
        for pod in started:
            pod.start(wait=False)
        for pod in started:
            pod.wait_healthy()
        yield started[0], started[1]
    finally:
        for pod in started:
            pod.stop()
        if server is not None:
            server.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def get(
    session: aiohttp.ClientSession, pod: ServiceProcess, path: str, token: str = ADMIN, *, documented: str = ""
) -> tuple[int, Any]:
    """GET `path`, checked against the document's `documented` path (by default, `path` without its query)."""
    async with session.get(f"{pod.url}{path}", headers={"Authorization": f"Bearer {token}"}) as response:
        body = await response.json()
        assert_response(documented or path.partition("?")[0], "GET", response.status, response.content_type, body)
        return response.status, body


async def open_socket(
    session: aiohttp.ClientSession,
    pod: ServiceProcess,
    user: str,
    *subscriptions: dict[str, Any],
    customers: list[str] = CUSTOMERS,
) -> aiohttp.ClientWebSocketResponse:
    token = token_for(SETTINGS, sub=user, customers=customers)
    ws = await session.ws_connect(f"{pod.url}/ws/transactions?token={token}")
    for body in subscriptions:
        await ws.send_json({"type": "subscribe", **body})
        assert (await receive_server_message(ws))["type"] == "subscribed"
    return ws


async def receive_server_message(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message: dict[str, Any] = await ws.receive_json(timeout=10)
    assert_server_message(message)
    return message


def pod_id(pod: ServiceProcess) -> str:
    return pod.env["EVA_WS_POD_ID"]


async def test_connections_lists_the_sockets_of_both_pods_with_their_subscriptions_page_by_page(
    pods: tuple[ServiceProcess, ServiceProcess], session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = pods
    c1 = {"channel": "transactions", "filters": {"customerId": "C1"}}
    c2 = {"channel": "transactions", "filters": {"customerId": "C2", "transactionIds": ["T9"]}}
    # Kept referenced: a socket the test drops would be closed by the garbage collector.
    sockets = [
        await open_socket(session, pod_a, "alice", c1),
        await open_socket(session, pod_b, "alice", c2, {"channel": "notifications"}),
        await open_socket(session, pod_b, "bob", c1),
    ]

    found: list[dict[str, Any]] = []

    async def both_pods_answer_for_alice() -> bool:
        status, body = await get(session, pod_a, "/api/v1/connections?userId=alice")
        assert status == 200
        found[:] = body["connections"]
        return body["pods"] == sorted([pod_id(pod_a), pod_id(pod_b)]) and len(found) == 2

    # The pods listen for queries once their broker is up: wait for both to answer.
    await eventually(both_pods_answer_for_alice, lambda: f"alice's sockets on both pods, found {found}")
    by_pod = {c["podId"]: c for c in found}
    assert [s["subscription"] for s in by_pod[pod_id(pod_a)]["subscriptions"]] == ["transactions:C1"]
    assert by_pod[pod_id(pod_b)]["subscriptions"] == [
        {"channel": "notifications", "subscription": "notifications:alice", "filters": {"userId": "alice"}},
        {
            "channel": "transactions",
            "subscription": "transactions:C2",
            "filters": {"customerId": "C2", "transactionIds": ["T9"]},
        },
    ]
    assert all(c["userId"] == "alice" and c["customerIds"] == CUSTOMERS for c in found)

    # Every socket of customer C1 (all three name it), one per page, from the other pod.
    pages: list[list[dict[str, Any]]] = []
    query = "/api/v1/connections?customerId=C1&limit=1"
    while True:
        status, body = await get(session, pod_b, query)
        assert status == 200
        pages.append(body["connections"])
        if body["nextCursor"] is None:
            break
        query = f"/api/v1/connections?customerId=C1&limit=1&cursor={body['nextCursor']}"
    assert [len(page) for page in pages] == [1, 1, 1]
    listed = [c for page in pages for c in page]
    assert sorted((c["userId"], c["podId"]) for c in listed) == sorted(
        [("alice", pod_id(pod_a)), ("alice", pod_id(pod_b)), ("bob", pod_id(pod_b))]
    )
    assert len({c["connId"] for c in listed}) == 3
    assert [c["connectedAt"] for c in listed] == sorted(c["connectedAt"] for c in listed)

    status, body = await get(session, pod_a, "/api/v1/connections?userId=nobody")
    assert (status, body["connections"], body["nextCursor"]) == (200, [], None)
    user = token_for(SETTINGS, sub="alice", customers=CUSTOMERS)
    assert (await get(session, pod_a, "/api/v1/connections?userId=alice", token=user))[0] == 403
    for ws in sockets:
        await ws.close()


async def test_channels_lists_the_answering_pods_channels_with_subscriber_counts(
    pods: tuple[ServiceProcess, ServiceProcess], session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = pods
    c1 = {"channel": "transactions", "filters": {"customerId": "C1"}}
    sockets = [
        await open_socket(session, pod_a, "alice", c1),
        await open_socket(session, pod_b, "bob", c1, {"channel": "user_updates"}),
        await open_socket(session, pod_b, "carol", c1),
    ]

    status, body = await get(session, pod_b, "/api/v1/channels")
    assert status == 200
    assert body == {
        "podId": pod_id(pod_b),
        "count": 2,
        "subscribers": 3,
        "channels": [
            {"channel": "transactions", "subscription": "transactions:C1", "subscribers": 2},
            {"channel": "user_updates", "subscription": "user_updates:bob", "subscribers": 1},
        ],
    }
    status, body = await get(session, pod_a, "/api/v1/channels")
    assert (status, body["podId"], body["channels"]) == (
        200,
        pod_id(pod_a),
        [{"channel": "transactions", "subscription": "transactions:C1", "subscribers": 1}],
    )
    for ws in sockets:
        await ws.close()


async def test_a_subscriber_with_presence_sees_sockets_of_its_customer_open_and_close_on_the_other_pod(
    pods: tuple[ServiceProcess, ServiceProcess], session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = pods
    # Subscribed without presence, or to another customer: neither gets these messages.
    plain = await open_socket(session, pod_a, "plain", {"channel": "transactions", "filters": {"customerId": "C1"}})
    elsewhere = await open_socket(
        session, pod_b, "elsewhere", {"channel": "transactions", "filters": {"customerId": "C2"}, "presence": True}
    )

    watcher = await open_socket(
        session,
        pod_a,
        "watcher",
        {"channel": "transactions", "filters": {"customerId": "C1"}, "presence": True},
        customers=["C1"],
    )
    visitor = await session.ws_connect(
        f"{pod_b.url}/ws/transactions?token={token_for(SETTINGS, sub='visitor', customers=['C1'])}"
    )
    joined = await receive_server_message(watcher)
    assert (joined["type"], joined["userId"], joined["podId"], joined["customerId"]) == (
        "presence_join",
        "visitor",
        pod_id(pod_b),
        "C1",
    )
    # The same connection as presence lists it.
    status, body = await get(session, pod_a, "/api/v1/presence/C1", documented="/api/v1/presence/{customerId}")
    assert status == 200
    assert joined["connId"] in [c["connId"] for c in body["connections"]]
    await visitor.close()
    left = await receive_server_message(watcher)
    assert (left["type"], left["connId"], left["connectedAt"]) == (
        "presence_leave",
        joined["connId"],
        joined["connectedAt"],
    )

    async with session.get(f"{pod_b.url}/metrics") as response:
        published = metric_value(await response.text(), 'eva_ws_presence_announcements_total{outcome="published"}')
    # At least the joins of "elsewhere" (C1 and C2) and of the visitor, published before the watcher saw it.
    assert published >= 3

    # What the other two got since: only the answers to their pings.
    for ws in (plain, elsewhere):
        await ws.send_json({"type": "ping", "correlationId": "after"})
        assert (await receive_server_message(ws))["type"] == "pong"
    for ws in (watcher, plain, elsewhere):
        await ws.close()


async def test_presence_is_refused_for_a_customer_the_token_may_not_see_and_on_user_channels(
    pods: tuple[ServiceProcess, ServiceProcess], session: aiohttp.ClientSession
) -> None:
    pod_a, _ = pods
    ws = await open_socket(session, pod_a, "alice")
    await ws.send_json(
        {"type": "subscribe", "channel": "transactions", "filters": {"customerId": "C9"}, "presence": True}
    )
    assert (await receive_server_message(ws))["code"] == "forbidden"
    await ws.send_json({"type": "subscribe", "channel": "notifications", "presence": True})
    assert (await receive_server_message(ws))["code"] == "invalid_message"
    await ws.close()
