"""Measure the Redis broker's publish-and-deliver path: CPU per event, one Redis or a local Redis Cluster.

Run from the repository root: `.venv/bin/python -m fleet.measure_broker [--events N] [--cluster] [--runs N]`.
One pod subscribes 100 channels, another publishes N events to them in batches of 100
(`publish_many`); it prints the events per second until the last one was delivered and the
process CPU time per event (both pods run in this process, so CPU is the steadier figure on a
shared machine). To compare two versions, run it alternately from each checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer
from service.broker.base import Envelope
from service.broker.redis import RedisBroker

CHANNELS = [f"transactions:C{n}" for n in range(100)]
BATCH = 100


async def measure(url: str, events: int) -> tuple[float, float]:
    """Events per second and CPU microseconds per event for one run."""
    prefix = f"b{uuid.uuid4().hex[:6]}:"
    subscriber, publisher = (
        RedisBroker(url=url, prefix=prefix, history_size=100, history_ttl_s=60, pod_id=pod) for pod in ("sub", "pub")
    )
    delivered = 0
    done = asyncio.Event()

    def on_message(envelope: Envelope) -> None:
        nonlocal delivered
        delivered += 1
        if delivered == events:
            done.set()

    subscriber.set_handlers(on_message=on_message, on_resubscribed=lambda channels: None)
    await subscriber.start()
    await publisher.start()
    try:
        for channel in CHANNELS:
            await subscriber.subscribe(channel)
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, events, BATCH):
            await publisher.publish_many(
                [
                    (CHANNELS[n % len(CHANNELS)], b'{"type":"transaction_update","n":%d}' % n)
                    for n in range(start, start + BATCH)
                ]
            )
        await asyncio.wait_for(done.wait(), 300)
        return events / (time.perf_counter() - started), (time.process_time() - cpu) / events * 1e6
    finally:
        await subscriber.close()
        await publisher.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="a local three-master Redis Cluster")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = RedisCluster(Path(directory)) if options.cluster else RedisServer(Path(directory))
        server.start()
        try:
            results = [asyncio.run(measure(server.url, options.events)) for _ in range(options.runs)]
        finally:
            if isinstance(server, RedisCluster):
                server.stop()
            else:
                server.kill()
    for rate, cpu_us in results:
        print(f"{rate:.0f} events/s delivered, {cpu_us:.1f} us CPU per event")
    print(
        f"median: {statistics.median(r for r, _ in results):.0f} events/s, "
        f"{statistics.median(c for _, c in results):.1f} us CPU per event"
    )


if __name__ == "__main__":
    main()
