"""Publishing into eva-ws as fast as it accepts: batches of keyed events through POST /api/v1/publish or the library.

Runs inside the publisher process (bench.publisher, op `throughput`). Every event is a
transaction update with its own idempotency key, so the pod (HTTP) or this process (library)
does all of a real publish: validation, encoding, the state change, and the script that
checks the key, assigns the offset, appends history and PUBLISHes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import jwt
import orjson

from bench.payload import event_payload

EVENT_TYPE: Final = "transaction_update"


def channel_customers(channels: int) -> list[str]:
    return [f"P{i}" for i in range(channels)]


async def _load(send_batch: Callable[[int], Awaitable[int]], *, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Call `send_batch(n)` from `concurrency` loops until `duration_s` passed; count and time it."""
    accepted = 0
    calls = 0
    deadline = time.perf_counter() + duration_s
    next_batch = 0

    async def loop() -> None:
        nonlocal accepted, calls, next_batch
        while time.perf_counter() < deadline:
            n = next_batch
            next_batch += 1
            # Not `accepted += await ...`: that reads `accepted` before the await and loses the others' counts.
            got = await send_batch(n)
            accepted += got
            calls += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {
        "events": accepted,
        "calls": calls,
        "elapsed_s": time.perf_counter() - t0,
        # This process's CPU (all threads): the library's cost, or the HTTP client's.
        "client_cpu_s": time.process_time() - cpu0,
    }


async def via_http(
    http_url: str, secret: str, *, batch: int, concurrency: int, channels: int, duration_s: float, key_prefix: str
) -> dict[str, Any]:
    """POST /api/v1/publish with `batch` events per request; `events` counts those answered 202."""
    now = int(time.time())
    claims = {"sub": "bench-publisher", "roles": ["publisher"], "iat": now, "exp": now + 3600}
    headers = {"Authorization": "Bearer " + jwt.encode(claims, secret, "HS256"), "Content-Type": "application/json"}
    customers = channel_customers(channels)
    # The client's own work stays small: each event's JSON is built once, only the key differs.
    heads = [
        b'{"type":"' + EVENT_TYPE.encode() + b'","data":' + event_payload(customer_id=c, seq=1) + b',"idempotencyKey":"'
        for c in customers
    ]
    prefix = f"{key_prefix}-{os.getpid()}-".encode()
    url = f"{http_url}/api/v1/publish"
    errors: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def send_batch(n: int) -> int:
            first = n * batch
            body = (
                b'{"events":['
                + b",".join(heads[i % channels] + prefix + str(i).encode() + b'"}' for i in range(first, first + batch))
                + b"]}"
            )
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status == 202:
                    return batch
                if len(errors) < 3:
                    errors.append(f"{response.status} {(await response.text())[:200]}")
                return 0

        result = await _load(send_batch, concurrency=concurrency, duration_s=duration_s)
    return {**result, "errors": errors}


async def via_library(
    redis_url: str, *, batch: int, concurrency: int, channels: int, duration_s: float, key_prefix: str
) -> dict[str, Any]:
    """`Publisher.publish_prepared` with `batch` events per call; `events` counts positions returned."""
    from service.backend_errors import BackendUnavailable
    from service.publisher import Publisher, prepare_event

    customers = channel_customers(channels)
    data = [orjson.loads(event_payload(customer_id=c, seq=1)) for c in customers]
    prefix = f"{key_prefix}-{os.getpid()}-"
    duplicates = 0
    errors: list[str] = []
    async with Publisher.connect(redis_url) as publisher:

        async def send_batch(n: int) -> int:
            nonlocal duplicates
            first = n * batch
            events = [
                prepare_event(EVENT_TYPE, data[i % channels], idempotency_key=prefix + str(i))
                for i in range(first, first + batch)
            ]
            try:
                published = await publisher.publish_prepared(events)
            except BackendUnavailable as error:
                # As the HTTP API answers 503: counted, not fatal (on a starved machine Redis may stall).
                if len(errors) < 3:
                    errors.append(f"{type(error).__name__}: {error}")
                return 0
            duplicates += sum(p.position.duplicate for p in published)
            return len(published)

        result = await _load(send_batch, concurrency=concurrency, duration_s=duration_s)
    return {**result, "duplicates": duplicates, "errors": errors}


async def offsets_total(redis_url: str, channels: int) -> int:
    """Sum of the newest offsets of the benchmark's channels: every event the scripts accepted."""
    import redis.asyncio as aioredis

    from service import redis_keys

    client = aioredis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for customer in channel_customers(channels):
            pipe.hget(redis_keys.meta_key("", f"transactions:{customer}"), "offset")
        return sum(int(v) for v in await pipe.execute() if v is not None)
    finally:
        await client.aclose()
