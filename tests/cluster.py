"""A cluster of real parts on loopback: one redis-server, N eva-ws workers and nginx hashing ?customerId= onto them.

Used by the tests (tests/test_cluster_*.py), by `scripts/cluster up|down|status` (tests/cluster_cli.py)
and by `scripts/bench-drain`. nginx runs with its own prefix directory, config and pid file, never
touching a system nginx; its config is deploy/nginx/eva-ws.conf.template, rendered as in production.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.process import ServiceProcess, free_port
from tests.redis_server import RedisServer

ROOT: Final = Path(__file__).resolve().parent.parent
TEMPLATE: Final = ROOT / "deploy" / "nginx" / "eva-ws.conf.template"
NGINX: Final = shutil.which("nginx") or "/usr/sbin/nginx"
START_DEADLINE_S: Final = 20.0

# Short drains keep tests and local restarts quick; production keeps the 5 s defaults.
WORKER_DEFAULTS: Final = {"drain_delay_s": "1", "drain_spread_s": "1"}

# The template's server logs its requests (without the query string) to stdout, which
# goes to {directory}/stdout.log.
_NGINX_CONF: Final = """\
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 8192; }}
http {{
    client_body_temp_path {directory}/temp/client_body;
    proxy_temp_path {directory}/temp/proxy;
    fastcgi_temp_path {directory}/temp/fastcgi;
    uwsgi_temp_path {directory}/temp/uwsgi;
    scgi_temp_path {directory}/temp/scgi;
    # Tells a caller which configuration answered, so a reload can be awaited instead of guessed.
    add_header X-Eva-Lb-Generation {generation} always;
    include {directory}/eva-ws.conf;
}}
"""


def render_template(listen_port: int, upstream_ports: list[int]) -> str:
    """deploy/nginx/eva-ws.conf.template with its two placeholders filled in, as envsubst would."""
    upstreams = " ".join(f"server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in upstream_ports)
    text = TEMPLATE.read_text()
    return text.replace("${EVA_LB_LISTEN_PORT}", f"127.0.0.1:{listen_port}").replace("${EVA_LB_UPSTREAMS}", upstreams)


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class Nginx:
    """One nginx master (not daemonized) with its prefix, config and pid file under `directory`."""

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.generation = 0
        self.upstream_ports: list[int] = []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.directory / "nginx.conf"

    def _render(self, upstream_ports: list[int]) -> None:
        self.generation += 1
        self.upstream_ports = list(upstream_ports)
        (self.directory / "temp").mkdir(parents=True, exist_ok=True)
        (self.directory / "eva-ws.conf").write_text(render_template(self.port, upstream_ports))
        self.conf_path.write_text(_NGINX_CONF.format(directory=self.directory, generation=self.generation))

    def _command(self, *extra: str) -> list[str]:
        error_log = str(self.directory / "error.log")
        return [NGINX, "-p", str(self.directory), "-c", str(self.conf_path), "-e", error_log, *extra]

    def start(self, upstream_ports: list[int], *, new_session: bool = False) -> None:
        assert self.process is None, "already running"
        self._render(upstream_ports)
        check = subprocess.run(self._command("-t", "-q"), capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused its configuration:\n{check.stderr}")
        with (self.directory / "stdout.log").open("ab") as log:
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session
            )
        self._wait_generation()

    def reload(self, upstream_ports: list[int]) -> None:
        """Point nginx at a new list of workers; returns once the new configuration answers."""
        self._render(upstream_ports)
        subprocess.run(self._command("-s", "reload"), capture_output=True, check=True)
        self._wait_generation()

    def _wait_generation(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}; see {self.directory}/error.log")
            try:
                status, headers, _ = http_get(f"{self.url}/lb-healthz", timeout_s=1.0)
                if status == 200 and headers.get("X-Eva-Lb-Generation") == str(self.generation):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not serve configuration {self.generation}; see {self.directory}/error.log")

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL if the master does not go."""
        process = self.process
        self.process = None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
        self.directory = directory
        self.secret = secret
        self.worker_env = {**WORKER_DEFAULTS, **(worker_env or {})}
        self.redis = RedisServer(self._mkdir("redis"))
        self.nginx = Nginx(self._mkdir("nginx"))
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
