"""A resume costs what it reads: Redis sends at most the history window, and replayed events use up the rate limit."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from service.broker.base import Position
from service.protocol import CloseCode
from tests.conftest import AppClient, connect, make_settings, publish, receive_json, token_for, txn, wait_closed
from tests.test_broker_redis import redis_factory

PAYLOAD_BYTES = 1000
WINDOW = 100


async def _bytes_sent(raw: Redis) -> int:
    stats = await raw.info("stats")
    return int(stats["total_net_output_bytes"])


async def test_a_resume_from_before_the_window_makes_redis_send_at_most_the_window(
    redis_server: RedisServer, raw: Redis
) -> None:
    # Large stream nodes: the approximate trim then leaves far more than the window behind.
    await raw.config_set("stream-node-max-entries", 1000)
    await raw.config_set("stream-node-max-bytes", 0)
    broker = redis_factory(redis_server, history_size=WINDOW)()
    await broker.start()
    try:
        channel = "transactions:C1"
        payload = orjson.dumps({"pad": "x" * PAYLOAD_BYTES})
        positions = await broker.publish_many([(channel, payload)] * 1900)
        epoch = positions[-1].epoch
        (stream,) = await raw.keys("*history:{transactions:C1}")
        assert await raw.xlen(stream) > 5 * WINDOW  # what a read without COUNT would send

        before = await _bytes_sent(raw)
        history = await broker.history(channel, Position(offset=1, epoch=epoch))
        sent = await _bytes_sent(raw) - before
    finally:
        await broker.close()
    # The window's payloads and their framing, one INFO reply and a few canaries; not the stream.
    assert sent < WINDOW * PAYLOAD_BYTES * 1.5
    assert not history.recovered
    assert [e.offset for e in history.envelopes] == list(range(1900 - WINDOW + 1, 1901))


async def test_replayed_events_count_against_the_rate_limit_and_a_resume_flood_is_closed_1008(
    app_client: AppClient,
) -> None:
    # Almost no refill, so only what is sent and replayed moves the bucket (burst 40).
    settings = make_settings(rate_limit_per_s="0.1", rate_limit_max_violations="3")
    client = await app_client(settings)
    events = [{"type": "transaction_new", "data": txn(f"T{i}")} for i in range(200)]
    response = await publish(client, settings, {"events": events})
    assert response.status == 202
    epoch = (await response.json())["events"][0]["epoch"]

    ws = await connect(client, token_for(settings))
    # The filter drops every event: reading them is still the cost (200 events = 8 messages).
    filters: dict[str, Any] = {"customerId": "C1", "transactionIds": ["none-of-these"]}
    resume = {
        "type": "subscribe",
        "channel": "transactions",
        "filters": filters,
        "since": {"offset": 0, "epoch": epoch},
    }
    unsubscribe = {"type": "unsubscribe", "channel": "transactions", "filters": filters}
    replies: list[dict[str, Any]] = []
    for _ in range(10):  # 20 messages: within the burst if a resume cost one message
        await ws.send_json(resume)
        replies.append(await receive_json(ws))
        if replies[-1]["type"] == "error":
            break
        assert replies[-1]["recovered"] is True
        assert replies[-1]["replayed"] == 0
        await ws.send_json(unsubscribe)
        assert (await receive_json(ws))["type"] == "unsubscribed"
    assert [r["type"] for r in replies] == ["subscribed"] * 4 + ["error"]
    assert replies[-1]["code"] == "rate_limited"

    for _ in range(3):
        await ws.send_json(resume)
    assert await wait_closed(ws) == CloseCode.POLICY_VIOLATION
