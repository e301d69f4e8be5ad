"""`subscribe` with `"snapshot": true`: the current state, then the changes after it, none missing, none twice.

Run on every topology (embedded broker, one Redis, Redis Cluster) through the real app and real sockets.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from fleet.waiting import eventually
from service.app import create_app
from service.broker.base import Broker, Position
from service.config import Settings
from service.protocol import ErrorCode
from tests.backends import Store
from tests.broker_contract import broker_factory
from tests.conftest import connect, make_settings, publish, receive_json, subscribe, token_for, txn

Client = TestClient[Any, Any]


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def broker(store: Store) -> Broker:
    return broker_factory(store)()


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings, broker: Broker) -> Client:
    app_client: Client = await aiohttp_client(create_app(settings, broker=broker))
    await eventually(lambda: broker.ready, "the broker never became ready")
    return app_client


async def send_event(client: Client, settings: Settings, kind: str, data: dict[str, Any]) -> None:
    response = await publish(client, settings, {"type": kind, "data": data})
    assert response.status == 202, await response.text()


async def read_snapshot(ws: aiohttp.ClientWebSocketResponse) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The snapshot messages up to `last: true`: their position and every transaction in them."""
    transactions: list[dict[str, Any]] = []
    while True:
        message = await receive_json(ws)
        assert message["type"] == "snapshot", message
        transactions += message["data"]["transactions"]
        if message["data"]["last"]:
            return message["position"], transactions


async def test_a_snapshot_subscriber_gets_the_live_transactions_newest_state_then_the_next_event(
    client: Client, settings: Settings
) -> None:
    await send_event(client, settings, "transaction_new", txn("T1", version=1))
    await send_event(client, settings, "transaction_new", txn("T2", version=1))
    await send_event(client, settings, "transaction_new", txn("T3", version=1))
    await send_event(client, settings, "transaction_update", txn("T1", status="approved", version=2))
    await send_event(client, settings, "stage_change", txn("T1", status="approved", stage="done", version=3))
    await send_event(client, settings, "transaction_delete", txn("T2", version=2))

    ws = await connect(client, token_for(settings, customers=["C1"]))
    ack = await subscribe(ws, filters={"customerId": "C1"}, snapshot=True)
    assert (ack["type"], ack["snapshot"], ack["position"]["offset"]) == ("subscribed", True, 6)
    position, transactions = await read_snapshot(ws)
    assert position == ack["position"]
    assert sorted(transactions, key=lambda t: t["id"]) == [
        txn("T1", status="approved", stage="done", version=3),
        txn("T3", version=1),
    ]

    await send_event(client, settings, "transaction_update", txn("T3", status="approved", version=2))
    event = await receive_json(ws)
    assert (event["type"], event["offset"], event["epoch"]) == ("transaction_update", 7, position["epoch"])

    # The filters apply to the snapshot as to the events.
    narrow = await connect(client, token_for(settings, customers=["C1"]))
    await subscribe(narrow, filters={"customerId": "C1", "transactionIds": ["T1"]}, snapshot=True)
    _, only = await read_snapshot(narrow)
    assert [t["id"] for t in only] == ["T1"]


async def test_a_snapshot_of_a_customer_the_token_does_not_allow_is_forbidden(
    client: Client, settings: Settings
) -> None:
    await send_event(client, settings, "transaction_new", txn("T1", customer="C2"))
    ws = await connect(client, token_for(settings, customers=["C1"]))
    reply = await subscribe(ws, filters={"customerId": "C2"}, snapshot=True)
    assert (reply["type"], reply["code"]) == ("error", ErrorCode.FORBIDDEN.value)


