"""nginx in front of the workers, configured from deploy/nginx/eva-ws.conf.template as in production.

It runs with its own prefix directory, config and pid file, never touching a system nginx.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from fleet import ROOT
from fleet.ports import free_port

TEMPLATE: Final = ROOT / "deploy" / "nginx" / "eva-ws.conf.template"
NGINX: Final = shutil.which("nginx") or "/usr/sbin/nginx"
START_DEADLINE_S: Final = 20.0

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
