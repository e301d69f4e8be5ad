"""A batch through publish_batch.lua ends as the same events published one by one through publish.lua."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from service import redis_keys
from service.broker.base import BrokerUnavailable, Position
from service.broker.redis import RedisBroker
from service.broker.redis_publish_batch import CHUNK_EVENTS
from tests.broker_contract import new_channel
from tests.test_broker_redis import redis_factory


@pytest.fixture
async def broker(redis_server: RedisServer) -> AsyncIterator[RedisBroker]:
    made = redis_factory(redis_server, state_max_items=3)()
    assert isinstance(made, RedisBroker)
    await made.start()
    yield made
    await made.close()


def event(n: int, *, txn: int, kind: str = "transaction_update", version: int | None = None) -> bytes:
    data: dict[str, object] = {"id": f"T{txn}", "customerId": "C1", "n": n}
    if version is not None:
        data["version"] = version
    return orjson.dumps({"type": kind, "data": data})


def workload(channels: list[str]) -> tuple[list[tuple[str, bytes]], list[str | None]]:
    """More events than one script call takes: state sets and deletes, stale versions, keys repeated in the batch."""
    items: list[tuple[str, bytes]] = []
    keys: list[str | None] = []
    for n in range(CHUNK_EVENTS * 2 + 50):
        channel = channels[n % len(channels)]
        if n % 7 == 0:
            payload = event(n, txn=n % 5, kind="transaction_delete")
        elif n % 11 == 0:
            payload = b'{"type":"presence","n":%d}' % n
        else:
            # Versions go down now and then, so some state writes are refused as older.
            payload = event(n, txn=n % 5, version=n % 13)
        items.append((channel, payload))
        # Every tenth event repeats the key of the event nine before it (the same channel).
        keys.append(None if n % 3 == 0 else f"k{n - 9 if n % 10 == 0 and n >= 10 else n}")
    return items, keys


async def test_a_batch_leaves_history_state_and_answers_as_one_publish_per_event(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    batched, single = [new_channel() for _ in range(3)], [new_channel() for _ in range(3)]
    items, keys = workload(batched)
    positions = await broker.publish_many(items, idempotency_keys=keys)
    expected: list[Position] = []
    for (channel, payload), key in zip(items, keys, strict=True):
        expected.append(await broker.publish(single[batched.index(channel)], payload, idempotency_key=key))

    assert [(p.offset, p.duplicate) for p in positions] == [(p.offset, p.duplicate) for p in expected]
    assert any(p.duplicate for p in positions)
    for one, other in zip(batched, single, strict=True):
        history, reference = await broker.history(one, None), await broker.history(other, None)
        assert history.position.offset == reference.position.offset
        assert [p.epoch for p, (c, _) in zip(positions, items, strict=True) if c == one] == [history.position.epoch] * (
            sum(1 for c, _ in items if c == one)
        )
        since = Position(offset=0, epoch=history.position.epoch)
        replay = await broker.history(one, since)
        reference_replay = await broker.history(other, Position(offset=0, epoch=reference.position.epoch))
        assert [e.payload for e in replay.envelopes] == [e.payload for e in reference_replay.envelopes]
        assert (await broker.snapshot(one)).payloads == (await broker.snapshot(other)).payloads
    async with Redis.from_url(redis_server.url) as raw:
        prefix = broker._prefix
        for one, other in zip(batched, single, strict=True):
            ttl = await raw.ttl(redis_keys.meta_key(prefix, one))
            assert 0 < ttl <= 600
            assert await raw.ttl(redis_keys.stream_key(prefix, one)) > 0
            assert await raw.zcard(redis_keys.state_order_key(prefix, one)) == await raw.zcard(
                redis_keys.state_order_key(prefix, other)
            )


async def test_a_batch_is_published_once_in_order_after_redis_lost_its_scripts(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    channel = new_channel()
    await broker.publish_many([(channel, event(n, txn=n)) for n in range(3)])
    async with Redis.from_url(redis_server.url) as raw:
        await raw.script_flush()
    positions = await broker.publish_many([(channel, event(n, txn=n)) for n in range(3, CHUNK_EVENTS * 2 + 3)])
    assert [p.offset for p in positions] == list(range(4, CHUNK_EVENTS * 2 + 4))
    history = await broker.history(channel, Position(offset=0, epoch=positions[0].epoch))
    assert [orjson.loads(e.payload)["data"]["n"] for e in history.envelopes] == list(range(CHUNK_EVENTS * 2 + 3))


async def test_a_refused_batch_raises_unavailable_and_the_next_batch_is_published(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    broken, fine = new_channel(), new_channel()
    async with Redis.from_url(redis_server.url) as raw:
        # A history key of the wrong type makes the script fail half-way through the batch.
        await raw.set(redis_keys.stream_key(broker._prefix, broken), "not a stream")
        await raw.hset(redis_keys.meta_key(broker._prefix, broken), mapping={"epoch": "e", "offset": 0})
    with pytest.raises(BrokerUnavailable):
        await broker.publish_many([(fine, event(1, txn=1)), (broken, event(2, txn=2)), (fine, event(3, txn=3))])
    for _ in range(3):
        positions = await broker.publish_many([(fine, event(n, txn=n)) for n in range(4, 8)])
        assert [p.duplicate for p in positions] == [False] * 4
        assert positions[1].offset == positions[0].offset + 1
