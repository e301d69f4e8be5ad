"""Child processes that speak JSON lines (load-generator workers, the publisher) and their pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from bench.histogram import Histogram

STOP_TIMEOUT_S: Final = 10.0


def reply_channel() -> Callable[[dict[str, Any]], None]:
    """In a child: keep the real stdout for replies and point fd 1 at stderr.

    Libraries the child imports (the service's logging, for one) may print to stdout;
    that must never be mistaken for a reply.
    """
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(reply: dict[str, Any]) -> None:
        out.write(json.dumps(reply) + "\n")

    return send


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """Prefix `taskset -c cpus` when pinning is asked for and available."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *argv]
    return list(argv)


class Child:
    """A process that answers one JSON line on stdout for each JSON line on stdin."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._lock = asyncio.Lock()

    @classmethod
    async def spawn(
        cls, name: str, argv: Sequence[str], *, cpus: str | None, env: dict[str, str] | None = None
    ) -> Child:
        proc = await asyncio.create_subprocess_exec(
            *pinned(argv, cpus),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
            # Latency histograms and client lists travel as single lines.
            limit=256 * 1024 * 1024,
        )
        return cls(proc, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def call(self, cmd: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """Send one command and wait (bounded) for its reply."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"{self.name} exited (code {self.proc.returncode}) during {cmd['op']}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def stop(self) -> None:
        """Ask it to exit, then terminate, then kill: never leave it behind."""
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(b'{"op": "exit"}\n')
                await self.proc.stdin.drain()
                self.proc.stdin.close()
        for signal_it in (None, self.proc.terminate, self.proc.kill):
            if signal_it is not None and self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    signal_it()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S / 2)
            if self.proc.returncode is not None:
                return


class LoadGen:
    """Load-generator worker processes, with clients spread over them round-robin."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children

    @classmethod
    async def start(cls, *, processes: int, client: str, cpus: str | None) -> LoadGen:
        children: list[Child] = []
        try:
            for i in range(processes):
                argv = [sys.executable, "-m", "bench.loadgen", "--client", client]
                children.append(await Child.spawn(f"loadgen-{i}", argv, cpus=cpus))
            for child in children:
                await child.call({"op": "ping"}, timeout_s=30.0)
        except BaseException:
            for child in children:
                await child.stop()
            raise
        return cls(children)

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    async def all(self, cmds: Sequence[dict[str, Any]], *, timeout_s: float) -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(
                *(c.call(cmd, timeout_s=timeout_s) for c, cmd in zip(self.children, cmds, strict=True))
            )
        )

    async def broadcast(self, cmd: dict[str, Any], *, timeout_s: float) -> list[dict[str, Any]]:
        return await self.all([cmd] * len(self.children), timeout_s=timeout_s)

    async def connect(
        self,
        *,
        dialect: str,
        base_url: str,
        clients: Sequence[tuple[str, str, bool]],
        concurrency: int,
        timeout_s: float,
        source_ips: Sequence[str],
    ) -> dict[str, Any]:
        """Connect and subscribe `clients` (customer, token, slow); merged counts and handshake times."""
        n = len(self.children)
        shares = [list(clients[i::n]) for i in range(n)]
        cmds = [
            {
                "op": "connect",
                "dialect": dialect,
                "base_url": base_url,
                "clients": share,
                "concurrency": max(1, concurrency // n),
                "timeout_s": timeout_s,
                "source_ips": list(source_ips),
            }
            for share in shares
        ]
        replies = await self.all(cmds, timeout_s=timeout_s * (1 + len(clients) // max(1, concurrency)) + 60)
        handshake = Histogram()
        for r in replies:
            handshake.merge(Histogram.from_json(r["handshake"]))
        return {
            "ok": sum(r["ok"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "elapsed_s": max(r["elapsed_s"] for r in replies),
            "handshake": handshake,
            "errors": [e for r in replies for e in r["errors"]][:5],
        }

    async def drain(self, published: dict[str, int], *, timeout_s: float) -> dict[str, Any]:
        """Wait for every reading client to get what was published; merged counts and latencies."""
        replies = await self.broadcast(
            {"op": "drain", "published": published, "timeout_s": timeout_s}, timeout_s=timeout_s + 30
        )
        latency = Histogram()
        codes: dict[str, int] = {}
        for r in replies:
            latency.merge(Histogram.from_json(r["latency"]))
            for code, count in r["close_codes"].items():
                codes[code] = codes.get(code, 0) + count
        merged: dict[str, Any] = {
            key: sum(r[key] for r in replies)
            for key in ("expected", "unique", "lost", "dups", "gaps", "closed_reading", "closed_slow", "slow_received")
        }
        merged["latency"] = latency
        merged["close_codes"] = codes
        return merged

    async def reset(self) -> None:
        await self.broadcast({"op": "reset"}, timeout_s=30.0)

    async def pause_slow(self) -> int:
        return sum(r["paused"] for r in await self.broadcast({"op": "pause_slow"}, timeout_s=30.0))

    async def resume_slow(self) -> int:
        return sum(r["resumed"] for r in await self.broadcast({"op": "resume_slow"}, timeout_s=30.0))

    async def close_all(self) -> None:
        await self.broadcast({"op": "close", "timeout_s": 20.0}, timeout_s=60.0)

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.children))
