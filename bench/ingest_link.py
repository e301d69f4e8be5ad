"""CPU per event a pod spends taking live events from Redis: PUB/SUB link, envelope decode, handler call.

Run from the repository root:
`.venv/bin/python -m bench.ingest_link [--channels N] [--events N] [--runs N] [--loop asyncio]`.
A RedisBroker subscribes N channels of one local redis-server; `redis-cli --pipe`, another
process, PUBLISHes M envelopes spread over them in one pipeline. The figure is this process's CPU
time (utime + stime) from the first PUBLISH until the handler saw the last event, per event: the
ingest cost alone, without websockets or a hub, on uvloop as pods run (or asyncio's loop). To
compare two versions, run it alternately from each checkout
(`PYTHONPATH=<checkout> .venv/bin/python bench/ingest_link.py`, this file from either).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import uvloop

from fleet.redis_server import REDIS_CLI, RedisServer
from service import redis_keys
from service.broker import redis_wire as wire
from service.broker.base import Envelope
from service.broker.redis import RedisBroker


def publish_pipeline(prefix: str, channels: list[str], events: int, payload: bytes) -> bytes:
    """RESP for `events` PUBLISHes of envelopes, round robin over `channels`."""
    parts: list[bytes] = []
    names = [redis_keys.pubsub_channel(prefix, channel).encode() for channel in channels]
    for n in range(events):
        name = names[n % len(names)]
        message = wire.encode_envelope(n + 1, "bench", payload)
        parts.append(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, len(message), message))
    return b"".join(parts)


async def measure(server: RedisServer, *, channels: int, events: int, payload: bytes) -> tuple[float, float]:
    """CPU microseconds per event and events per second for one run."""
    prefix = f"i{uuid.uuid4().hex[:6]}:"
    names = [f"transactions:C{n}" for n in range(channels)]
    broker = RedisBroker(url=server.url, prefix=prefix, history_size=10, history_ttl_s=60, pod_id="ingest")
    delivered = 0
    done = asyncio.Event()

    def on_message(envelope: Envelope) -> None:
        nonlocal delivered
        delivered += 1
        if delivered == events:
            done.set()

    broker.set_handlers(on_message=on_message, on_resubscribed=lambda channels: None)
    await broker.start()
    try:
        for name in names:
            await broker.subscribe(name)
        pipeline = publish_pipeline(prefix, names, events, payload)
        started, cpu = time.perf_counter(), time.process_time()
        publisher = await asyncio.create_subprocess_exec(
            REDIS_CLI,
            "-p",
            str(server.port),
            "--pipe",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        await publisher.communicate(pipeline)
        await asyncio.wait_for(done.wait(), 300)
        return (time.process_time() - cpu) / events * 1e6, events / (time.perf_counter() - started)
    finally:
        await broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    options = parser.parse_args()
    payload = b'{"type":"transaction_update","data":"%s"}' % (b"x" * max(0, options.payload_bytes - 40))
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            results = [
                (uvloop.run if options.loop == "uvloop" else asyncio.run)(
                    measure(server, channels=options.channels, events=options.events, payload=payload)
                )
                for _ in range(options.runs)
            ]
        finally:
            server.kill()
    for cpu_us, rate in results:
        print(f"{cpu_us:.2f} us CPU per event, {rate:.0f} events/s")
    print(f"median: {statistics.median(c for c, _ in results):.2f} us CPU per event")


if __name__ == "__main__":
    main()
