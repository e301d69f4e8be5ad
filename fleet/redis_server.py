"""A real redis-server on a free loopback port: started, stopped, killed, paused and restarted there."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from fleet.ports import free_port

REDIS_SERVER: Final = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI: Final = shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_DEADLINE_S: Final = 30.0
# Short enough that a killed cluster master is flagged failed quickly, long enough for a loaded CI box.
CLUSTER_NODE_TIMEOUT_MS: Final = 2000


class RedisServer:
    """One redis-server process on 127.0.0.1:<port>, with its log (and any data) in `directory`.

    `persistent` turns on an fsync-always AOF, so every acknowledged write survives kill -9.
    `cluster` starts a cluster-enabled node (see fleet.redis_cluster); its nodes.conf survives a
    restart, so it rejoins with its slots. `launcher` runs the server under another command
    (`["taskset", "-c", "1"]`, which execs, so `pid` stays the server's); `extra_args` are more
    redis-server options.
    """

    def __init__(
        self,
        directory: Path,
        *,
        persistent: bool = False,
        cluster: bool = False,
        launcher: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.port = free_port()
        # Explicit, because the default bus port (port + 10000) overflows for ports above 55535.
        self.bus_port = free_port() if cluster else None
        self.persistent = persistent
        self.launcher = list(launcher)
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not running"
        return self.process.pid

    @property
    def unix_socket(self) -> Path:
        # Short and fixed: unix socket paths are limited to about 100 bytes.
        return Path(tempfile.gettempdir()) / f"eva-ws-redis-{self.port}.sock"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_socket}"

    def _args(self) -> list[str]:
        args = [
            *self.launcher,
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
        ]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.bus_port is not None:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-port", str(self.bus_port),
                "--cluster-config-file", str(self.directory / f"nodes-{self.port}.conf"),
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
            ]  # fmt: skip
        return args + self.extra_args

    def start(self) -> None:
        """Start the server and return once it answers PING."""
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._answers_ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        """One redis-cli command against this server; its raw reply, or '' if the server is unreachable."""
        result = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args], capture_output=True, text=True, timeout=START_DEADLINE_S
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    def node_id(self) -> str:
        """This cluster node's id (CLUSTER MYID)."""
        return self.cli("CLUSTER", "MYID")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM): clients see their connections closed."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """kill -9: no shutdown, sockets reset by the kernel."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts TCP connections but nothing answers (a half-open peer)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            os.kill(process.pid, sig)
            try:
                process.wait(timeout=START_DEADLINE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.unix_socket.unlink(missing_ok=True)