async def test_snapshots_taken_while_events_are_published_are_followed_by_no_gap_and_no_duplicate(
    client: Client, settings: Settings, broker: Broker
) -> None:
    rng = random.Random(16)
    ids = [f"T{n}" for n in range(6)]
    total = 120

    async def publish_all() -> None:
        for version in range(1, total + 1):
            kind = rng.choice(["transaction_update", "transaction_update", "transaction_new", "transaction_delete"])
            await broker.publish(
                "transactions:C1",
                b'{"type":"%s","data":{"id":"%s","customerId":"C1","version":%d},'
                b'"timestamp":"2026-12-01T00:00:00.000Z","correlationId":"c"}'
                % (kind.encode(), rng.choice(ids).encode(), version),
            )
            if version % 10 == 0:
                await asyncio.sleep(0.005)

    async def watch(delay_s: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[tuple[int, str]]]:
        """Subscribe with a snapshot mid-stream; apply every event after it until the last one."""
        await asyncio.sleep(delay_s)
        ws = await connect(client, token_for(settings, customers=["C1"]))
        await subscribe(ws, filters={"customerId": "C1"}, snapshot=True)
        position, transactions = await read_snapshot(ws)
        state = {t["id"]: t for t in transactions}
        received: list[tuple[int, str]] = []
        while position["offset"] < total and (not received or received[-1][0] < total):
            event = await receive_json(ws)
            received.append((event["offset"], event["data"]["id"]))
            if event["type"] == "transaction_delete":
                state.pop(event["data"]["id"], None)
            else:
                state[event["data"]["id"]] = event["data"]
        await ws.close()
        return position, state, received

    results = await asyncio.gather(publish_all(), *(watch(rng.uniform(0, 0.3)) for _ in range(8)))
    final = await broker.snapshot("transactions:C1")
    expected = {t["id"]: t for t in (orjson.loads(p)["data"] for p in final.payloads)}
    history = await broker.history("transactions:C1", Position(0, final.position.epoch))
    published = {e.offset: orjson.loads(e.payload) for e in history.envelopes}
    for position, state, received in results[1:]:
        assert state == expected, position
        offsets = [offset for offset, _ in received]
        # The events after the snapshot's position, each once, in order...
        assert offsets == sorted(set(offsets))
        assert all(offset > position["offset"] for offset in offsets)
        # ...every one of them, except updates a newer update of the same transaction superseded
        # in a busy send queue (conflation, docs/protocol.md).
        for missing in set(range(position["offset"] + 1, total + 1)) - set(offsets):
            event = published[missing]
            assert event["type"] == "transaction_update", (position, missing)
            assert any(o > missing and i == event["data"]["id"] for o, i in received), (position, missing)


async def test_after_the_store_lost_its_data_a_snapshot_subscriber_gets_a_resync_with_a_fresh_snapshot(
    client: Client, settings: Settings, store: Store
) -> None:
    if not store.shared:
        pytest.skip("the embedded broker loses its data only with its process")
    await send_event(client, settings, "transaction_new", txn("T1"))
    ws = await connect(client, token_for(settings, customers=["C1"]))
    await subscribe(ws, filters={"customerId": "C1"}, snapshot=True)
    before, _ = await read_snapshot(ws)
    if store.topology == "redis":
        store.down()  # without persistence: it comes back empty
        store.up()
    else:
        store.cli("FLUSHALL")

    async def published_after_the_loss() -> bool:
        response = await publish(client, settings, {"type": "transaction_new", "data": txn("T2")})
        return response.status == 202

    await eventually(published_after_the_loss, "the store never took a publish again")
    resync = await receive_json(ws, timeout_s=30)
    assert resync["type"] == "resync"
    assert resync["position"]["epoch"] != before["epoch"]
    position, transactions = await read_snapshot(ws)
    assert position == resync["position"]
    assert [t["id"] for t in transactions] == ["T2"]
    await send_event(client, settings, "transaction_update", txn("T2", status="approved"))
    event = await receive_json(ws)
    assert (event["offset"], event["epoch"]) == (position["offset"] + 1, position["epoch"])


