"""The WebSocket protocol end to end, through the real app on a real socket."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from fleet.waiting import eventually
from service.protocol import CloseCode
from tests.conftest import (
    connect,
    make_settings,
    metric_value,
    publish,
    receive_json,
    receive_type,
    subscribe,
    token_for,
    txn,
    wait_closed,
)


async def test_subscriber_receives_published_event_with_offset_and_correlation_id(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    ack = await subscribe(ws, filters={"customerId": "C1"}, correlationId="req-1")
    assert ack["type"] == "subscribed"
    assert ack["subscription"] == "transactions:C1"
    assert ack["correlationId"] == "req-1"
    assert ack["position"]["offset"] == 0

    response = await publish(client, settings, {"type": "transaction_update", "data": txn(changedFields=["status"])})
    assert response.status == 202
    published = await response.json()

    event = await receive_type(ws, "transaction_update")
    assert event["data"]["id"] == "T1"
    assert event["offset"] == 1
    assert event["epoch"] == ack["position"]["epoch"]
    assert event["correlationId"] == published["correlationId"]
    assert event["timestamp"].endswith("Z")
    assert event["channel"] == "transactions"


async def test_customer_id_defaults_to_the_tokens_only_customer(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, customers=["C7"]))
    ack = await subscribe(ws)
    assert ack["subscription"] == "transactions:C7"


async def test_events_never_reach_another_customer(app_client):
    settings = make_settings()
    client = await app_client(settings)
    alice = await connect(client, token_for(settings, sub="alice", customers=["C1"]))
    bob = await connect(client, token_for(settings, sub="bob", customers=["C2"]))
    await subscribe(alice)
    await subscribe(bob)
    for i in range(5):
        await publish(client, settings, {"type": "transaction_new", "data": txn(f"A{i}", "C1")})
        await publish(client, settings, {"type": "transaction_new", "data": txn(f"B{i}", "C2")})
    alice_ids = [(await receive_json(alice))["data"]["id"] for _ in range(5)]
    bob_ids = [(await receive_json(bob))["data"]["id"] for _ in range(5)]
    assert alice_ids == [f"A{i}" for i in range(5)]
    assert bob_ids == [f"B{i}" for i in range(5)]
    # Nothing else is waiting for either of them.
    await alice.send_json({"type": "ping"})
    await bob.send_json({"type": "ping"})
    assert (await receive_json(alice))["type"] == "pong"
    assert (await receive_json(bob))["type"] == "pong"


async def test_subscribing_to_another_customer_is_forbidden_and_connection_stays_usable(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, customers=["C1"]))
    error = await subscribe(ws, filters={"customerId": "C2"}, correlationId="x")
    assert error["type"] == "error"
    assert error["code"] == "forbidden"
    assert error["correlationId"] == "x"
    assert (await subscribe(ws, filters={"customerId": "C1"}))["type"] == "subscribed"


async def test_admin_may_subscribe_to_any_customer_and_user(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="root", customers=[], roles=["admin"]))
    assert (await subscribe(ws, filters={"customerId": "C9"}))["type"] == "subscribed"
    assert (await subscribe(ws, "user_updates", filters={"userId": "someone"}))["type"] == "subscribed"


async def test_user_channels_carry_only_the_users_own_events(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="alice"))
    assert (await subscribe(ws, "notifications"))["subscription"] == "notifications:alice"
    assert (await subscribe(ws, "user_updates", filters={"userId": "bob"}))["code"] == "forbidden"
    await publish(
        client, settings, {"type": "notification", "channel": "notifications", "userId": "bob", "data": {"text": "b"}}
    )
    await publish(
        client, settings, {"type": "notification", "channel": "notifications", "userId": "alice", "data": {"text": "a"}}
    )
    event = await receive_type(ws, "notification")
    assert event["data"] == {"text": "a"}
    assert event["subscription"] == "notifications:alice"


async def test_transaction_ids_and_user_filters_apply_within_the_channel(app_client):
    settings = make_settings()
    client = await app_client(settings)
    by_id = await connect(client, token_for(settings))
    by_user = await connect(client, token_for(settings))
    await subscribe(by_id, filters={"customerId": "C1", "transactionIds": ["T2"]})
    await subscribe(by_user, filters={"customerId": "C1", "userId": "carol"})
    await publish(client, settings, {"type": "transaction_update", "data": txn("T1", updatedBy="dave")})
    await publish(client, settings, {"type": "transaction_update", "data": txn("T2", updatedBy="dave")})
    await publish(client, settings, {"type": "stage_change", "data": txn("T3", updatedBy="carol")})
    assert (await receive_json(by_id))["data"]["id"] == "T2"
    assert (await receive_json(by_user))["data"]["id"] == "T3"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('{"type": 5}', "invalid_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "subscribe", "channel": "secrets"}', "unknown_channel"),
        ('{"type": "subscribe", "channel": "transactions", "filters": {"customerId": 1}}', "invalid_filters"),
        ('{"type": "subscribe", "channel": "transactions", "filters": {"colour": "red"}}', "invalid_filters"),
        ('{"type": "subscribe", "channel": "transactions", "filters": {"customerId": "C*"}}', "invalid_filters"),
        (
            '{"type": "subscribe", "channel": "transactions", "filters": {"customerId": "' + "x" * 200 + '"}}',
            "invalid_filters",
        ),
        ('{"type": "subscribe", "channel": "transactions", "filters": {"transactionIds": "T1"}}', "invalid_filters"),
        ('{"type": "subscribe", "channel": "transactions", "since": {"offset": -1, "epoch": "e"}}', "invalid_message"),
        ('{"type": "ping", "extra": true}', "invalid_message"),
        ('{"type": "unsubscribe", "channel": "transactions", "filters": {"customerId": "C1"}}', "not_subscribed"),
        ('{"type": "subscribe", "channel": "notifications", "filters": {"customerId": "C1"}}', "invalid_filters"),
    ],
)
async def test_bad_messages_get_a_named_error_and_the_connection_stays_up(app_client, frame, code):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await ws.send_str(frame)
    error = await receive_type(ws, "error")
    assert error["code"] == code
    assert error["message"]
    await ws.send_json({"type": "ping", "correlationId": "still-there"})
    assert (await receive_type(ws, "pong"))["correlationId"] == "still-there"


async def test_binary_frame_gets_an_error(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await ws.send_bytes(b"\x00\x01")
    assert (await receive_type(ws, "error"))["code"] == "binary_not_supported"


async def test_duplicate_subscribe_and_unsubscribe_round_trip(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await subscribe(ws)
    assert (await subscribe(ws, filters={"customerId": "C1"}))["code"] == "already_subscribed"
    await ws.send_json({"type": "unsubscribe", "channel": "transactions", "correlationId": "u"})
    ack = await receive_type(ws, "unsubscribed")
    assert ack["subscription"] == "transactions:C1"
    assert ack["correlationId"] == "u"
    await publish(client, settings, {"type": "transaction_new", "data": txn()})
    await ws.send_json({"type": "ping"})
    assert (await receive_json(ws))["type"] == "pong"  # the event did not arrive


async def test_subscription_cap_is_enforced(app_client):
    settings = make_settings(max_subscriptions="2")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, customers=["C1", "C2", "C3"]))
    for customer in ("C1", "C2"):
        assert (await subscribe(ws, filters={"customerId": customer}))["type"] == "subscribed"
    assert (await subscribe(ws, filters={"customerId": "C3"}))["code"] == "too_many_subscriptions"


async def test_message_flood_is_rate_limited_then_closed_with_1008(app_client):
    settings = make_settings(rate_limit_per_s="1", rate_limit_burst="5", rate_limit_max_violations="10")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    for _ in range(40):
        await ws.send_json({"type": "ping"})
    kinds = []
    while True:
        message = await ws.receive(timeout=5)
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
        kinds.append(message.json()["code"] if message.json()["type"] == "error" else "pong")
    assert kinds[:5] == ["pong"] * 5
    assert "rate_limited" in kinds
    assert ws.close_code == CloseCode.POLICY_VIOLATION


async def test_frame_above_the_limit_closes_with_1009(app_client):
    settings = make_settings(max_message_bytes="1024")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    await ws.send_str('{"type": "ping", "correlationId": "' + "x" * 2000 + '"}')
    assert await wait_closed(ws) == CloseCode.MESSAGE_TOO_BIG


async def test_slow_consumer_is_closed_with_4008_while_a_fast_one_keeps_receiving(app_client):
    settings = make_settings(send_queue_size="8")
    client = await app_client(settings)
    token = token_for(settings)
    fast = await connect(client, token)
    await subscribe(fast)

    # A raw client with a tiny receive buffer that never reads after the handshake.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.host, client.port))
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    subscribe_frame = _masked_text_frame(b'{"type":"subscribe","channel":"transactions"}')
    request = (
        f"GET /ws/transactions?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    await loop.sock_sendall(sock, request)
    handshake = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
    assert b" 101 " in handshake
    await loop.sock_sendall(sock, subscribe_frame)
    await asyncio.sleep(0.2)

    slow_closed = 'eva_ws_disconnects_total{reason="slow_consumer"}'
    before = metric_value(await (await client.get("/metrics")).text(), slow_closed)
    big = "x" * 30_000
    delivered = 0
    for i in range(300):
        await publish(client, settings, {"type": "transaction_new", "data": txn(f"T{i}", blob=big)})
        event = await receive_json(fast)
        assert event["data"]["id"] == f"T{i}"
        delivered += 1
    assert delivered == 300

    async def slow_one_closed() -> bool:
        return metric_value(await (await client.get("/metrics")).text(), slow_closed) == before + 1

    await eventually(slow_one_closed, "the slow consumer to be closed")
    sock.close()


def _masked_text_frame(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def test_resume_replays_missed_events_in_order_without_duplicates(app_client):
    settings = make_settings()
    client = await app_client(settings)
    token = token_for(settings)
    ws = await connect(client, token)
    ack = await subscribe(ws)
    for i in range(3):
        await publish(client, settings, {"type": "transaction_new", "data": txn(f"T{i}")})
    seen = [await receive_json(ws) for _ in range(3)]
    last = {"offset": seen[-1]["offset"], "epoch": ack["position"]["epoch"]}
    await ws.close()

    for i in range(3, 7):
        await publish(client, settings, {"type": "transaction_new", "data": txn(f"T{i}")})
    again = await client.ws_connect(f"/ws/transactions?token={token}&reconnect=1")
    await again.send_json({"type": "subscribe", "channel": "transactions", "since": last})
    resumed = await receive_type(again, "subscribed")
    assert resumed["recovered"] is True
    assert resumed["replayed"] == 4
    assert resumed["position"] == last
    replayed = [await receive_json(again) for _ in range(4)]
    assert [e["data"]["id"] for e in replayed] == ["T3", "T4", "T5", "T6"]
    assert [e["offset"] for e in replayed] == [4, 5, 6, 7]
    await publish(client, settings, {"type": "transaction_new", "data": txn("T7")})
    assert (await receive_json(again))["offset"] == 8


async def test_resume_from_before_the_history_window_says_not_recovered(app_client):
    settings = make_settings(history_size="3")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    ack = await subscribe(ws)
    for i in range(10):
        await publish(client, settings, {"type": "transaction_new", "data": txn(f"T{i}")})
    other = await connect(client, token_for(settings))
    since = {"offset": 1, "epoch": ack["position"]["epoch"]}
    resumed = await subscribe(other, since=since)
    assert resumed["recovered"] is False
    # Lost: 2 to 7. The position is where the replay of what history holds starts.
    assert resumed["position"]["offset"] == 7
    assert resumed["replayed"] == 3
    assert [(await receive_json(other))["offset"] for _ in range(3)] == [8, 9, 10]
    stale_epoch = await connect(client, token_for(settings))
    resumed = await subscribe(stale_epoch, since={"offset": 9, "epoch": "another-epoch"})
    assert resumed["recovered"] is False


async def test_expired_token_on_open_socket_asks_for_refresh_then_closes_4001(app_client):
    settings = make_settings(jwt_leeway_s="0", token_refresh_grace_s="1")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, ttl_s=1))
    notice = await receive_type(ws, "error", timeout_s=5)
    assert notice["code"] == "token_expiring"
    assert await wait_closed(ws) == CloseCode.TOKEN_EXPIRED


async def test_in_band_refresh_keeps_the_connection_open(app_client):
    settings = make_settings(jwt_leeway_s="0", token_refresh_grace_s="2")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, sub="alice", ttl_s=1))
    await subscribe(ws)
    assert (await receive_type(ws, "error", timeout_s=5))["code"] == "token_expiring"
    await ws.send_json({"type": "refresh", "token": token_for(settings, sub="mallory")})
    assert (await receive_type(ws, "error"))["code"] == "invalid_token"
    await ws.send_json({"type": "refresh", "token": token_for(settings, sub="alice", ttl_s=600)})
    assert (await receive_type(ws, "refreshed"))["expiresAt"].endswith("Z")
    await asyncio.sleep(2.5)  # past the old grace period
    await publish(client, settings, {"type": "transaction_new", "data": txn()})
    assert (await receive_json(ws))["type"] == "transaction_new"
