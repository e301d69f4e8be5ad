"""One client socket's output side: the bounded outbox, its writer task, and how it is closed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

from aiohttp import WSMsgType, web

from service import metrics
from service.auth import Principal
from service.log import get_logger
from service.outbox import Outbox
from service.protocol import CloseCode

log = get_logger("eva_ws.connection")

# A close handshake with a client that does not read must not hold the pod's resources.
CLOSE_TIMEOUT_S: Final = 2.0


class Connection:
    """Frames are queued without blocking (from the hub's fan-out) and written by one task.

    A client whose outbox overflows is closed with 4008 (slow consumer): it never slows
    the fan-out to others, and it resumes from its offsets when it reconnects.
    """

    __slots__ = (
        "_closing",
        "_outbox",
        "_wakeup",
        "_writer",
        "close_code",
        "conn_id",
        "opened_at",
        "principal",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        conn_id: str,
        principal: Principal,
        send_queue_size: int,
        transport: asyncio.Transport | None,
    ) -> None:
        self.ws = ws
        self.conn_id = conn_id
        self.principal = principal
        self.transport = transport
        self.opened_at = time.monotonic()
        self.close_code: CloseCode | None = None
        self._outbox = Outbox(send_queue_size)
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    def start(self) -> None:
        self._writer = asyncio.ensure_future(self._write_loop())

    def enqueue(self, frame: bytes, conflation_key: str | None = None) -> None:
        """Queue one encoded text frame; never blocks. See Outbox for the overflow policy."""
        if self._closing:
            return
        before = self._outbox.conflated
        if not self._outbox.put(frame, conflation_key):
            log.warning("slow_consumer_closed", conn_id=self.conn_id, user_id=self.principal.user_id)
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        if self._outbox.conflated != before:
            metrics.EVENTS_CONFLATED.inc()
        self._wakeup.set()

    def send(self, frame: bytes, kind: str) -> None:
        """Queue a reply (ack, error, pong) and count it."""
        metrics.MESSAGES_SENT.labels(kind).inc()
        self.enqueue(frame)

    def close_soon(self, code: CloseCode, message: str) -> None:
        """Close from synchronous code (the fan-out, timers); the read loop then ends."""
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        task = asyncio.ensure_future(self._close(code, message))
        # Keep a reference until done so the close cannot be garbage-collected mid-way.
        _closers.add(task)
        task.add_done_callback(_closers.discard)

    async def close(self, code: CloseCode, message: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        await self._close(code, message)

    async def stop(self) -> None:
        """Stop the writer; called once the read loop has ended."""
        self._closing = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def _close(self, code: CloseCode, message: str) -> None:
        if self._writer is not None:
            self._writer.cancel()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code=code, message=message.encode())
        except asyncio.CancelledError:
            # aiohttp cancels a close whose write waits on a paused transport; only a
            # cancellation of this task itself must propagate.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        if self.transport is None:
            return
        if not self.transport.is_closing():
            self.transport.abort()
        else:
            # A graceful close waits for the client to read what is buffered; a client
            # that stopped reading would hold the socket forever.
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self.transport.abort)

    async def _write_loop(self) -> None:
        ws, outbox, wakeup = self.ws, self._outbox, self._wakeup
        try:
            while True:
                await wakeup.wait()
                wakeup.clear()
                for frame in outbox.pop_all():
                    # Blocks only when the socket buffer is full; the outbox keeps filling meanwhile.
                    await ws.send_frame(frame, WSMsgType.TEXT)
        except ConnectionError:
            # The client went away; the read loop sees it too and cleans up.
            return


_closers: set[asyncio.Task[None]] = set()
