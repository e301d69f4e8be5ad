"""The parts a chaos run breaks: Redis (one server, with or without AOF, or a Redis Cluster), 3 workers, nginx,
and with `outbox` a PostgreSQL server whose outbox every worker relays (EVA_WS_OUTBOX_DSN).

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
from fleet.postgres_server import PostgresServer
from fleet.process import ServiceProcess
from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer

WORKERS: Final = 3
HISTORY_SIZE: Final = 1000
OUTBOX_SCHEMA: Final = Path(__file__).resolve().parents[2] / "deploy" / "sql" / "outbox.sql"


@dataclass
class ChaosWorker:
    pod_id: str
    port: int
    redis_url: str
    process: ServiceProcess | None = None


class Topology:
    """Redis + 3 workers + nginx on loopback, with state and logs under `directory`."""

    def __init__(self, directory: Path, *, secret: str, aof: bool, redis_cluster: bool, outbox: bool = False) -> None:
        self.directory = directory
        self.secret = secret
        self.aof = aof
        self.redis_cluster = RedisCluster(directory / "redis-cluster") if redis_cluster else None
        self.redis = None if redis_cluster else RedisServer(directory / "redis", persistent=aof)
        self.redis_link: HoldingProxy | None = None
        self.nginx = Nginx(directory / "nginx")
        self.workers: list[ChaosWorker] = []
        self.outbox = outbox
        self.postgres: PostgresServer | None = None
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
        """Start Redis (and PostgreSQL with the outbox schema), the proxy for worker 1's link, the workers, nginx."""
        if self.outbox:
            self.postgres = await asyncio.to_thread(PostgresServer)
            await asyncio.to_thread(self.postgres.start)
            await asyncio.to_thread(self._apply_schema)
            self.env["outbox_dsn"] = self.postgres.dsn
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

    def _apply_schema(self) -> None:
        import psycopg  # the outbox extra; only an outbox run needs it

        assert self.postgres is not None
        with psycopg.connect(self.postgres.dsn, autocommit=True) as connection:
            connection.execute(OUTBOX_SCHEMA.read_text().encode())

    def outbox_rows(self) -> int:
        """Rows still in eva_ws_outbox (blocking)."""
        import psycopg

        assert self.postgres is not None
        with psycopg.connect(self.postgres.dsn, autocommit=True, connect_timeout=5) as connection:
            row = connection.execute("SELECT count(*) FROM eva_ws_outbox").fetchone()
        return int(row[0]) if row else 0

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
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.cleanup)
