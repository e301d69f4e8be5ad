"""Publisher process: sends benchmark events through Redis at a paced rate, the way each system expects.

Run as ``python -m bench.publisher``; commands arrive as JSON lines on stdin (see bench.workers).
Sinks, one per target kind:
- raw: PUBLISH of the bare payload on ``transactions:{customer}``.
- eva-ws: the service's own publish path (Broker.publish_many on the Redis broker, i.e. the
  Lua script that assigns offsets and keeps history), falling back to POST /api/v1/publish.
- python-socketio: ``AsyncRedisManager(url, write_only=True).emit`` as python-socketio documents.
- node: the @socket.io/redis-emitter wire format (msgpack of [uid, packet, opts] on
  ``socket.io#/#<room>#``), which the Redis adapter of every Socket.IO server consumes.
The ingest scenario sets eva-ws's and the raw reference's publishers up with ``setup_ingest``
instead: the same messages pre-encoded in pipelined plain PUBLISH (see bench.ingest_publisher).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
import uvloop

from bench import publish_load
from bench.ingest_publisher import IngestPublisher
from bench.pacing import open_loop
from bench.payload import event_payload
from bench.workers import reply_channel

EVENT_NAME: Final = "transaction_update"
# One Redis round trip carries at most this many events, so a burst cannot stall the pacing.
BATCH_MAX: Final = 256


def channel_of(customer: str) -> str:
    return f"transactions:{customer}"


class Sink(abc.ABC):
    """Where one batch of (customer, payload) goes, in order."""

    async def start(self) -> None:  # noqa: B027  (optional hook: most sinks connect lazily)
        """Connect before the first batch."""

    @abc.abstractmethod
    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None: ...

    async def close(self) -> None:  # noqa: B027  (optional hook: not every sink holds connections)
        """Release connections."""


class RawSink(Sink):
    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.from_url(redis_url)

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for customer, payload in batch:
            pipe.publish(channel_of(customer), payload)
        await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


class NodeEmitterSink(RawSink):
    """Same bytes @socket.io/redis-emitter 5 publishes for ``emitter.to(room).emit(event, data)``."""

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None:
        # Only the Node.js peer needs msgpack; the project's test environment has none.
        import msgpack  # type: ignore[import-not-found,import-untyped,unused-ignore]

        pipe = self.redis.pipeline(transaction=False)
        for customer, payload in batch:
            room = channel_of(customer)
            packet = {"type": 2, "data": [EVENT_NAME, orjson.loads(payload)], "nsp": "/"}
            opts = {"rooms": [room], "flags": {}, "except": []}
            pipe.publish(f"socket.io#/#{room}#", msgpack.packb(["emitter", packet, opts]))
        await pipe.execute()


class PythonSocketIOSink(Sink):
    def __init__(self, redis_url: str) -> None:
        import socketio  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self.manager = socketio.AsyncRedisManager(redis_url, write_only=True)

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None:
        # One emit is one PUBLISH; awaited in order so events of a room stay ordered.
        for customer, payload in batch:
            await self.manager.emit(EVENT_NAME, orjson.loads(payload), room=channel_of(customer))


class EvaSink(Sink):
    """eva-ws publish through its own library over Redis, or its HTTP API (see bench.eva_publish)."""

    def __init__(self, redis_url: str, http_url: str, secret: str) -> None:
        from bench.eva_publish import EvaPublisher

        self._publisher = EvaPublisher(redis_url=redis_url, http_url=http_url, secret=secret)

    async def start(self) -> None:
        await self._publisher.start()

    @property
    def mode(self) -> str:
        return self._publisher.mode

    async def publish(self, batch: Sequence[tuple[str, bytes]]) -> None:
        await self._publisher.publish_many(batch)

    async def close(self) -> None:
        await self._publisher.close()


def make_sink(kind: str, redis_url: str, *, http_url: str = "", secret: str = "") -> Sink:
    if kind == "raw":
        return RawSink(redis_url)
    if kind == "node":
        return NodeEmitterSink(redis_url)
    if kind == "python-socketio":
        return PythonSocketIOSink(redis_url)
    if kind == "eva-ws":
        return EvaSink(redis_url, http_url, secret)
    raise ValueError(f"unknown sink {kind!r}")


class Publisher:
    """Paced publishing with a sequence number per customer channel."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.seq: dict[str, int] = {}

    def restart_sequences(self) -> None:
        self.seq = {}

    async def close(self) -> None:
        await self.sink.close()

    async def run(self, customers: Sequence[str], rate: float, duration_s: float) -> dict[str, Any]:
        """Publish `rate` events/s round-robin over `customers` for `duration_s` (open loop)."""

        async def publish(first: int, count: int) -> None:
            batch = []
            for i in range(first, first + count):
                customer = customers[i % len(customers)]
                seq = self.seq[customer] = self.seq.get(customer, 0) + 1
                batch.append((customer, event_payload(customer_id=customer, seq=seq)))
            await self.sink.publish(batch)

        paced = await open_loop(rate, duration_s, BATCH_MAX, publish)
        elapsed_s = time.perf_counter() - paced.started
        return {
            "sent": paced.sent,
            "elapsed_s": elapsed_s,
            "behind_max_s": paced.behind_max_s,
            "published": dict(self.seq),
        }


async def throughput(cmd: dict[str, Any]) -> dict[str, Any]:
    """Publish into eva-ws as fast as it accepts for a while (see bench.publish_load)."""
    options = {k: cmd[k] for k in ("batch", "concurrency", "channels", "duration_s", "key_prefix")}
    if cmd["via"] == "http":
        return await publish_load.via_http(cmd["http_url"], cmd["secret"], **options)
    return await publish_load.via_library(cmd["redis_url"], **options)


async def serve() -> None:
    send = reply_channel()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    publisher: Publisher | IngestPublisher | None = None
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            op = cmd["op"]
            reply: dict[str, Any]
            if op == "exit":
                break
            if op == "ping":
                reply = {"pong": True}
            elif op == "setup":
                if publisher is not None:
                    await publisher.close()
                    publisher = None
                sink = make_sink(
                    cmd["kind"], cmd["redis_url"], http_url=cmd.get("http_url", ""), secret=cmd.get("secret", "")
                )
                await sink.start()
                publisher = Publisher(sink)
                reply = {"ready": True, "mode": getattr(sink, "mode", "redis")}
            elif op == "setup_ingest":
                if publisher is not None:
                    await publisher.close()
                    publisher = None
                publisher = IngestPublisher(cmd["redis_url"], cmd["wire"])
                await publisher.start()
                reply = {"ready": True, "mode": f"pipelined PUBLISH ({cmd['wire']})"}
            elif op == "restart_sequences":
                assert publisher is not None
                publisher.restart_sequences()
                reply = {"restarted": True}
            elif op == "run":
                assert publisher is not None
                reply = await publisher.run(cmd["customers"], float(cmd["rate"]), float(cmd["duration_s"]))
            elif op == "throughput":
                reply = await throughput(cmd)
            elif op == "offsets_total":
                reply = {"total": await publish_load.offsets_total(cmd["redis_url"], int(cmd["channels"]))}
            else:
                raise ValueError(f"unknown op {op!r}")
            send(reply)
    finally:
        if publisher is not None:
            await publisher.close()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    uvloop.run(serve())


if __name__ == "__main__":
    main()
