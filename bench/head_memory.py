"""Resident memory of a real `eva-ws serve` holding request heads: handshakes that never finish, and open sockets.

    .venv/bin/python -m bench.head_memory pending --connections 200
    .venv/bin/python -m bench.head_memory sockets --connections 100

`pending`: each connection sends request-header lines and never the blank line that ends them,
as many bytes as the server takes (`--head-bytes`, default just under the budget, or aiohttp's own
limits when run against a server without one). `sockets`: each connection completes an
authenticated WebSocket upgrade whose head carries `--head-bytes` of extra headers, and stays open
(one upgrade after the other, so that the growth is what open sockets keep).
Prints the server's RSS before and after, and the difference per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Final

from bench.procstat import sample
from fleet.process import ServiceProcess
from service.auth import mint_token
from service.config import load_settings

SECRET: Final = "head-memory-" + "s" * 40
# aiohttp's per-field limit is 8,190 bytes and it takes 128 fields: lines below both, with room for the rest.
LINE_BYTES: Final = 8000
MAX_LINES: Final = 120


def _header_lines(total: int) -> list[bytes]:
    lines: list[bytes] = []
    while total > 0 and len(lines) < MAX_LINES:
        prefix = f"X-Pad-{len(lines):03d}: ".encode()
        size = min(LINE_BYTES, total)
        lines.append(prefix + b"p" * max(1, size - len(prefix) - 2) + b"\r\n")
        total -= size
    return lines


async def _pending(port: int, head_bytes: int) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ws/transactions HTTP/1.1\r\nHost: a\r\n" + b"".join(_header_lines(head_bytes)))
    await writer.drain()
    return writer


async def _socket(port: int, token: str, head_bytes: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /ws/transactions?token={token} HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n".encode()
        + b"".join(_header_lines(head_bytes))
        + b"\r\n"
    )
    status = await reader.readuntil(b"\r\n\r\n")
    if not status.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"the upgrade was refused: {status.decode(errors='replace').splitlines()[0]}")
    return writer


async def _settled_rss(pid: int) -> int:
    """RSS once it has stopped growing: the server reads what was sent at its own pace."""
    previous, stable = sample(pid).rss_bytes, 0
    while stable < 5:
        await asyncio.sleep(0.2)
        now = sample(pid).rss_bytes
        stable = stable + 1 if abs(now - previous) < 64 * 1024 else 0
        previous = now
    return previous


async def measure(mode: str, connections: int, head_bytes: int, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        service = ServiceProcess(Path(directory), jwt_secret=SECRET, handshake_timeout_s="600", **env)
        service.start()
        try:
            assert service.proc is not None
            pid = service.proc.pid
            settings = load_settings({k: v for k, v in service.env.items() if k.startswith("EVA_WS_")})
            before = await _settled_rss(pid)
            started = time.monotonic()
            if mode == "pending":
                writers = await asyncio.gather(*(_pending(service.port, head_bytes) for _ in range(connections)))
            else:
                # One after the other: what a finished handshake freed is reused by the next, so
                # the growth is what the open sockets keep, not the peak of concurrent handshakes.
                tokens = [mint_token(settings, sub=f"user-{i}", customers=["C1"]) for i in range(connections)]
                writers = [await _socket(service.port, token, head_bytes) for token in tokens]
            after = await _settled_rss(pid)
            print(
                f"{mode}: {connections} connections, {head_bytes:,} bytes of headers each "
                f"({time.monotonic() - started:.1f} s): RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, "
                f"{(after - before) / connections / 1024:.1f} KiB per connection"
            )
            for writer in writers:
                writer.close()
        finally:
            service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.head_memory", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["pending", "sockets"])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument(
        "--head-bytes", type=int, default=None, help="header bytes per connection (default: just under the budget)"
    )
    parser.add_argument("--budget", type=int, default=16_384, help="EVA_WS_MAX_REQUEST_HEAD_BYTES; 0 leaves it unset")
    args = parser.parse_args()
    env = {"max_request_head_bytes": str(args.budget)} if args.budget else {}
    # The request line and the fixed headers take about 200 bytes of the budget.
    head_bytes = args.head_bytes if args.head_bytes is not None else max(args.budget - 512, 0) or 1_000_000
    asyncio.run(measure(args.mode, args.connections, head_bytes, env))


if __name__ == "__main__":
    main()
