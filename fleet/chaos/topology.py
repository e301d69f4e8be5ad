"""The parts a chaos run breaks: Redis (one server, with or without AOF, or a Redis Cluster), 3 workers, nginx.

Worker 1 reaches Redis through a `HoldingProxy`, so its link alone can be black-holed. Every
process is started here and stopped by `stop()`, which is safe to call after any failure.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet.chaos.proxy import HoldingProxy
from fleet.cluster import WORKER_DEFAULTS
from fleet.nginx import Nginx
from fleet.process import ServiceProcess
from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer

WORKERS: Final = 3
HISTORY_SIZE: Final = 1000


@dataclass
class ChaosWorker:
    pod_id: str
    port: int
    redis_url: str
    process: ServiceProcess | None = None


class Topology:
    """Redis + 3 workers + nginx on loopback, with state and logs under `directory`."""

    def __init__(self, directory: Path, *, secret: str, aof: bool, redis_cluster: bool) -> None:
        self.directory = directory
        self.secret = secret
        self.aof = aof
        self.redis_cluster = RedisCluster(directory / "redis-cluster") if redis_cluster else None
        self.redis = None if redis_cluster else RedisServer(directory / "redis", persistent=aof)
        self.redis_link: HoldingProxy | None = None
        self.nginx = Nginx(directory / "nginx")
        self.workers: list[ChaosWorker] = []
        self.env = {
            **WORKER_DEFAULTS,
            "history_size": str(HISTORY_SIZE),
            # Short heartbeats so a dead peer is noticed within a run, not after the default 25 s.
            "heartbeat_s": "5",
        }

    @property
    def redis_nodes(self) -> list[RedisServer]:
        return self.redis_cluster.nodes if self.redis_cluster else [self.redis] if self.redis else []

    @property
    def url(self) -> str:
        return self.nginx.url

    async def start(self) -> None:
        """Start Redis, the proxy for worker 1's link, the workers, then nginx (blocking steps in threads)."""
        if self.redis_cluster is not None:
            await asyncio.to_thread(self.redis_cluster.start)
            urls = [self.redis_cluster.url] * WORKERS
        else:
            assert self.redis is not None
            await asyncio.to_thread(self.redis.start)
            self.redis_link = await HoldingProxy(self.redis.port).start()
            urls = [f"redis://127.0.0.1:{self.redis_link.port}/0"] + [self.redis.url] * (WORKERS - 1)
        (self.directory / "workers").mkdir(parents=True, exist_ok=True)
        for index, url in enumerate(urls, start=1):
            worker = ChaosWorker(f"worker-{index}", 0, url)
            worker.process = self._process(worker)
            worker.port = worker.process.port
            self.workers.append(worker)
        await asyncio.gather(*(asyncio.to_thread(w.process.start) for w in self.workers if w.process))
        await asyncio.to_thread(self.nginx.start, [w.port for w in self.workers])

    def _process(self, worker: ChaosWorker) -> ServiceProcess:
        return ServiceProcess(
            self.directory / "workers",
            worker.port or None,
            jwt_secret=self.secret,
            redis_url=worker.redis_url,
            pod_id=worker.pod_id,
            **self.env,
        )

    def restart_worker(self, worker: ChaosWorker) -> None:
        """Start a stopped worker again on its port, as a replaced pod would (blocking)."""
        worker.process = self._process(worker)
        worker.process.start()

    def pick_redis_node(self, rng: random.Random) -> RedisServer:
        return rng.choice(self.redis_nodes)

    async def stop(self) -> None:
        """Stop everything started, even half-way: nginx, workers (SIGTERM, then SIGKILL), proxy, Redis."""
        self.nginx.stop()
        for worker in self.workers:
            if worker.process is not None:
                worker.process.terminate()
        await asyncio.gather(*(asyncio.to_thread(w.process.stop) for w in self.workers if w.process))
        if self.redis_link is not None:
            await self.redis_link.close()
        for node in self.redis_nodes:
            node.kill()
