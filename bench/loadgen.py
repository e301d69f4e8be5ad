"""Load-generator worker: holds many WebSocket clients and measures what reaches them.

Run as ``python -m bench.loadgen --client picows|aiohttp``. The controller (bench.workers)
writes one JSON command per line on stdin and reads one JSON reply per line on stdout.

Every client subscribes to one customer channel. An event is recognised by its
``"seq":N,"ts":T`` mark; its latency is receive time minus T. Per client the highest
sequence number seen so far tells duplicates (or reordering) from new events, and
expected minus distinct events received is what was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import uvloop

from bench.dialects import DIALECTS, Dialect
from bench.histogram import Histogram
from bench.payload import parse_mark, parse_mark_str
from bench.workers import reply_channel

ClientKind = Literal["picows", "aiohttp"]

# A stopped reader should stall its server quickly, not after megabytes of kernel buffer.
SLOW_RCVBUF_BYTES: Final = 4096
MAX_ERRORS_REPORTED: Final = 5


class Client:
    """One WebSocket client and what it has seen."""

    __slots__ = (
        "close_code",
        "closed",
        "customer",
        "dups",
        "gaps",
        "handle",
        "last_seq",
        "slow",
        "slow_received",
        "subscribed",
        "token",
        "unique",
    )

    def __init__(self, customer: str, token: str, *, slow: bool) -> None:
        self.customer = customer
        self.token = token
        self.slow = slow
        self.last_seq = 0
        self.unique = 0
        self.dups = 0
        self.gaps = 0
        self.slow_received = 0
        self.closed = False
        self.close_code: int | None = None
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The library's connection object (picows WSTransport or aiohttp ClientWebSocketResponse).
        self.handle: Any = None


class Worker:
    """All clients of this process, the counters they share and the commands that drive them."""

    def __init__(self, kind: ClientKind) -> None:
        self.kind = kind
        self.clients: list[Client] = []
        self.latency = Histogram()
        self.unique_total = 0
        self.target = 0
        self.drained = asyncio.Event()
        self.dialect: Dialect = DIALECTS["eva-ws"]
        self.base_url = ""
        self._aiohttp: Any = None
        self._readers: set[asyncio.Task[None]] = set()

    # -- the hot path -------------------------------------------------------------------

    def on_event(self, client: Client, seq: int, ts_us: int) -> None:
        if client.slow:
            client.slow_received += 1
            return
        self.latency.record(time.time_ns() // 1000 - ts_us)
        if seq > client.last_seq:
            client.gaps += seq - client.last_seq - 1
            client.last_seq = seq
            client.unique += 1
            self.unique_total += 1
            # Equal, not at least: set once when the drain's target is reached, not on every event.
            if self.unique_total == self.target:
                self.drained.set()
        else:
            client.dups += 1

    def on_control(self, client: Client, frame: bytes) -> bytes | None:
        reply = self.dialect.on_control(frame, client.token, client.customer)
        if not client.subscribed.done():
            if reply.error is not None:
                client.subscribed.set_exception(ConnectionRefusedError(reply.error))
            elif reply.subscribed:
                client.subscribed.set_result(None)
        return reply.send

    def on_closed(self, client: Client, code: int | None) -> None:
        client.closed = True
        client.close_code = code
        if not client.subscribed.done():
            client.subscribed.set_exception(ConnectionResetError(f"closed before subscribing ({code})"))

    # -- commands -----------------------------------------------------------------------

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open, authenticate and subscribe every listed client; report handshake times."""
        self.dialect = DIALECTS[cmd["dialect"]]
        self.base_url = cmd["base_url"]
        source_ips: list[str] = cmd.get("source_ips") or ["127.0.0.1"]
        timeout_s = float(cmd["timeout_s"])
        gate = asyncio.Semaphore(int(cmd["concurrency"]))
        handshakes = Histogram()
        errors: list[str] = []
        fresh = [Client(customer, token, slow=bool(slow)) for customer, token, slow in cmd["clients"]]
        self.clients.extend(fresh)

        async def one(index: int, client: Client) -> bool:
            async with gate:
                started = time.perf_counter()
                try:
                    await asyncio.wait_for(self._open(client, source_ips[index % len(source_ips)]), timeout_s)
                except (OSError, TimeoutError, ValueError, RuntimeError) as exc:
                    # picows raises WSError subclasses of RuntimeError; aiohttp raises OSError/ValueError kinds.
                    if len(errors) < MAX_ERRORS_REPORTED:
                        stage = "subscribe" if client.handle is not None else "connect"
                        errors.append(f"{stage}: {type(exc).__name__}: {exc}"[:300])
                    if client.handle is not None and self.kind == "picows":
                        client.handle.disconnect()
                    return False
                handshakes.record(int((time.perf_counter() - started) * 1e6))
                return True

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i, c) for i, c in enumerate(fresh)))
        elapsed_s = time.perf_counter() - started
        # Long-lived client state need not be scanned by every full collection: a gen-2 pass
        # over tens of thousands of clients would show up as latency the server did not cause.
        gc.freeze()
        return {
            "ok": sum(results),
            "failed": len(results) - sum(results),
            "elapsed_s": elapsed_s,
            "handshake": handshakes.to_json(),
            "errors": errors,
        }

    def reset(self) -> dict[str, Any]:
        """Start a new latency window (counters of lost and duplicated events keep running)."""
        self.latency = Histogram()
        return {"reset": True}

    async def drain(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait until every reading client has every published event (or the timeout); report."""
        published: dict[str, int] = cmd["published"]
        expected = sum(published.get(c.customer, 0) for c in self.clients if not c.slow)
        self.target = expected
        if self.unique_total >= expected:
            self.drained.set()
        else:
            self.drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), float(cmd["timeout_s"]))
        reading = [c for c in self.clients if not c.slow]
        codes: dict[str, int] = {}
        for c in self.clients:
            if c.closed:
                codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        return {
            "expected": expected,
            "unique": self.unique_total,
            "lost": max(0, expected - self.unique_total),
            "dups": sum(c.dups for c in reading),
            "gaps": sum(c.gaps for c in reading),
            "latency": self.latency.to_json(),
            "closed_reading": sum(1 for c in reading if c.closed),
            "closed_slow": sum(1 for c in self.clients if c.slow and c.closed),
            "close_codes": codes,
            "slow_received": sum(c.slow_received for c in self.clients if c.slow),
        }

    def pause_slow(self) -> dict[str, Any]:
        """Slow clients stop reading; their kernel receive buffer is cut so the server feels it soon."""
        if self.kind != "picows":
            raise RuntimeError("slow consumers need the picows client")
        paused = 0
        for c in self.clients:
            if c.slow and not c.closed and c.handle is not None:
                raw = c.handle.underlying_transport
                sock = raw.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF_BYTES)
                raw.pause_reading()
                paused += 1
        return {"paused": paused}

    def resume_slow(self) -> dict[str, Any]:
        """Stalled clients read again, so a close the server sent them (e.g. 4008) is seen and counted."""
        resumed = 0
        for c in self.clients:
            if c.slow and not c.closed and c.handle is not None:
                c.handle.underlying_transport.resume_reading()
                resumed += 1
        return {"resumed": resumed}

    async def close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Close every client (bounded wait), forget them and zero the counters."""
        timeout_s = float(cmd.get("timeout_s", 10.0))
        waits: list[Awaitable[Any]] = []
        for c in self.clients:
            if c.handle is None or c.closed:
                continue
            if self.kind == "picows":
                c.handle.disconnect()
                waits.append(c.handle.wait_disconnected())
            else:
                waits.append(c.handle.close())
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout_s)
        for task in list(self._readers):
            task.cancel()
        closed = len(self.clients)
        self.clients = []
        gc.unfreeze()
        self.unique_total = 0
        self.target = 0
        self.latency = Histogram()
        return {"closed": closed}

    async def shutdown(self) -> None:
        await self.close({"timeout_s": 5.0})
        if self._aiohttp is not None:
            for session in self._aiohttp.values():
                await session.close()

    # -- transports ---------------------------------------------------------------------

    async def _open(self, client: Client, source_ip: str) -> None:
        url = self.dialect.url(self.base_url, client.token, client.customer)
        if self.kind == "picows":
            await self._open_picows(client, url, source_ip)
        else:
            await self._open_aiohttp(client, url, source_ip)
        await client.subscribed

    async def _open_picows(self, client: Client, url: str, source_ip: str) -> None:
        # Installed in the bench virtualenv only (bench/requirements.txt).
        from picows import WSListener, WSMsgType, ws_connect  # type: ignore[import-not-found,unused-ignore]

        worker = self
        dialect = self.dialect
        text, close = WSMsgType.TEXT, WSMsgType.CLOSE

        class Listener(WSListener):  # type: ignore[misc,unused-ignore]  # WSListener is Any without picows
            def on_ws_connected(self, transport: Any) -> None:
                client.handle = transport
                first = dialect.on_open(client.token, client.customer)
                if first is not None:
                    transport.send(WSMsgType.TEXT, first)

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                kind = frame.msg_type
                if kind == text:
                    mark = parse_mark(frame.get_payload_as_memoryview())
                    if mark is not None:
                        worker.on_event(client, mark[0], mark[1])
                        return
                    answer = worker.on_control(client, frame.get_payload_as_bytes())
                    if answer is not None:
                        transport.send(WSMsgType.TEXT, answer)
                elif kind == close:
                    client.close_code = int(frame.get_close_code())
                    transport.send_close(frame.get_close_code())
                    transport.disconnect()

            def on_ws_disconnected(self, transport: Any) -> None:
                worker.on_closed(client, client.close_code)

        await ws_connect(Listener, url, local_addr=(source_ip, 0), websocket_handshake_timeout=None)

    async def _open_aiohttp(self, client: Client, url: str, source_ip: str) -> None:
        import aiohttp

        if self._aiohttp is None:
            self._aiohttp = {}
        session = self._aiohttp.get(source_ip)
        if session is None:
            connector = aiohttp.TCPConnector(limit=0, local_addr=(source_ip, 0))
            session = self._aiohttp[source_ip] = aiohttp.ClientSession(connector=connector)
        ws = await session.ws_connect(url, autoping=True, compress=0, max_msg_size=0)
        client.handle = ws
        first = self.dialect.on_open(client.token, client.customer)
        if first is not None:
            await ws.send_str(first.decode())
        task = asyncio.create_task(self._read_aiohttp(client, ws))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read_aiohttp(self, client: Client, ws: Any) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            mark = parse_mark_str(msg.data)
            if mark is not None:
                self.on_event(client, mark[0], mark[1])
                continue
            answer = self.on_control(client, msg.data.encode())
            if answer is not None:
                await ws.send_str(answer.decode())
        self.on_closed(client, ws.close_code)


async def serve(kind: ClientKind) -> None:
    """Answer commands from stdin until `exit` or end of input."""
    worker = Worker(kind)
    send = reply_channel()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=256 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
        "connect": worker.connect,
        "drain": worker.drain,
        "close": worker.close,
    }
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "exit":
                break
            if op == "reset":
                reply = worker.reset()
            elif op == "pause_slow":
                reply = worker.pause_slow()
            elif op == "resume_slow":
                reply = worker.resume_slow()
            elif op == "ping":
                reply = {"pong": True}
            else:
                reply = await handlers[op](cmd)
            send(reply)
    finally:
        await worker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=["picows", "aiohttp"], default="picows")
    args = parser.parse_args()
    uvloop.run(serve(args.client))


if __name__ == "__main__":
    main()
