"""`eva-ws serve` as a real process on a free loopback port, with its output in a log file."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fleet.ports import free_port


class ServiceProcess:
    """One `eva-ws serve` with its stdout captured to a file.

    Keyword arguments are settings without the prefix (`redis_url="..."` sets EVA_WS_REDIS_URL);
    the caller's own EVA_WS_* variables are not passed on, so a run depends only on its arguments.
    """

    def __init__(self, directory: Path, listen_port: int | None = None, /, *, jwt_secret: str, **env: str) -> None:
        self.port = listen_port or free_port()
        self.log_path = directory / f"service-{self.port}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")},
            "EVA_WS_JWT_SECRET": jwt_secret,
            "EVA_WS_HOST": "127.0.0.1",
            "EVA_WS_PORT": str(self.port),
            "EVA_WS_POD_ID": f"pod-{self.port}",
            "EVA_WS_DEMO_PUBLISHER": "false",
            **{f"EVA_WS_{k.upper()}": v for k, v in env.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if "EVA_WS_TLS_CERT" in self.env else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, *, new_session: bool = False) -> ServiceProcess:
        """Start the process; `new_session` detaches it from the terminal's signals (Ctrl-C)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
            )
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        # A local process, often with a self-signed certificate: only "does it answer" matters here.
        context = ssl._create_unverified_context() if self.scheme == "https" else None  # noqa: S323
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1, context=context) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"service did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM without waiting: the process drains (readiness false, 1012 closes) and exits."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """kill -9: no drain, clients see their sockets reset."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def wait_exited(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)
