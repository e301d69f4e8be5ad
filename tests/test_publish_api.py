"""POST /api/v1/publish, GET /api/v1/presence and the Python publisher API."""

from __future__ import annotations

import pytest

from service import keys
from service.broker.memory import MemoryBroker
from service.publisher import InvalidEvent, Publisher
from tests.conftest import connect, make_settings, publish, receive_json, subscribe, token_for, txn


async def test_publish_returns_202_with_correlation_id_and_position(app_client):
    settings = make_settings()
    client = await app_client(settings)
    response = await publish(client, settings, {"type": "transaction_new", "data": txn(), "correlationId": "abc-1"})
    assert response.status == 202
    body = await response.json()
    assert body["correlationId"] == "abc-1"
    assert body["subscription"] == "transactions:C1"
    assert body["offset"] == 1


async def test_batch_publish_keeps_order(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await subscribe(ws)
    events = [{"type": "transaction_update", "data": txn(f"T{i}")} for i in range(5)]
    response = await publish(client, settings, {"events": events})
    assert response.status == 202
    assert [e["offset"] for e in (await response.json())["events"]] == [1, 2, 3, 4, 5]
    assert [(await receive_json(ws))["data"]["id"] for _ in range(5)] == [f"T{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"type": "transaction_party", "data": txn()}, "unknown event type"),
        ({"type": "transaction_new", "data": "x"}, "data must be an object"),
        ({"type": "transaction_new", "data": {"customerId": "C1"}}, "data.id"),
        ({"type": "transaction_new", "data": {"id": "T1"}}, "data.customerId"),
        ({"type": "transaction_new", "data": txn(customer="C*")}, "data.customerId"),
        ({"type": "transaction_new", "data": txn(status=5)}, "data.status"),
        ({"type": "transaction_new", "data": txn(changedFields="status")}, "changedFields"),
        ({"type": "transaction_new", "data": txn(), "channel": "gossip"}, "unknown channel"),
        ({"type": "notification", "data": {"text": "hi"}, "channel": "notifications"}, "userId is required"),
        ({"type": "notification", "data": txn()}, "cannot be published on transactions"),
        ({"type": "transaction_new", "data": txn(), "extra": 1}, "unknown field"),
        ({"type": "transaction_new", "data": txn(blob="x" * 70_000)}, "limit"),
        ({"events": []}, "events"),
        ({"events": [{"type": "transaction_new", "data": txn()}, 5]}, "events[1]"),
    ],
)
async def test_invalid_events_get_400_with_a_reason(app_client, body, reason):
    settings = make_settings()
    client = await app_client(settings)
    response = await publish(client, settings, body)
    assert response.status == 400
    payload = await response.json()
    assert payload["error"] == "invalid_event"
    assert reason in payload["message"]


async def test_publish_needs_a_publisher_token(app_client):
    settings = make_settings()
    client = await app_client(settings)
    body = {"type": "transaction_new", "data": txn()}
    assert (await client.post("/api/v1/publish", json=body)).status == 401
    user = token_for(settings)
    forbidden = await client.post("/api/v1/publish", json=body, headers={"Authorization": f"Bearer {user}"})
    assert forbidden.status == 403


async def test_publish_rejects_bad_json_and_huge_bodies(app_client):
    settings = make_settings()
    client = await app_client(settings)
    auth = {"Authorization": "Bearer " + token_for(settings, roles=["publisher"])}
    assert (await client.post("/api/v1/publish", data=b"{nope", headers=auth)).status == 400
    assert (await client.post("/api/v1/publish", data=b"x" * (2 * 1024 * 1024), headers=auth)).status == 413


async def test_presence_lists_connections_of_a_customer_to_entitled_users(app_client):
    settings = make_settings()
    client = await app_client(settings)
    await connect(client, token_for(settings, sub="alice", customers=["C1"]))
    await connect(client, token_for(settings, sub="bob", customers=["C1", "C2"]))
    auth = {"Authorization": "Bearer " + token_for(settings, sub="carol", customers=["C1"])}
    body = await (await client.get("/api/v1/presence/C1", headers=auth)).json()
    assert body["count"] == 2
    assert sorted(c["userId"] for c in body["connections"]) == ["alice", "bob"]
    assert {c["podId"] for c in body["connections"]} == {"pod-test"}
    assert (await client.get("/api/v1/presence/C2", headers=auth)).status == 403
    assert (await client.get("/api/v1/presence/C2")).status == 401


async def test_python_publisher_api_validates_and_publishes(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await subscribe(ws)
    publisher = client.app[keys.PUBLISHER]
    published = await publisher.publish("stage_change", txn(stage="funding"))
    event = await receive_json(ws)
    assert event["correlationId"] == published.correlation_id
    assert event["data"]["stage"] == "funding"
    with pytest.raises(InvalidEvent):
        await publisher.publish("stage_change", {"id": "T1"})


async def test_publisher_works_on_a_bare_broker():
    broker = MemoryBroker()
    await broker.start()
    published = await Publisher(broker).publish("transaction_new", txn("T9", "C5"))
    history = await broker.history("transactions:C5", None)
    assert history.position.offset == published.position.offset == 1
