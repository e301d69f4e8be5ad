"""What an idempotency key costs a publish on a local redis-server: latency, batch throughput, memory per key.

    .venv/bin/python -m bench.publish_idempotency --events 5000

Publishes `--events` events one at a time (p50 and p99 of each call), then in batches of 100
(events per second), once without and once with a distinct key per event, through the Redis
broker the pods use. Then reports `MEMORY USAGE` of one idempotency key and the growth of
Redis' `used_memory` per keyed event once the history is full.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Final

from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from service import redis_keys
from service.broker.redis import RedisBroker

PAYLOAD: Final = b'{"type":"transaction_update","data":{"id":"T1","customerId":"C1"}}'
CHANNELS: Final = 50
BATCH: Final = 100
HISTORY_SIZE: Final = 1000


async def _latency(broker: RedisBroker, events: int, label: str, keyed: bool) -> str:
    samples = []
    for n in range(events):
        started = time.perf_counter()
        key = f"{label}-{n}" if keyed else None
        await broker.publish(f"transactions:C{n % CHANNELS}", PAYLOAD, idempotency_key=key)
        samples.append(time.perf_counter() - started)
    samples.sort()
    started = time.perf_counter()
    for batch in range(events // BATCH):
        items = [(f"transactions:C{n % CHANNELS}", PAYLOAD) for n in range(BATCH)]
        keys: list[str | None] | None = [f"{label}-b{batch}-{n}" for n in range(BATCH)] if keyed else None
        await broker.publish_many(items, idempotency_keys=keys)
    rate = (events // BATCH) * BATCH / (time.perf_counter() - started)
    p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99)]
    return (
        f"{label:>7}: one at a time p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us;"
        f" batches of {BATCH}: {rate:.0f} events/s"
    )


async def _memory(broker: RedisBroker, redis: Redis, events: int) -> str:
    channel = "transactions:memory"
    # Fill the history first, so what grows afterwards is the keys alone.
    await broker.publish_many([(channel, PAYLOAD)] * HISTORY_SIZE * 2)
    before = (await redis.info("memory"))["used_memory"]
    for n in range(events):
        await broker.publish(channel, PAYLOAD, idempotency_key=f"evt-{n:08d}")
    after = (await redis.info("memory"))["used_memory"]
    one = await redis.memory_usage(redis_keys.idempotency_key_name("", channel, "evt-00000000"))
    per_event = (after - before) / events
    return f"memory: MEMORY USAGE of one key {one} B; used_memory grows {per_event:.0f} B per keyed event"


async def main(events: int) -> None:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="eva-ws-bench-")))
    server.start()
    broker = RedisBroker(url=server.url, prefix="", history_size=HISTORY_SIZE, history_ttl_s=600, pod_id="bench")
    redis = Redis.from_url(server.url)
    await broker.start()
    try:
        print(await _latency(broker, events, "no key", keyed=False))
        print(await _latency(broker, events, "key", keyed=True))
        print(await _memory(broker, redis, events))
    finally:
        await redis.aclose()
        await broker.close()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000, help="events per measurement")
    asyncio.run(main(parser.parse_args().events))
