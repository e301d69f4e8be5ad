"""One client socket's output side: the bounded outbox, coalesced writes, and how it is closed.

This is the hot path of the fan-out. The hub hands every recipient the same pre-built
wire frame (service/frames.py); a connection queues it without blocking, and one flush
per event-loop turn (the `Flusher`) writes everything each client has queued in one
`transport.write`. A client just written in a long round (a busy fan-out) waits a little
before its next write, so one syscall carries every frame it got meanwhile: the cost per
delivery drops with the rate while the added latency stays bounded. Only a client whose
socket buffer is full gets a task, which waits for the buffer to drain; while it waits,
frames pile up in the bounded outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final, Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from service import metrics
from service.auth import Principal
from service.deadlines import Deadlines, Slot
from service.frames import PING, text_frame
from service.log import get_logger
from service.outbox import Outbox
from service.protocol import CloseCode

log = get_logger("eva_ws.connection")

# A close handshake with a client that does not read must not hold the pod's resources.
CLOSE_TIMEOUT_S: Final = 2.0
# Above this many unsent bytes in the transport, stop writing and wait for the client to read
# (asyncio's own high-water mark, where it pauses the protocol).
WRITE_HIGH_WATER_BYTES: Final = 64 * 1024
# A connection written in a round that took d waits until this many times d after the round
# ended before its next write (capped by the write window): a pod spends at most about a third
# of its time in such rounds, the rest stays free for reading events and clients.
BATCHING_FACTOR: Final = 2.0
# Shorter pauses are not taken: below the event loop's timer resolution (uvloop counts whole
# milliseconds), and a round that short holds no write worth batching.
_MIN_PAUSE_S: Final = 0.0005


class FlushRound:
    """One round of writes by the Flusher; see Flusher for how it holds its connections back."""

    __slots__ = ("hold_until",)

    def __init__(self) -> None:
        # perf_counter time before which its connections are not written again; 0: no hold.
        self.hold_until = 0.0


class Flushable(Protocol):
    # The round that last wrote it (None: none yet); set by the Flusher.
    flush_round: FlushRound | None

    def flush(self) -> None:
        """Write whatever is queued; called by the Flusher once per `add`."""


class Flusher:
    """Writes every connection with queued frames in rounds, shared by a pod's connections.

    A connection is written on the next loop turn, unless the round that last wrote it was
    long: it then waits until `BATCHING_FACTOR` times that round's duration after the round
    ended, never more than `window_s`. A client of a busy fan-out (a round to a thousand
    clients takes milliseconds) thus gets every frame of that pause in one write (one syscall
    for several deliveries, at most `window_s` of added latency), while an event for a client
    that was not just written, or whose last round was short, goes out at once. 0 writes
    every connection on the next turn.
    """

    __slots__ = ("_held", "_held_handle", "_soon", "_soon_handle", "_window_s")

    def __init__(self, *, window_s: float) -> None:
        self._window_s = window_s
        # Connections for the next loop turn, and those waiting out their last round's pause.
        self._soon: list[Flushable] = []
        self._soon_handle: asyncio.Handle | None = None
        self._held: list[Flushable] = []
        self._held_handle: asyncio.Handle | None = None

    def add(self, conn: Flushable) -> None:
        last = conn.flush_round
        if last is not None and last.hold_until:
            wait_s = last.hold_until - time.perf_counter()
            if wait_s > 0:
                self._held.append(conn)
                if self._held_handle is None:
                    # Held connections come from the same long round, or from one after it: the
                    # first one's time serves all (a later one is at most written a little early).
                    self._held_handle = asyncio.get_running_loop().call_later(wait_s, self._write_held)
                return
        self._soon.append(conn)
        if self._soon_handle is None:
            self._soon_handle = asyncio.get_running_loop().call_soon(self._write_soon)

    def _write_soon(self) -> None:
        self._soon_handle = None
        dirty, self._soon = self._soon, []
        self._write(dirty)

    def _write_held(self) -> None:
        self._held_handle = None
        dirty, self._held = self._held, []
        self._write(dirty)

    def _write(self, dirty: list[Flushable]) -> None:
        this_round = FlushRound()
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds, and a round
        # to a few sockets takes microseconds.
        started = time.perf_counter()
        for conn in dirty:
            conn.flush_round = this_round
            conn.flush()
        ended = time.perf_counter()
        # The pause counts from the end: events that came in during a long round should wait
        # for the next one, not trigger it.
        pause_s = min(self._window_s, (ended - started) * BATCHING_FACTOR)
        if pause_s >= _MIN_PAUSE_S:
            this_round.hold_until = ended + pause_s


class Connection:
    """Frames are queued without blocking and written by the event loop in batches.

    A client whose outbox overflows is closed with 4008 (slow consumer): it never slows
    the fan-out to others, and it resumes from its offsets when it reconnects.

    The heartbeat: a client silent for `heartbeat_s` gets a PING; if it stays silent for
    half that again, its socket is dropped (1006, `heartbeat_missed`). Any frame from the
    client counts as a sign of life, as in aiohttp's own heartbeat, which this replaces to
    run on the pod's one `Deadlines` timer instead of two timers per socket.
    """

    __slots__ = (
        "_awaiting_pong",
        "_closing",
        "_deadlines",
        "_drain",
        "_flush_scheduled",
        "_flusher",
        "_heartbeat_s",
        "_loop",
        "_outbox",
        "_stream",
        "close_code",
        "conn_id",
        "deadline_slot",
        "flush_round",
        "heartbeat_missed",
        "last_seen",
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
        stream: AbstractStreamWriter | None,
        flusher: Flusher,
        deadlines: Deadlines,
        heartbeat_s: float | None,
    ) -> None:
        """`heartbeat_s` None: no heartbeat."""
        self.ws = ws
        self.conn_id = conn_id
        self.principal = principal
        self.transport = transport
        self.opened_at = time.monotonic()
        self.close_code: CloseCode | None = None
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._flusher = flusher
        self._outbox = Outbox(send_queue_size)
        self._flush_scheduled = False
        self.flush_round: FlushRound | None = None
        self._drain: asyncio.Task[None] | None = None
        self._closing = False
        self._deadlines = deadlines
        self._heartbeat_s = heartbeat_s
        self._awaiting_pong = False
        self.heartbeat_missed = False
        self.deadline_slot: Slot | None = None
        # Loop time of the last frame from the client.
        self.last_seen = self._loop.time()
        if heartbeat_s is not None:
            deadlines.schedule(self, self.last_seen + heartbeat_s)

    @property
    def closing(self) -> bool:
        return self._closing

    def enqueue(self, frame: bytes, conflation_key: str | None = None) -> None:
        """Queue one wire frame (see frames.text_frame); never blocks. See Outbox for overflow."""
        if self._closing:
            return
        if not self._outbox.put(frame, conflation_key):
            log.warning("slow_consumer_closed", conn_id=self.conn_id, user_id=self.principal.user_id)
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        if not self._flush_scheduled and self._drain is None:
            self._flush_scheduled = True
            self._flusher.add(self)

    def send(self, payload: bytes, kind: str) -> None:
        """Queue a reply (ack, error, pong) and count it."""
        metrics.MESSAGES_SENT.labels(kind).inc()
        self.enqueue(text_frame(payload))

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

    def heard(self) -> None:
        """The client sent a frame: it is alive."""
        self.last_seen = self._loop.time()
        self._awaiting_pong = False

    def on_deadline(self) -> None:
        """The heartbeat (see the class): called by `Deadlines`."""
        transport, heartbeat_s = self.transport, self._heartbeat_s
        if self._closing or heartbeat_s is None or transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if self._awaiting_pong:
            # No close handshake with a peer that does not answer: drop the socket, as aiohttp did.
            self._closing = True
            self.heartbeat_missed = True
            transport.abort()
            return
        quiet_until = self.last_seen + heartbeat_s
        if now < quiet_until:
            self._deadlines.schedule(self, quiet_until)
            return
        # Control frames may go between any two messages; no need to wait for the outbox.
        transport.write(PING)
        self._awaiting_pong = True
        self._deadlines.schedule(self, now + heartbeat_s / 2)

    async def stop(self) -> None:
        """Stop writing; called once the read loop has ended."""
        self._closing = True
        self._deadlines.cancel(self)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    def flush(self) -> None:
        """Write every queued frame in one go (called by the Flusher, or after a drain)."""
        self._flush_scheduled = False
        transport = self.transport
        if self._closing or transport is None or transport.is_closing():
            return
        frames = self._outbox.pop_all()
        if not frames:
            return
        transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER_BYTES:
            self._drain = asyncio.ensure_future(self._wait_for_drain())

    async def _wait_for_drain(self) -> None:
        try:
            if self._stream is not None:
                await self._stream.drain()
        except ConnectionError:
            return  # the client went away; the read loop sees it too and cleans up
        self._drain = None
        self.flush()

    async def _close(self, code: CloseCode, message: str) -> None:
        if self._drain is not None:
            self._drain.cancel()
        # What was queued before the close decision goes out before the close frame (replies,
        # `rate_limited` errors, events), except a slow consumer's backlog: it is the reason for
        # the close and would hold the close frame back; the client resumes from its offsets.
        if code is not CloseCode.SLOW_CONSUMER:
            self._write_queued()
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
        # The socket ends with the close handshake, at most CLOSE_TIMEOUT_S after the close
        # frame, even for a client that stops reading (see websocket.LingeringClose).

    def _write_queued(self) -> None:
        transport = self.transport
        frames = self._outbox.pop_all()
        if frames and transport is not None and not transport.is_closing():
            transport.write(b"".join(frames))


_closers: set[asyncio.Task[None]] = set()
