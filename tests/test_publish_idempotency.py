"""Idempotency keys: a retried publish is answered with the original offset and delivered once, on every pod."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service import keys
from service.broker import memory
from service.publisher import InvalidEvent, Publisher
from service.redis_keys import idempotency_key_name
from tests.conftest import AppClient, connect, make_settings, publish, receive_json, subscribe, token_for, txn
from tests.drop_proxy import DropProxy
from tests.test_redis_functional import Client, PodFactory, event_body, has_events, progress, session, start_pods
from tests.test_redis_functional import publish as publish_to

__all__ = ["session", "start_pods"]  # fixtures


def keyed(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {**body, "idempotencyKey": key}


# -- the embedded broker, through the HTTP API -----------------------------------------


async def test_a_retry_with_the_same_key_gets_the_original_offset_and_is_delivered_once(app_client: AppClient):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await subscribe(ws, filters={"customerId": "C1"})
    body = {"type": "transaction_new", "data": txn("T1"), "idempotencyKey": "txn-T1-created"}

    first = await publish(client, settings, body)
    retry = await publish(client, settings, body)
    marker = await publish(client, settings, {"type": "transaction_new", "data": txn("T2")})

    assert (first.status, retry.status, marker.status) == (202, 202, 202)
    original, repeated = await first.json(), await retry.json()
    assert (original["offset"], original["duplicate"]) == (1, False)
    assert (repeated["offset"], repeated["epoch"], repeated["duplicate"]) == (1, original["epoch"], True)
    assert (await marker.json())["offset"] == 2
    delivered = [await receive_json(ws), await receive_json(ws)]
    assert [(e["offset"], e["data"]["id"]) for e in delivered] == [(1, "T1"), (2, "T2")]


async def test_a_batch_reports_each_duplicate_and_keys_are_per_subscription(app_client: AppClient):
    settings = make_settings()
    client = await app_client(settings)
    await publish(client, settings, keyed({"type": "transaction_new", "data": txn("T1", "C1")}, "k1"))
    events = [
        keyed({"type": "transaction_update", "data": txn("T1", "C1")}, "k1"),  # a retry of the first
        keyed({"type": "transaction_new", "data": txn("T9", "C2")}, "k1"),  # another subscription
        keyed({"type": "transaction_new", "data": txn("T2", "C1")}, "k2"),
        keyed({"type": "transaction_new", "data": txn("T2", "C1")}, "k2"),  # repeated within the batch
        {"type": "transaction_new", "data": txn("T3", "C1")},
    ]
    response = await publish(client, settings, {"events": events})
    assert response.status == 202
    results = (await response.json())["events"]
    assert [(r["subscription"], r["offset"], r["duplicate"]) for r in results] == [
        ("transactions:C1", 1, True),
        ("transactions:C2", 1, False),
        ("transactions:C1", 2, False),
        ("transactions:C1", 2, True),
        ("transactions:C1", 3, False),
    ]
    history = await client.app[keys.BROKER].history("transactions:C1", None)
    assert history.position.offset == 3


@pytest.mark.parametrize(
    "key",
    ["", "x" * 129, "has space", "tab\there", "caf\u00e9", 12, ["k"], {"k": 1}],
    ids=["empty", "too-long", "space", "tab", "non-ascii", "number", "list", "object"],
)
async def test_an_invalid_idempotency_key_gets_400_invalid_event_naming_the_field(app_client: AppClient, key: Any):
    settings = make_settings()
    client = await app_client(settings)
    body = {"type": "transaction_new", "data": txn(), "idempotencyKey": key}
    response = await publish(client, settings, body)
    assert response.status == 400
    error = await response.json()
    assert error["error"] == "invalid_event"
    assert "idempotencyKey must be" in error["message"]


async def test_the_python_publisher_takes_an_idempotency_key(app_client: AppClient):
    settings = make_settings()
    client = await app_client(settings)
    publisher = client.app[keys.PUBLISHER]
    first = await publisher.publish("transaction_new", txn(), idempotency_key="T1:new")
    again = await publisher.publish("transaction_new", txn(), idempotency_key="T1:new")
    assert not first.position.duplicate
    assert again.position.duplicate
    assert again.position == first.position
    with pytest.raises(InvalidEvent, match="idempotencyKey"):
        await publisher.publish("transaction_new", txn(), idempotency_key="two words")


async def test_the_embedded_broker_remembers_a_bounded_number_of_keys(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(memory, "MAX_IDEMPOTENCY_KEYS", 3)
    broker = memory.MemoryBroker()
    await broker.start()
    for n in range(4):
        await broker.publish("transactions:C1", b"{}", idempotency_key=f"k{n}")
    # The oldest key went to make room: its retry is published again; the newest are still known.
    assert not (await broker.publish("transactions:C1", b"{}", idempotency_key="k0")).duplicate
    assert (await broker.publish("transactions:C1", b"{}", idempotency_key="k3")).duplicate


# -- real pods on a real redis-server --------------------------------------------------


async def test_a_retry_through_another_pod_gets_the_original_offset_and_every_client_sees_the_event_once(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod_a, pod_b = start_pods(redis_server.url)
    clients = [await Client.connect(session, pod) for pod in (pod_a, pod_b)]
    for client in clients:
        assert (await client.subscribe("C1"))["type"] == "subscribed"
    body = keyed(event_body("C1", 0), "evt-0")

    first = await publish_to(session, pod_a, body)
    retry = await publish_to(session, pod_b, body)
    again = await publish_to(session, pod_a, body)
    after = await publish_to(session, pod_b, keyed(event_body("C1", 1), "evt-1"))

    assert [status for status, _ in (first, retry, again, after)] == [202] * 4
    assert first[1]["duplicate"] is False
    for _, answer in (retry, again):
        assert (answer["offset"], answer["epoch"], answer["duplicate"]) == (1, first[1]["epoch"], True)
    assert after[1]["offset"] == 2
    for client in clients:
        await eventually(has_events(client, 2), progress(client, 2))
        assert [(e["offset"], e["data"]["seq"]) for e in client.events()] == [(1, 0), (2, 1)]


async def test_a_publish_whose_reply_was_lost_is_retried_through_another_pod_and_delivered_once(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    with DropProxy(redis_server.port) as proxy:
        # No canary in flight when the replies go: the publish takes the pod's open command
        # connection (a new one would wait for replies to its handshake and send nothing).
        [pod_a] = start_pods(
            f"redis://127.0.0.1:{proxy.port}/0", 1, broker_canary_interval_s="60", broker_canary_max_lag_s="120"
        )
        [pod_b] = start_pods(redis_server.url, 1)
        client = await Client.connect(session, pod_b)
        assert (await client.subscribe("C1"))["type"] == "subscribed"
        # Through pod B, so Redis knows the publish script before pod A's replies are lost.
        assert (await publish_to(session, pod_b, keyed(event_body("C1", 0), "evt-0")))[0] == 202

        proxy.mute_replies()
        body = keyed(event_body("C1", 1), "evt-1")
        status, answer = await publish_to(session, pod_a, body)
        assert status == 503, answer
        # Redis ran the script all the same: the event was stored and delivered.
        await eventually(has_events(client, 2), "the publish whose reply was lost was not stored")

        status, retried = await publish_to(session, pod_b, body)
        assert status == 202
        assert (retried["offset"], retried["duplicate"]) == (2, True)
        assert (await publish_to(session, pod_b, keyed(event_body("C1", 2), "evt-2")))[1]["offset"] == 3
        await eventually(has_events(client, 3), progress(client, 3))
        assert [(e["offset"], e["data"]["seq"]) for e in client.events()] == [(1, 0), (2, 1), (3, 2)]


async def test_a_backend_publisher_and_a_pod_share_the_keys(
    redis_server: RedisServer, start_pods: PodFactory, session: aiohttp.ClientSession
) -> None:
    [pod] = start_pods(redis_server.url, 1)
    async with Publisher.connect(redis_server.url) as publisher:
        published = await publisher.publish("transaction_new", event_body("C1", 0)["data"], idempotency_key="evt-0")
        repeated = await publisher.publish("transaction_new", event_body("C1", 0)["data"], idempotency_key="evt-0")
    assert (published.position.offset, published.position.duplicate) == (1, False)
    assert (repeated.position.offset, repeated.position.duplicate) == (1, True)
    status, answer = await publish_to(session, pod, keyed(event_body("C1", 0), "evt-0"))
    assert (status, answer["offset"], answer["duplicate"]) == (202, 1, True)


async def test_the_window_of_a_backend_publisher_is_the_ttl_of_its_keys(redis_server: RedisServer, raw: Redis):
    async with Publisher.connect(redis_server.url, idempotency_window_s=60) as publisher:
        await publisher.publish("transaction_new", txn("T1", "C1"), idempotency_key="evt-0")
    assert 0 < await raw.ttl(idempotency_key_name("", "transactions:C1", "evt-0")) <= 60
