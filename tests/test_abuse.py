"""Abusive clients get a named error or close, memory stays bounded, and a control client keeps its events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from fleet.waiting import eventually
from service.app import create_app
from service.protocol import CloseCode
from service.server import server_options
from service.websocket import MAX_FRAGMENTS
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
from tests.rawws import OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, frame, upgrade_request


class Control:
    """A well-behaved client next to the abuser: it must keep receiving every event."""

    def __init__(self, client: Any, settings: Any, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.client, self.settings, self.ws = client, settings, ws
        self.sent = 0

    @classmethod
    async def join(cls, client: Any, settings: Any) -> Control:
        ws = await connect(client, token_for(settings, sub="control", customers=["CTRL"]))
        assert (await subscribe(ws))["type"] == "subscribed"
        return cls(client, settings, ws)

    async def assert_delivery(self, count: int = 3) -> None:
        for _ in range(count):
            self.sent += 1
            txn_id = f"T{self.sent}"
            response = await publish(
                self.client, self.settings, {"type": "transaction_new", "data": txn(txn_id, "CTRL")}
            )
            assert response.status == 202
            event = await receive_json(self.ws, timeout_s=10)
            assert (event["type"], event["data"]["id"]) == ("transaction_new", txn_id)


async def _raw(client: Any, settings: Any, sub: str = "abuser") -> RawWebSocket:
    ws = await RawWebSocket.open(client.host, client.port, f"/ws/transactions?token={token_for(settings, sub=sub)}")
    assert ws.status == 101
    return ws


async def _metrics(client: Any) -> str:
    return await (await client.get("/metrics")).text()


# -- floods ---------------------------------------------------------------------------


async def test_message_flood_is_closed_with_1008_while_the_control_client_gets_every_event(app_client):
    settings = make_settings(rate_limit_per_s="5", rate_limit_burst="10", rate_limit_max_violations="50")
    client = await app_client(settings)
    control = await Control.join(client, settings)
    flooder = await connect(client, token_for(settings, sub="flooder"))

    async def flood() -> None:
        try:
            for i in range(5000):
                await flooder.send_str('{"type":"ping"}')
                if i % 100 == 0:
                    await asyncio.sleep(0)
        except ConnectionError:
            return

    # Read while flooding: the server aborts a socket that does not answer its close in time.
    closed = asyncio.ensure_future(wait_closed(flooder, timeout_s=30))
    flooding = asyncio.ensure_future(flood())
    await control.assert_delivery(5)
    assert await closed == CloseCode.POLICY_VIOLATION
    await flooding
    await control.assert_delivery(2)


async def test_websocket_ping_flood_counts_against_the_rate_limit_and_closes_1008(app_client):
    settings = make_settings(rate_limit_per_s="1", rate_limit_burst="5", rate_limit_max_violations="10")
    client = await app_client(settings)
    control = await Control.join(client, settings)
    raw = await _raw(client, settings)
    sent = 300
    await raw.send(b"".join(frame(OP_PING, b"p") for _ in range(sent)))
    pongs = 0
    while (received := await raw.read_frame()) is not None:
        if received.opcode == OP_PONG:
            pongs += 1
        elif received.opcode != OP_TEXT:
            break
    assert received is not None
    assert received.close_code == CloseCode.POLICY_VIOLATION
    # Only the burst (plus what the refill allowed) was answered; the rest was refused.
    assert 5 <= pongs < sent
    await control.assert_delivery()
    await raw.aclose()


async def test_client_that_pings_without_reading_pongs_is_bounded(app_client):
    # Pongs are written from the read loop: a client that never reads stalls its own reads,
    # so the pod holds at most a socket buffer of pongs for it, never an unbounded backlog.
    settings = make_settings(rate_limit_per_s="100000", rate_limit_burst="100000")
    client = await app_client(settings)
    control = await Control.join(client, settings)
    raw = await _raw(client, settings)
    raw.writer.transport.set_write_buffer_limits(high=64 * 1024)
    ping = frame(OP_PING, b"x" * 125)

    async def ping_until_blocked() -> int:
        sent = 0
        while True:
            raw.writer.write(ping)
            sent += 1
            if sent % 1000 == 0:
                await raw.writer.drain()
            if sent >= 200_000:
                return sent

    # The server stops reading once its pong writes block, so our sends block too.
    task = asyncio.ensure_future(ping_until_blocked())
    await control.assert_delivery()
    done, _ = await asyncio.wait({task}, timeout=3)
    assert not done, "every ping was accepted although no pong was read: the backlog is unbounded"
    await control.assert_delivery()
    task.cancel()
    await raw.aclose()


# -- sizes and fragments -----------------------------------------------------------------


@pytest.mark.parametrize(("extra", "closed"), [(-1, False), (0, True), (1, True)])
async def test_frame_size_limit_boundary(app_client, extra, closed):
    # aiohttp refuses a message of exactly max_msg_size: the largest accepted is one byte less.
    settings = make_settings(max_message_bytes="1024")
    client = await app_client(settings)
    raw = await _raw(client, settings)
    prefix = b'{"type":"ping","correlationId":"'
    padding = 1024 + extra - len(prefix) - 2
    await raw.send(frame(OP_TEXT, prefix + b"x" * padding + b'"}'))
    if closed:
        assert await raw.read_close_code() == CloseCode.MESSAGE_TOO_BIG
    else:
        received = await raw.read_frame()
        assert received is not None
        assert json.loads(received.payload)["code"] == "invalid_message"  # correlationId too long
    await raw.aclose()


async def test_declared_length_of_2_pow_63_is_closed_with_1009_without_buffering(app_client):
    settings = make_settings()
    client = await app_client(settings)
    control = await Control.join(client, settings)
    raw = await _raw(client, settings)
    await raw.send(frame(OP_TEXT, b"", declared_length=2**63 - 1))
    assert await raw.read_close_code() == CloseCode.MESSAGE_TOO_BIG
    await control.assert_delivery()


async def test_endless_continuation_fragments_hit_the_message_limit_and_close_1009(app_client):
    settings = make_settings(max_message_bytes="4096")
    client = await app_client(settings)
    control = await Control.join(client, settings)
    raw = await _raw(client, settings)
    await raw.send(frame(OP_TEXT, b"{", fin=False))
    try:
        for _ in range(20):
            await raw.send(b"".join(frame(OP_CONT, b" ", fin=False) for _ in range(1000)))
    except ConnectionError:
        pass
    assert await raw.read_close_code() == CloseCode.MESSAGE_TOO_BIG
    await control.assert_delivery()


async def test_endless_empty_continuation_fragments_are_closed_with_1009(app_client):
    settings = make_settings()
    client = await app_client(settings)
    control = await Control.join(client, settings)
    raw = await _raw(client, settings)
    await raw.send(frame(OP_TEXT, b'{"type":', fin=False))
    try:
        for _ in range(5):
            await raw.send(b"".join(frame(OP_CONT, b"", fin=False) for _ in range(1000)))
    except ConnectionError:
        pass
    assert await raw.read_close_code() == CloseCode.MESSAGE_TOO_BIG
    await control.assert_delivery()


async def test_a_message_in_many_fragments_below_the_cap_completes(app_client):
    settings = make_settings()
    client = await app_client(settings)
    raw = await _raw(client, settings)
    await raw.send(frame(OP_TEXT, b'{"type":', fin=False))
    await raw.send(b"".join(frame(OP_CONT, b" ", fin=False) for _ in range(MAX_FRAGMENTS - 1)))
    await raw.send(frame(OP_CONT, b'"ping"}'))
    received = await raw.read_frame()
    assert received is not None
    assert json.loads(received.payload)["type"] == "pong"


# -- JSON and schema abuse --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[" * 5000 + "]" * 5000, "invalid_json"),
        ('{"a":' * 3000 + "1" + "}" * 3000, "invalid_json"),
        ('{"type":"subscribe","channel":"transactions","filters":{"customerId":' + "[" * 500 + "]" * 500 + "}}", None),
        ('{"type":"subscribe","channel":"transactions","filters":{"transactionIds":[' + '"t",' * 5000 + '"t"]}}', None),
        ('{"type":"ping","timestamp":' + "9" * 5000 + "}", None),
        ('{"type":"ping","timestamp":1e99999}', None),
        ('{"type":"ping","correlationId":"\\ud800"}', None),
        ('{"type":"ping","type":"subscribe"}', None),
        ("\ufeff{}", None),
        ("", "invalid_json"),
        ("null", "invalid_message"),
        ('"' + "x" * 60_000 + '"', "invalid_message"),
    ],
)
async def test_hostile_json_gets_a_named_error_and_the_socket_stays(app_client, text, code):
    settings = make_settings()
    client = await app_client(settings)
    control = await Control.join(client, settings)
    ws = await connect(client, token_for(settings))
    await ws.send_str(text)
    reply = await receive_json(ws)
    if reply["type"] == "error":
        assert reply["code"] in {"invalid_json", "invalid_message", "invalid_filters", "unknown_type"}
        assert code is None or reply["code"] == code
    await ws.send_json({"type": "ping", "correlationId": "alive"})
    assert (await receive_type(ws, "pong"))["correlationId"] == "alive"
    await control.assert_delivery(1)


@pytest.mark.parametrize(
    "filters",
    [
        {"customerId": "C1\n"},
        {"customerId": "C1\x00"},
        {"customerId": "C1\r\nPUBLISH x"},
        {"customerId": "C*"},
        {"customerId": "C?"},
        {"customerId": "C[12]"},
        {"customerId": "\u0421" + "1"},  # a Cyrillic Es that looks like C
        {"customerId": " C1"},
        {"customerId": ""},
        {"customerId": "x" * 129},
        {"userId": "*"},
        {"transactionIds": ["T1", "T\x00"]},
        {"transactionIds": ["T*"]},
        {"transactionIds": [f"T{i}" for i in range(101)]},
        {"transactionIds": [["T1"]]},
    ],
)
async def test_ids_with_wildcards_or_control_characters_are_refused(app_client, filters):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, roles=["admin"]))
    reply = await subscribe(ws, filters=filters)
    assert (reply["type"], reply["code"]) == ("error", "invalid_filters")


@pytest.mark.parametrize("channel", ["transactions\x00", "Transactions", "transactions*", "transactions:C2", "*", ""])
async def test_channel_names_outside_the_list_are_refused(app_client, channel):
    settings = make_settings()
    client = await app_client(settings)
    ws = await connect(client, token_for(settings))
    assert (await subscribe(ws, channel))["code"] == "unknown_channel"


async def test_thousands_of_subscriptions_stop_at_the_cap(app_client):
    settings = make_settings(max_subscriptions="128", rate_limit_per_s="100000", rate_limit_burst="100000")
    client = await app_client(settings)
    ws = await connect(client, token_for(settings, roles=["admin"]))
    replies = []
    for batch in range(0, 2000, 50):
        for i in range(batch, batch + 50):
            await ws.send_json({"type": "subscribe", "channel": "transactions", "filters": {"customerId": f"C{i}"}})
        replies += [await receive_json(ws) for _ in range(50)]
    assert sum(r["type"] == "subscribed" for r in replies) == 128
    assert {r["code"] for r in replies if r["type"] == "error"} == {"too_many_subscriptions"}
    await ws.send_json({"type": "ping"})
    assert (await receive_json(ws))["type"] == "pong"


# -- connection caps -----------------------------------------------------------------------


async def _upgrade(client: Any, token: str, headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    return await client.get(
        f"/ws/transactions?token={token}",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        },
    )


async def test_connections_per_user_are_capped_with_429_before_the_upgrade(app_client):
    settings = make_settings(max_connections_per_user="2")
    client = await app_client(settings)
    token = token_for(settings, sub="alice")
    first = await connect(client, token)
    await connect(client, token)
    refused = await _upgrade(client, token)
    assert refused.status == 429
    assert refused.headers["Retry-After"]
    assert (await refused.json())["error"] == "too_many_connections"
    # Another user is not affected, and a closed socket frees its slot.
    await connect(client, token_for(settings, sub="bob"))
    await first.close()

    async def slot_free() -> bool:
        response = await _upgrade(client, token)
        response.close()
        return response.status == 101

    await eventually(slot_free, "the closed socket to release its slot")
    text = await _metrics(client)
    assert metric_value(text, 'eva_ws_handshakes_rejected_total{reason="user_connection_limit"}') >= 1


async def test_connections_per_ip_are_capped_and_rejected_ones_hold_no_slot(app_client):
    settings = make_settings(max_connections_per_ip="3")
    client = await app_client(settings)
    for user in ("a", "b", "c"):
        await connect(client, token_for(settings, sub=user))
    for _ in range(5):
        assert (await _upgrade(client, token_for(settings, sub="d"))).status == 429
    # Bad tokens from the same address are refused for the cap, before any signature check.
    assert (await _upgrade(client, "garbage")).status == 429


async def test_failed_handshakes_release_their_slots(app_client):
    settings = make_settings(max_connections_per_user="1", max_connections_per_ip="1")
    client = await app_client(settings)
    for _ in range(5):
        assert (await _upgrade(client, "garbage")).status == 401
        assert (await _upgrade(client, token_for(settings), {"Sec-WebSocket-Version": "8"})).status == 426
        assert (await _upgrade(client, token_for(settings), {"Sec-WebSocket-Key": "c2hvcnQ="})).status == 400
    ws = await connect(client, token_for(settings))
    assert (await subscribe(ws))["type"] == "subscribed"


async def test_client_ip_comes_from_the_last_forwarded_entry(app_client):
    settings = make_settings(max_connections_per_ip="1", client_ip_header="X-Forwarded-For")
    client = await app_client(settings)
    token = token_for(settings)
    ws = await client.ws_connect(f"/ws/transactions?token={token}", headers={"X-Forwarded-For": "1.1.1.1, 10.0.0.1"})
    assert not ws.closed
    # Same last hop: the forged first entry does not buy a new slot.
    assert (await _upgrade(client, token, {"X-Forwarded-For": "9.9.9.9, 10.0.0.1"})).status == 429
    other = await client.ws_connect(f"/ws/transactions?token={token}", headers={"X-Forwarded-For": "10.0.0.2"})
    assert not other.closed


# -- slow and silent clients ------------------------------------------------------------------


@pytest.fixture
async def hardened_client(aiohttp_server, aiohttp_client):
    """The app with the same aiohttp server options as `eva-ws serve`."""

    async def start(**overrides: str) -> Any:
        settings = make_settings(**overrides)
        server = await aiohttp_server(create_app(settings), **server_options(settings))
        return await aiohttp_client(server), settings

    return start


async def test_slowloris_handshake_is_cut_off(hardened_client):
    client, settings = await hardened_client(handshake_timeout_s="1")
    control = await Control.join(client, settings)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    request = upgrade_request(f"/ws/transactions?token={token_for(settings)}")
    cut_off_at = None
    for index in range(len(request)):
        try:
            writer.write(request[index : index + 1])
            await writer.drain()
        except ConnectionError:
            cut_off_at = index
            break
        try:
            if await asyncio.wait_for(reader.read(1024), 0.2) == b"":
                cut_off_at = index
                break
        except TimeoutError:
            continue
    assert cut_off_at is not None, "the trickled request was never cut off"
    assert cut_off_at < len(request) - 1
    writer.close()
    await control.assert_delivery()


async def test_socket_that_never_answers_pings_is_closed_by_the_heartbeat(app_client):
    settings = make_settings(heartbeat_s="1")
    client = await app_client(settings)
    raw = await _raw(client, settings)
    pinged = False
    while (received := await raw.read_frame(timeout_s=20)) is not None:
        pinged = pinged or received.opcode == OP_PING
    assert pinged
    # A client that reads, so aiohttp's client answers the pings, outlives several heartbeats.
    alive = await connect(client, token_for(settings, sub="alive"))
    reading = asyncio.ensure_future(receive_json(alive, timeout_s=20))
    await asyncio.sleep(3)
    await alive.send_json({"type": "ping"})
    assert (await reading)["type"] == "pong"

    async def counted() -> bool:
        return metric_value(await _metrics(client), 'eva_ws_disconnects_total{reason="abnormal"}') >= 1

    await eventually(counted, "the missed heartbeat to be counted")


async def test_trickled_publish_body_is_cut_off_with_408(hardened_client):
    client, settings = await hardened_client(handshake_timeout_s="1")
    token = token_for(settings, sub="backend", customers=[], roles=["publisher"])
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        (
            f"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert head.split(b" ", 2)[1] == b"408"
    writer.close()
