"""A cluster of real parts on loopback: one redis-server, N eva-ws workers and nginx hashing ?customerId= onto them.

Used by `scripts/cluster up|down|status` (fleet/cluster_cli.py), `scripts/bench-drain` and the
tests (tests/test_cluster_*.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet.nginx import Nginx, http_get
from fleet.process import ServiceProcess
from fleet.redis_server import RedisServer

# Short drains keep tests and local restarts quick; production keeps the 5 s defaults.
WORKER_DEFAULTS: Final = {"drain_delay_s": "1", "drain_spread_s": "1"}


@dataclass
class Worker:
    """One worker slot; `process` is replaced when the worker restarts on the same port."""

    pod_id: str
    process: ServiceProcess

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return self.process.url


class Cluster:
    """Redis + N workers + nginx on free loopback ports, all owned by this object and stopped by `stop()`."""

    def __init__(self, directory: Path, *, secret: str, worker_env: dict[str, str] | None = None) -> None:
        """`worker_env` holds settings without the prefix; `allowed_origins` defaults to the cluster's own URL."""
        self.directory = directory
        self.secret = secret
        self.redis = RedisServer(self._mkdir("redis"))
        self.nginx = Nginx(self._mkdir("nginx"))
        # Pages served by the cluster open their sockets with its URL as Origin: under either loopback name.
        own_origins = f"{self.nginx.url},http://localhost:{self.nginx.port}"
        self.worker_env = {**WORKER_DEFAULTS, "allowed_origins": own_origins, **(worker_env or {})}
        self.workers: list[Worker] = []
        self._next_index = 1

    def _mkdir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        return self.nginx.url

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.nginx.port}/ws/transactions"

    def start(self, workers: int, *, new_session: bool = False) -> Cluster:
        try:
            self.redis.start()
            for _ in range(workers):
                self._start_worker(new_session=new_session)
            self.nginx.start(self.live_ports(), new_session=new_session)
        except BaseException:
            self.stop()
            raise
        return self

    def _new_process(self, pod_id: str, port: int | None = None) -> ServiceProcess:
        return ServiceProcess(
            self._mkdir("workers"),
            port,
            jwt_secret=self.secret,
            redis_url=self.redis.url,
            pod_id=pod_id,
            **self.worker_env,
        )

    def _start_worker(self, *, new_session: bool = False) -> Worker:
        pod_id = f"worker-{self._next_index}"
        self._next_index += 1
        worker = Worker(pod_id, self._new_process(pod_id))
        self.workers.append(worker)
        worker.process.start(new_session=new_session)
        return worker

    def live_ports(self) -> list[int]:
        return [w.port for w in self.workers]

    def add_worker(self) -> Worker:
        """Scale out by one: start a worker, then reload nginx with the longer upstream list."""
        worker = self._start_worker()
        self.nginx.reload(self.live_ports())
        return worker

    def kill_worker(self, worker: Worker) -> None:
        """kill -9; nginx keeps it in the upstream list and skips it on connection errors."""
        worker.process.kill()

    def terminate_worker(self, worker: Worker) -> None:
        """SIGTERM: the worker drains (503 on new upgrades, 1012 closes) and exits."""
        worker.process.terminate()

    def restart_worker(self, worker: Worker) -> None:
        """Start a stopped worker again on the same port and pod id, as a replaced pod would."""
        assert not worker.process.running, "stop the worker first"
        worker.process = self._new_process(worker.pod_id, worker.port)
        worker.process.start()

    def route(self, customer_id: str) -> str | None:
        """The pod id nginx sends this routing key to (via /readyz), None if no worker answered."""
        status, _, body = http_get(f"{self.url}/readyz?customerId={customer_id}")
        if status != 200:
            return None
        pod: str = json.loads(body)["pod"]
        return pod

    def metrics(self, worker: Worker) -> str:
        status, _, body = http_get(f"{worker.url}/metrics")
        assert status == 200, status
        return body.decode()

    def stop(self) -> None:
        """Stop everything this cluster started, workers in parallel (each drains), even after a failure."""
        self.nginx.stop()
        for worker in self.workers:
            worker.process.terminate()
        for worker in self.workers:
            worker.process.stop()
        self.redis.kill()
