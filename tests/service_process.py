"""A real `python -m service serve` process on a free port, for tests that need a whole server."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

from service.auth import mint_token
from service.config import load_settings

ROOT: Final = Path(__file__).resolve().parent.parent
DEV_SECRET: Final = "browser-test-secret-" + "y" * 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """Starts, stops and restarts one eva-ws process; the port stays the same across restarts."""

    def __init__(self, log_dir: Path, *, port: int | None = None, **settings: str) -> None:
        self.port = port or free_port()
        self.scheme = "https" if "tls_cert" in settings else "http"
        self.host = "127.0.0.1"
        self.env = {
            "EVA_WS_MODE": "development",
            "EVA_WS_JWT_SECRET": DEV_SECRET,
            "EVA_WS_HOST": self.host,
            "EVA_WS_PORT": str(self.port),
            "EVA_WS_DEMO_PUBLISHER": "false",
            "EVA_WS_ALLOWED_ORIGINS": f"{self.base_url}",
            "EVA_WS_POD_ID": "pod-browser-test",
            # A restart in a test should not wait for a load balancer that is not there.
            "EVA_WS_DRAIN_DELAY_S": "0",
            "EVA_WS_DRAIN_SPREAD_S": "0",
        }
        self.env.update({f"EVA_WS_{k.upper()}": v for k, v in settings.items()})
        self.settings = load_settings(self.env)
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        log = open(self.log_dir / f"service-{self.port}-{self.starts}.log", "wb")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")}
        env.update(self.env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.process.poll() is not None:
                raise AssertionError(f"eva-ws exited with {self.process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise AssertionError(f"eva-ws did not become ready on port {self.port}; see {log.name}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, as Kubernetes does: the service drains (closing sockets with 1012) and exits."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _ready(self) -> bool:
        if self.scheme == "https":
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return True
            except OSError:
                return False
        try:
            with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def token(self, sub: str = "demo-user", customers: list[str] | None = None, ttl_s: int = 3600) -> str:
        customers = ["CUST-001", "CUST-002", "CUST-003"] if customers is None else customers
        return mint_token(self.settings, sub=sub, customers=customers, ttl_s=ttl_s)

    def publisher_token(self) -> str:
        """Minted by the `eva-ws token` command, as a backend operator would."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")}
        env.update(self.env)
        result = subprocess.run(
            [sys.executable, "-m", "service", "token", "--sub", "backend", "--role", "publisher"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    def publish(self, event: dict[str, Any], token: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/api/v1/publish",
            data=json.dumps(event).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        context = None
        if self.settings.tls_cert:
            # The test certificate names the public host; the test reaches it at 127.0.0.1.
            context = ssl.create_default_context(cafile=self.settings.tls_cert)
            context.check_hostname = False
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert response.status == 202, response.status
            result: dict[str, Any] = json.loads(response.read())
            return result
