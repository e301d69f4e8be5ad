"""Start a local three-master Redis Cluster and measure how one pod's channels spread over it.

Run from the repository root: `.venv/bin/python -m fleet.measure_redis_cluster [channels] [--runs N] [--json PATH]`.
Prints channels and SSUBSCRIBE commands per master, and how long the pod took to have every
channel of a killed and restarted master back. `--json` keeps the raw results, with how many
channels were back on the restarted master over time, which `python -m bench.plots` draws
(docs/bench/redis-cluster.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from fleet.redis_cluster import RedisCluster
from fleet.waiting import eventually
from service.broker.canary import CANARY_CHANNEL_PART
from service.broker.redis import RedisBroker

PREFIX = "m:"


async def shard_channels(node: aioredis.Redis) -> int:
    """How many of the pod's shard channels this master has subscribed; 0 while it does not answer."""
    try:
        names = await node.pubsub_shardchannels(f"{PREFIX}*")
        # Without the pod's own canary channel: only the channels it was asked to subscribe.
        return len([name for name in names if CANARY_CHANNEL_PART.encode() not in name])
    except (aioredis.ConnectionError, aioredis.TimeoutError, aioredis.ResponseError):
        return 0


async def measure(cluster: RedisCluster, channels: int) -> dict[str, Any]:
    broker = RedisBroker(
        url=cluster.url, prefix=PREFIX, history_size=100, history_ttl_s=600, pod_id="measure", topology_refresh_s=1.0
    )
    names = [f"transactions:C{n}" for n in range(channels)]
    raw: dict[str, Any] = {"channels": channels, "masters": []}
    await broker.start()
    try:
        for node in cluster.nodes:
            node.cli("CONFIG", "RESETSTAT")
        started = time.perf_counter()
        await asyncio.gather(*(broker.subscribe(name) for name in names))
        raw["subscribe_s"] = time.perf_counter() - started
        print(f"subscribed {channels} channels in {raw['subscribe_s']:.2f} s")
        for node in cluster.nodes:
            on_node = len(
                [n for n in node.cli("PUBSUB", "SHARDCHANNELS", f"{PREFIX}*").split() if CANARY_CHANNEL_PART not in n]
            )
            stats = node.cli("INFO", "commandstats")
            calls = re.search(r"^cmdstat_ssubscribe:calls=(\d+)", stats, re.MULTILINE)
            raw["masters"].append(
                {"address": node.address, "channels": on_node, "ssubscribe": int(calls[1]) if calls else 0}
            )
            print(f"  master {node.address}: {on_node} channels, {calls[0] if calls else 'no ssubscribe'}")
        victim = cluster.nodes[0]
        raw["victim"] = victim.address
        victim.kill()
        started = time.perf_counter()
        # Readiness is a property, polled as /readyz would be.
        await eventually(lambda: not broker.ready, "the broker stayed ready", deadline_s=60, interval_s=0.01)
        raw["not_ready_after_kill_s"] = time.perf_counter() - started
        print(f"not ready {raw['not_ready_after_kill_s']:.2f} s after killing {victim.address}")
        restarted = time.perf_counter()
        victim.start()
        # Counted on the restarted master itself, beside the pod's own readiness.
        recovery: list[tuple[float, int]] = []
        async with aioredis.Redis(port=victim.port) as master:
            while True:
                now, ready = time.perf_counter(), broker.ready
                if now - restarted > 60:
                    raise RuntimeError("the broker did not become ready")
                recovery.append((round(now - restarted, 4), await shard_channels(master)))
                if ready and "ready_after_restart_s" not in raw:
                    raw["ready_after_restart_s"] = now - restarted
                if ready and len(recovery) > 1 and recovery[-1][1] == recovery[-2][1]:
                    break  # ready, and no channel came back since the sample before
                await asyncio.sleep(0.005)
        raw["recovery"] = recovery
        print(f"ready again {raw['ready_after_restart_s']:.2f} s after restarting it")
    finally:
        await broker.close()
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fleet.measure_redis_cluster", description=__doc__)
    parser.add_argument("channels", type=int, nargs="?", default=3000)
    parser.add_argument("--runs", type=int, default=1, help="each on a new cluster")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as directory:
            cluster = RedisCluster(Path(directory))
            cluster.start()
            try:
                runs.append(asyncio.run(measure(cluster, args.channels)))
            finally:
                cluster.stop()
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
