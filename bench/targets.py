"""The systems under test and how to start, probe and stop each one (plus the Redis they share)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.dialects import DialectName
from bench.peers.auth import SECRET_ENV
from bench.workers import pinned
from fleet.ports import free_port
from fleet.redis_server import RedisServer

ROOT: Final = Path(__file__).resolve().parent.parent
NODE_DIR: Final = ROOT / ".cache" / "bench-node"
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Target:
    """One system under test."""

    name: str
    dialect: DialectName
    # Publisher sink kind (see bench.publisher.make_sink).
    sink: str
    description: str
    # Path answering 200 once the server can take subscriptions; None: an accepted TCP connection is enough.
    ready_path: str | None = None
    needs_node: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int, redis_url: str) -> list[str]:
        if self.name == "eva-ws":
            return [str(Path(sys.executable).with_name("eva-ws")), "serve"]
        if self.name == "raw-aiohttp":
            return [sys.executable, "-m", "bench.peers.raw_aiohttp", "--port", str(port), "--redis-url", redis_url]
        if self.name == "python-socketio":
            return [sys.executable, "-m", "bench.peers.python_socketio", "--port", str(port), "--redis-url", redis_url]
        if self.name == "node-socketio":
            server_js = str(ROOT / "bench" / "peers" / "node" / "server.js")
            return ["node", server_js, "--port", str(port), "--redis-url", redis_url]
        raise ValueError(self.name)

    def env(self, port: int, redis_url: str, secret: str) -> dict[str, str]:
        env = {SECRET_ENV: secret, **self.extra_env}
        if self.name == "eva-ws":
            env |= {
                "EVA_WS_MODE": "development",
                "EVA_WS_HOST": "127.0.0.1",
                "EVA_WS_PORT": str(port),
                "EVA_WS_REDIS_URL": redis_url,
                "EVA_WS_JWT_SECRET": secret,
                "EVA_WS_LOG_LEVEL": "warning",
                # The demo publisher would add its own events to the measured CPU time.
                "EVA_WS_DEMO_PUBLISHER": "false",
                # Graceful drain (readiness off, then spread-out closes) is for rolling deploys;
                # here it would only add ten seconds to every stop.
                "EVA_WS_DRAIN_DELAY_S": "0",
                "EVA_WS_DRAIN_SPREAD_S": "0",
            }
        if self.needs_node:
            env["NODE_PATH"] = str(NODE_DIR / "node_modules")
            env["NODE_ENV"] = "production"
        return env

    def available(self) -> str | None:
        """Why this target cannot run here, or None."""
        if self.needs_node:
            if shutil.which("node") is None:
                return "node is not installed"
            if not (NODE_DIR / "node_modules" / "socket.io").is_dir():
                return f"socket.io is not installed in {NODE_DIR} (scripts/bench installs it)"
        if self.name == "eva-ws" and not Path(sys.executable).with_name("eva-ws").exists():
            return "the eva-ws console script is not installed in this virtualenv"
        return None


TARGETS: Final[dict[str, Target]] = {
    t.name: t
    for t in (
        Target(
            "eva-ws",
            "eva-ws",
            "eva-ws",
            "eva-ws serve (aiohttp, Redis broker with offsets and history)",
            ready_path="/readyz",
        ),
        Target(
            "python-socketio",
            "socketio",
            "python-socketio",
            "python-socketio AsyncServer on aiohttp + AsyncRedisManager",
        ),
        Target(
            "node-socketio",
            "socketio",
            "node",
            "Node.js Socket.IO 4 + @socket.io/redis-adapter",
            needs_node=True,
        ),
        Target(
            "raw-aiohttp",
            "raw",
            "raw",
            "raw aiohttp fan-out, one pre-built frame per event (reference)",
        ),
    )
}


@dataclass(slots=True)
class Running:
    """A started process with its pid (taskset execs, so the pid is the server's own)."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


async def _stop(proc: asyncio.subprocess.Process) -> None:
    for signal_it in (proc.terminate, proc.kill):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal_it()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        if proc.returncode is not None:
            return


async def _wait_ready(running: Running, path: str | None) -> None:
    """Bounded wait for the port (and the readiness path) to answer; fail fast if the process died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if running.proc.returncode is not None:
            raise RuntimeError(f"{running.name} exited with {running.proc.returncode}:\n{running.log_tail()}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            if path is None:
                return
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            status = await asyncio.wait_for(reader.readline(), 5.0)
            if b" 200 " in status:
                return
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{running.name} not ready after {START_TIMEOUT_S:.0f}s:\n{running.log_tail()}")


@contextlib.asynccontextmanager
async def run_process(
    name: str,
    argv: list[str],
    *,
    port: int,
    cpus: str | None,
    env: dict[str, str],
    ready_path: str | None,
    log_dir: Path,
) -> AsyncIterator[Running]:
    """Start a server, wait until it answers, yield it, and always stop it."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *pinned(argv, cpus),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            # Only the settings given here: a stray EVA_WS_* in the caller's shell must not change a run.
            env={**{k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")}, **env},
            cwd=str(ROOT),
        )
    running = Running(name, proc, port, log_path)
    try:
        await _wait_ready(running, ready_path)
        yield running
    finally:
        await _stop(proc)


@contextlib.asynccontextmanager
async def redis_server(*, cpus: str | None, log_dir: Path) -> AsyncIterator[RedisServer]:
    """A throw-away redis-server on a free loopback port, no persistence; its log in `log_dir`/redis/."""
    server = RedisServer(log_dir / "redis", launcher=pinned([], cpus), extra_args=["--maxclients", "1000"])
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def start_target(
    target: Target, *, redis_url: str, secret: str, cpus: str | None, log_dir: Path
) -> AsyncIterator[Running]:
    port = free_port()
    async with run_process(
        target.name,
        target.command(port, redis_url),
        port=port,
        cpus=cpus,
        env=target.env(port, redis_url, secret),
        ready_path=target.ready_path,
        log_dir=log_dir,
    ) as running:
        yield running
