"""The ingest publisher sends what the publish script would: envelopes with the next offsets of each channel."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from bench.ingest_publisher import IngestPublisher
from bench.payload import event_payload
from fleet.redis_server import RedisServer
from service.broker.redis_wire import decode_envelope
from service.publisher import prepare_event


async def _published(redis_server: RedisServer, raw: Redis, wire: str, customers: list[str]) -> list[Any]:
    """Every message the publisher sent, as a subscriber of the customers' channels got it, in order."""
    pubsub = raw.pubsub()
    await pubsub.subscribe(*(f"transactions:{c}" for c in customers))
    publisher = IngestPublisher(redis_server.url, wire)
    await publisher.start()
    try:
        reply = await publisher.run(customers, rate=1000.0, duration_s=0.003 * len(customers))
    finally:
        await publisher.close()
    assert reply["published"] == dict.fromkeys(customers, 3)
    assert not reply["errors"]
    messages: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 10.0
    while len(messages) < 3 * len(customers) and asyncio.get_running_loop().time() < deadline:
        # None for the subscribe confirmations too.
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            messages.append(message)
    await pubsub.aclose()
    return messages


async def test_eva_ws_envelopes_continue_the_position_the_pod_read(redis_server: RedisServer, raw: Redis) -> None:
    # What a pod's subscribe leaves behind: the history script created the channel's meta hash.
    await raw.hset("meta:{transactions:I0}", mapping={"epoch": "pod-read", "offset": 41})
    messages = await _published(redis_server, raw, "envelope", ["I0", "I1"])

    by_channel: dict[bytes, list[Any]] = {}
    for message in messages:
        by_channel.setdefault(message["channel"], []).append(decode_envelope(message["data"]))
    subscribed, unread = by_channel[b"transactions:I0"], by_channel[b"transactions:I1"]
    assert [(e.offset, e.epoch) for e in subscribed] == [(42, "pod-read"), (43, "pod-read"), (44, "pod-read")]
    # A channel no pod read starts as the script would start it: offset 1 of an epoch of its own.
    assert [e.offset for e in unread] == [1, 2, 3]
    assert len({e.epoch for e in unread}) == 1

    for seq, envelope in enumerate(subscribed, start=1):
        event = orjson.loads(envelope.payload)
        # Key for key what service.publisher encodes, and an event it accepts.
        reference = orjson.loads(prepare_event("transaction_update", event["data"]).payload)
        assert list(event) == list(reference)
        assert event["type"] == "transaction_update"
        assert orjson.dumps(event["data"]) == event_payload(customer_id="I0", seq=seq, ts_us=event["data"]["ts"])
    correlation_ids = [orjson.loads(e.payload)["correlationId"] for e in subscribed + unread]
    assert len(set(correlation_ids)) == len(correlation_ids)
    assert {len(c) for c in correlation_ids} == {36}


async def test_raw_reference_gets_the_bare_payload(redis_server: RedisServer, raw: Redis) -> None:
    messages = await _published(redis_server, raw, "bare", ["I0"])
    for seq, message in enumerate(messages, start=1):
        ts = orjson.loads(message["data"])["ts"]
        assert message["data"] == event_payload(customer_id="I0", seq=seq, ts_us=ts)


async def test_a_closed_redis_connection_fails_the_run(redis_server: RedisServer) -> None:
    publisher = IngestPublisher(redis_server.url, "bare")
    await publisher.start()
    redis_server.kill()
    try:
        # The loss is seen at the latest when the publisher waits for the replies.
        with pytest.raises((ConnectionError, OSError)):
            await asyncio.wait_for(publisher.run(["I0"], rate=1000.0, duration_s=0.05), 10.0)
    finally:
        await publisher.close()