async def test_a_snapshot_costs_its_size_in_rate_budget(aiohttp_client: Any, store: Store) -> None:
    if store.shared:
        pytest.skip("the charge does not depend on the broker")
    # Almost no refill: only what is sent and read moves the bucket (burst 40).
    settings = make_settings(rate_limit_per_s="0.1")
    client: Client = await aiohttp_client(create_app(settings))
    events = [{"type": "transaction_new", "data": txn(f"T{i}")} for i in range(1000)]
    for start in range(0, 1000, 100):
        response = await publish(client, settings, {"events": events[start : start + 100]})
        assert response.status == 202
    ws = await connect(client, token_for(settings, customers=["C1"]))
    await subscribe(ws, filters={"customerId": "C1"}, snapshot=True)
    _, transactions = await read_snapshot(ws)
    assert len(transactions) == 1000
    # 1,000 transactions cost 40 messages: the whole burst.
    await ws.send_json({"type": "ping"})
    reply = await receive_json(ws)
    assert (reply["type"], reply["code"]) == ("error", ErrorCode.RATE_LIMITED.value)


async def test_the_http_snapshot_is_the_websocket_one_and_a_subscribe_since_its_position_continues_it(
    client: Client, settings: Settings
) -> None:
    await send_event(client, settings, "transaction_new", txn("T1", version=1))
    await send_event(client, settings, "transaction_update", txn("T1", status="approved", version=2))
    await send_event(client, settings, "transaction_new", txn("T2", version=1))
    token = token_for(settings, customers=["C1"])
    async with client.get("/api/v1/transactions/C1", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
        page = await response.json()
    ws = await connect(client, token)
    await subscribe(ws, filters={"customerId": "C1"}, snapshot=True)
    position, transactions = await read_snapshot(ws)
    assert page["position"] == position
    assert sorted(page["transactions"], key=lambda t: t["id"]) == sorted(transactions, key=lambda t: t["id"])
    assert page["subscription"] == "transactions:C1"

    rendered = await connect(client, token)
    ack = await subscribe(rendered, filters={"customerId": "C1"}, since=page["position"])
    assert (ack["recovered"], ack["replayed"]) == (True, 0)
    await send_event(client, settings, "transaction_delete", txn("T2", version=2))
    event = await receive_json(rendered)
    assert (event["type"], event["offset"]) == ("transaction_delete", page["position"]["offset"] + 1)


async def test_an_older_version_published_after_a_newer_one_is_not_sent_live_nor_after_a_snapshot(
    client: Client, settings: Settings
) -> None:
    live = await connect(client, token_for(settings, customers=["C1"]))
    await subscribe(live, filters={"customerId": "C1"})
    await send_event(client, settings, "transaction_update", txn("T1", status="newer", version=2))
    await send_event(client, settings, "transaction_update", txn("T1", status="older", version=1))
    await send_event(client, settings, "transaction_update", txn("T2", status="second", version=1))
    first, second = await receive_json(live), await receive_json(live)
    assert [(e["offset"], e["data"]["status"]) for e in (first, second)] == [(1, "newer"), (3, "second")]

    watcher = await connect(client, token_for(settings, customers=["C1"]))
    await subscribe(watcher, filters={"customerId": "C1"}, snapshot=True)
    _, transactions = await read_snapshot(watcher)
    assert {t["id"]: t["status"] for t in transactions} == {"T1": "newer", "T2": "second"}
    await send_event(client, settings, "transaction_update", txn("T1", status="stale", version=1))
    await send_event(client, settings, "transaction_update", txn("T1", status="newest", version=3))
    event = await receive_json(watcher)
    assert (event["offset"], event["data"]["status"]) == (5, "newest")
    resumed = await connect(client, token_for(settings, customers=["C1"]))
    ack = await subscribe(resumed, filters={"customerId": "C1"}, since={"offset": 0, "epoch": first["epoch"]})
    assert ack["recovered"] is True
    # The replay skips the older versions; its updates of T1 may be conflated to the newest.
    assert ack["replayed"] == 3
    replayed = [await receive_json(resumed)]
    while replayed[-1]["offset"] < 5:
        replayed.append(await receive_json(resumed))
    assert {e["data"]["status"] for e in replayed} <= {"newer", "second", "newest"}
    assert [e["data"]["status"] for e in replayed][-2:] == ["second", "newest"]
