"""A real PostgreSQL server on a free loopback port in a temporary directory: started, killed, restarted."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from fleet.ports import free_port

START_DEADLINE_S: Final = 60.0
# Debian's postgresql package keeps the server binaries out of PATH, one directory per major version.
BIN_DIRS: Final = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
# initdb and postgres refuse to run as root: as root they run as this user.
SERVER_USER: Final = "postgres"


def server_binary(name: str) -> str:
    """Path of a PostgreSQL server program (initdb, postgres, pg_isready) of the newest installed major."""
    for directory in reversed(BIN_DIRS):
        path = Path(directory) / name
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package")
    return found


class PostgresServer:
    """One postgres process on 127.0.0.1:<port>, its cluster and log in a fresh temporary directory.

    Trust authentication on loopback only; fsync off (a kill -9 of the server loses nothing
    committed, only an operating-system crash would). `dsn` connects as the superuser `postgres`.
    """

    def __init__(self) -> None:
        self.port = free_port()
        # Not under the caller's temporary directory: pytest's is private to root, and the
        # server runs as another user that must reach its own files.
        self.directory = Path(tempfile.mkdtemp(prefix="eva-ws-postgres-"))
        self.data = self.directory / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self._user = SERVER_USER if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._run(
            [server_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        )  # fmt: skip

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not running"
        return self.process.pid

    def _run(self, args: list[str]) -> None:
        result = subprocess.run(args, user=self._user, capture_output=True, text=True, timeout=START_DEADLINE_S)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()}")

    def start(self) -> None:
        """Start the server (recovering after a kill) and return once it accepts connections."""
        assert self.process is None, "already running"
        with (self.directory / "postgres.log").open("ab") as log:
            self.process = subprocess.Popen(
                self._server_args(),
                user=self._user,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}; see {self.directory}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres on port {self.port} did not accept connections")
            time.sleep(0.05)

    def _server_args(self) -> list[str]:
        return [
            server_binary("postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.directory}",
            "-c", "fsync=off",
            "-c", "max_connections=200",
        ]  # fmt: skip

    def _accepts(self) -> bool:
        isready = [server_binary("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-d", "postgres"]
        return subprocess.run(isready, check=False, timeout=START_DEADLINE_S).returncode == 0

    def kill(self) -> None:
        """kill -9 of the postmaster: clients see their connections reset; the next start recovers."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=START_DEADLINE_S)
        # Its backends exit once they notice the postmaster is gone; a new one cannot start before.
        deadline = time.monotonic() + START_DEADLINE_S
        while self._backends_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _backends_alive(self) -> bool:
        pid_file = self.data / "postmaster.pid"
        return pid_file.exists() and _attached_processes(self.data) > 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open transactions roll back."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=START_DEADLINE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _attached_processes(data: Path) -> int:
    # Backends keep the data directory as their working directory until they exit.
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "cwd") == str(data):
                    count += 1
            except OSError:
                continue
    return count
