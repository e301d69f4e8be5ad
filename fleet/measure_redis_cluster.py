"""Start a local three-master Redis Cluster and measure how one pod's channels spread over it.

Run from the repository root: `.venv/bin/python -m fleet.measure_redis_cluster [channels]`.
Prints channels and SSUBSCRIBE commands per master, and how long the pod took to have every
channel of a killed and restarted master back.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from fleet.redis_cluster import RedisCluster
from fleet.waiting import eventually
from service.broker.redis_cluster import RedisClusterBroker


async def measure(cluster: RedisCluster, channels: int) -> None:
    broker = RedisClusterBroker(
        url=cluster.url, prefix="m:", history_size=100, history_ttl_s=600, pod_id="measure", topology_refresh_s=1.0
    )
    names = [f"transactions:C{n}" for n in range(channels)]
    await broker.start()
    try:
        for node in cluster.nodes:
            node.cli("CONFIG", "RESETSTAT")
        started = time.perf_counter()
        await asyncio.gather(*(broker.subscribe(name) for name in names))
        print(f"subscribed {channels} channels in {time.perf_counter() - started:.2f} s")
        for node in cluster.nodes:
            shard_channels = len(node.cli("PUBSUB", "SHARDCHANNELS", "m:*").split())
            stats = node.cli("INFO", "commandstats")
            calls = next((line for line in stats.splitlines() if line.startswith("cmdstat_ssubscribe:")), "")
            print(f"  master {node.address}: {shard_channels} channels, {calls or 'no ssubscribe'}")
        victim = cluster.nodes[0]
        victim.kill()
        started = time.perf_counter()
        # Readiness is a property, polled as /readyz would be.
        await eventually(lambda: not broker.ready, "the broker stayed ready", deadline_s=60, interval_s=0.01)
        print(f"not ready {time.perf_counter() - started:.2f} s after killing {victim.address}")
        restarted = time.perf_counter()
        victim.start()
        await eventually(lambda: broker.ready, "the broker did not become ready", deadline_s=60, interval_s=0.01)
        print(f"ready again {time.perf_counter() - restarted:.2f} s after restarting it")
    finally:
        await broker.close()


def main() -> None:
    channels = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with tempfile.TemporaryDirectory() as directory:
        cluster = RedisCluster(Path(directory))
        cluster.start()
        try:
            asyncio.run(measure(cluster, channels))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
