"""What a snapshot of 1,000 transactions costs: the Redis read, the decode, the messages, the memory, the publish.

    .venv/bin/python -m bench.snapshot_cost --transactions 1000 --reads 200

Publishes `--transactions` transactions (about 300-byte events, as `Publisher` encodes them) to
one channel of a local redis-server through the broker the pods use, then reads the channel's
snapshot `--reads` times: the Redis script alone (p50, p99), the decode a pod does once per read,
and the `snapshot` messages built for one subscriber (count and bytes). Also: Redis memory of
the state (`MEMORY USAGE` of its two keys), the same read from the embedded broker, and the
publish latency of a transaction event (state kept) against a `user_update` (no state).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from service import redis_keys, snapshots
from service.broker.base import Broker
from service.broker.memory import MemoryBroker
from service.broker.redis import RedisBroker
from service.publisher import prepare_event

CHANNEL: Final = "transactions:C1"


def _event(number: int, version: int) -> bytes:
    data = {
        "id": f"TXN-{number:06d}",
        "customerId": "C1",
        "status": "pending",
        "stage": "kyc",
        "amount": 1234.56,
        "currency": "EUR",
        "updatedAt": "2026-12-01T12:00:00.000Z",
        "updatedBy": "alice",
        "changedFields": ["status"],
        "version": version,
    }
    return prepare_event("transaction_update", data).payload


async def _timed(call: Callable[[], Awaitable[object]], times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return sorted(samples)


def _p(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1e3:.2f} ms, p99 {samples[int(len(samples) * 0.99)] * 1e3:.2f} ms"


async def _fill(broker: Broker, transactions: int) -> None:
    await broker.publish_many([(CHANNEL, _event(n, 1)) for n in range(transactions)])


async def _report(broker: Broker, label: str, reads: int) -> None:
    samples = await _timed(lambda: broker.snapshot(CHANNEL), reads)
    snapshot = await broker.snapshot(CHANNEL)
    print(f"{label}: snapshot read of {len(snapshot.payloads)} transactions {_p(samples)}")
    decode = []
    for _ in range(reads):
        started = time.perf_counter()
        decoded = snapshots.decode(snapshot)
        decode.append(time.perf_counter() - started)
    decode.sort()
    build = []
    for _ in range(reads):
        started = time.perf_counter()
        messages = snapshots.messages(CHANNEL, decoded.position, snapshots.matching(decoded, lambda data: True))
        build.append(time.perf_counter() - started)
    build.sort()
    size = sum(len(m) for m in messages)
    print(f"{label}: decode once per read {_p(decode)}; messages per subscriber {_p(build)}")
    print(f"{label}: {len(messages)} snapshot messages, {size / 1024:.0f} KiB in all")


async def main(transactions: int, reads: int) -> None:
    memory = MemoryBroker()
    await memory.start()
    await _fill(memory, transactions)
    await _report(memory, "embedded", reads)

    server = RedisServer(Path(tempfile.mkdtemp(prefix="eva-ws-bench-")))
    server.start()
    broker = RedisBroker(url=server.url, prefix="", history_size=1000, history_ttl_s=600, pod_id="bench")
    redis = Redis.from_url(server.url)
    await broker.start()
    try:
        await _fill(broker, transactions)
        await _report(broker, "redis", reads)
        state = await redis.memory_usage(redis_keys.state_key("", CHANNEL), samples=0)
        order = await redis.memory_usage(redis_keys.state_order_key("", CHANNEL), samples=0)
        print(f"redis: state memory {(state or 0) / 1024:.0f} KiB (hash) + {(order or 0) / 1024:.0f} KiB (order set)")
        version = iter(range(2, 10**9))
        with_state = await _timed(lambda: broker.publish(CHANNEL, _event(7, next(version))), reads)
        user = prepare_event("user_update", {"id": "u1"}, channel="user_updates", user_id="u1").payload
        without = await _timed(lambda: broker.publish("user_updates:u1", user), reads)
        print(f"redis: publish of a transaction event (state kept) {_p(with_state)}; of a user_update {_p(without)}")
    finally:
        await redis.aclose()
        await broker.close()
        await memory.close()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=1000, help="transactions in the snapshot")
    parser.add_argument("--reads", type=int, default=200, help="snapshot reads (and publishes) measured")
    options = parser.parse_args()
    asyncio.run(main(options.transactions, options.reads))
