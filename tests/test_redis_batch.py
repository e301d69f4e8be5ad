"""Batcher against a real redis-server: every caller gets its own answer; a failure reaches each caller of the batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from fleet.redis_server import RedisServer
from service.redis_batch import Batcher
from service.redis_client import command_client


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    made = command_client(redis_server.url, max_connections=4, wait_s=2.0)
    yield made
    await made.aclose()


def incrementer(client: Redis, batches: list[int]) -> Batcher[str, int]:
    """INCR of each named counter, every batch in one script call; `batches` records the batch sizes."""
    script = client.register_script("local r = {} for i = 1, #KEYS do r[i] = redis.call('INCR', KEYS[i]) end return r")

    async def send(names: list[str]) -> list[int]:
        batches.append(len(names))
        answers: list[int] = await script(keys=names)
        return answers

    return Batcher(send, max_batch=100)


async def test_concurrent_callers_share_round_trips_and_get_their_own_answers(client: Redis) -> None:
    batches: list[int] = []
    batcher = incrementer(client, batches)
    names = [f"n{i % 7}" for i in range(250)]
    answers = await asyncio.gather(*(batcher.submit(name) for name in names))
    # The n-th request for a counter sees it at n: answers follow the order of the calls.
    seen: dict[str, int] = {}
    for name, answer in zip(names, answers, strict=True):
        seen[name] = seen.get(name, 0) + 1
        assert answer == seen[name]
    assert batches == [100, 100, 50]
    assert await batcher.submit("n0") == seen["n0"] + 1  # a lone request goes on its own
    assert batches[-1] == 1


async def test_every_caller_of_a_failed_batch_gets_the_error_and_none_hangs(
    redis_server: RedisServer, client: Redis
) -> None:
    batcher = incrementer(client, [])
    redis_server.kill()
    results = await asyncio.gather(*(batcher.submit(f"n{i}") for i in range(50)), return_exceptions=True)
    assert len(results) == 50
    assert all(isinstance(r, RedisConnectionError | OSError) for r in results)
    redis_server.start()
    assert await batcher.submit("n0") == 1  # the batcher carries on once Redis is back


async def test_a_cancelled_caller_does_not_disturb_the_others(client: Redis, raw: Redis) -> None:
    batcher = incrementer(client, [])
    calls = [asyncio.ensure_future(batcher.submit("n")) for _ in range(10)]
    await asyncio.sleep(0)  # every call is queued
    calls[3].cancel()
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(answers[3], asyncio.CancelledError)
    # The cancelled request was still sent: its caller may have been about to use it.
    assert [a for i, a in enumerate(answers) if i != 3] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert int(await raw.get("n") or 0) == 10


async def test_wait_idle_returns_once_everything_submitted_is_answered(client: Redis, raw: Redis) -> None:
    batcher = incrementer(client, [])
    calls = [asyncio.ensure_future(batcher.submit("n")) for _ in range(5)]
    await asyncio.sleep(0)
    await batcher.wait_idle()
    assert all(c.done() for c in calls)
    assert int(await raw.get("n") or 0) == 5
    await batcher.wait_idle()  # idle already: returns at once


@pytest.mark.parametrize("size", [1, 3])
async def test_a_wrong_number_of_answers_fails_every_caller(size: int) -> None:
    async def send(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(send)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(size)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_round_trips_start_at_least_the_interval_apart(client: Redis) -> None:
    batches: list[int] = []
    script = client.register_script("return #KEYS")

    async def send(names: list[str]) -> list[int]:
        batches.append(len(names))
        return [await script(keys=names)] * len(names)

    batcher: Batcher[str, int] = Batcher(send, min_interval_s=3600)
    assert await batcher.submit("first") == 1  # idle: sent at once
    later = []
    for i in range(5):
        later.append(asyncio.ensure_future(batcher.submit(f"n{i}")))
        await asyncio.sleep(0.01)  # each in a loop turn of its own, after the first round trip
    # All five wait for the next round trip, which the interval holds back.
    assert batches == [1]
    assert not any(call.done() for call in later)
    senders = [task for task in asyncio.all_tasks() if task.get_name() == "redis-batch"]
    assert len(senders) == 1
    senders[0].cancel()
    results = await asyncio.gather(*later, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
