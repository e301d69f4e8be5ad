"""A client that behaves like a real frontend: reconnects with backoff and full jitter, resumes, dedupes by offset.

It connects through the load balancer with ?customerId= as the routing key, subscribes, and
records every event. After any close except 1000 it reconnects (exponential backoff, full
jitter) and subscribes again with `since` = the last offset it handled per subscription.
What the tests assert on is counted here: duplicates (an offset not above the last one),
gaps (an offset more than one above it), unrecovered resumes and `resync` messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

EVENT_TYPES: Final = frozenset(
    {
        "transaction_update",
        "transaction_new",
        "transaction_delete",
        "stage_change",
        "user_update",
        "notification",
    }
)
NORMAL_CLOSURE: Final = 1000
# Subscribe errors worth asking again on the same socket (as the browser client does); others are final.
RETRYABLE_SUBSCRIBE_ERRORS: Final = frozenset({"unavailable", "rate_limited", "internal_error"})


@dataclass
class Stream:
    """What one subscription has seen."""

    offset: int | None = None
    epoch: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class ResumingClient:
    """One simulated browser tab; `start()` it, await `subscribed`, and `stop()` it at the end."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ws_url: str,
        token: str,
        *,
        routing_key: str,
        subscriptions: list[dict[str, Any]],
        base_backoff_s: float = 0.1,
        max_backoff_s: float = 3.0,
        name: str = "",
    ) -> None:
        self.session = session
        self.ws_url = ws_url
        self.token = token
        self.routing_key = routing_key
        self.requests = subscriptions
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.name = name or routing_key
        self.streams: dict[str, Stream] = {}
        self.duplicates = 0
        self.gaps = 0
        self.unrecovered = 0
        self.resyncs = 0
        self.errors: list[dict[str, Any]] = []
        self.close_codes: list[int | None] = []
        # Monotonic times at which all subscriptions were acknowledged on a connection.
        self.subscribed_at: list[float] = []
        self.closed_at: list[float] = []
        self.subscribed = asyncio.Event()
        self.finished = False
        self._stopping = False
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what tests read -----------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self.subscribed_at)

    def events(self, subscription: str) -> list[dict[str, Any]]:
        stream = self.streams.get(subscription)
        return [] if stream is None else stream.events

    def event_ids(self, subscription: str) -> set[str]:
        return {e["data"]["id"] for e in self.events(subscription)}

    def all_events(self) -> list[dict[str, Any]]:
        return [e for s in self.streams.values() for e in s.events]

    # -- life ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Close with 1000, as a user leaving the page."""
        self._stopping = True
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                await self._ws.close(code=NORMAL_CLOSURE)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _backoff_s(self, attempt: int) -> float:
        # Full jitter: uniform over [0, capped exponential], so a crowd spreads out.
        return random.uniform(0, min(self.max_backoff_s, self.base_backoff_s * 2**attempt))

    async def _run(self) -> None:
        attempt = 0
        connects = 0
        while not self._stopping:
            url = f"{self.ws_url}?customerId={self.routing_key}&token={self.token}"
            if connects:
                url += f"&reconnect={connects}"
            try:
                ws = await self.session.ws_connect(url, autoping=True, timeout=aiohttp.ClientWSTimeout(ws_close=5))
            except (TimeoutError, aiohttp.ClientError, OSError):
                await asyncio.sleep(self._backoff_s(attempt))
                attempt += 1
                continue
            connects += 1
            self._ws = ws
            try:
                if await self._session(ws):
                    attempt = 0
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            finally:
                self.subscribed.clear()
                self.closed_at.append(time.monotonic())
                self.close_codes.append(ws.close_code)
                if not ws.closed:
                    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                        await ws.close()
            if ws.close_code == NORMAL_CLOSURE or self._stopping:
                break
            await asyncio.sleep(self._backoff_s(attempt))
            attempt += 1
        self.finished = True

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """One connection: subscribe (resuming), then handle messages until it closes; True if it got subscribed."""
        pending = set()
        for index in range(len(self.requests)):
            pending.add(str(index))
            await ws.send_json(self._subscribe_message(index))
        retries: set[asyncio.Task[None]] = set()
        try:
            return await self._receive(ws, pending, retries)
        finally:
            for task in retries:
                task.cancel()

    def _subscribe_message(self, index: int) -> dict[str, Any]:
        """The subscribe for request `index`, resuming from the last position handled if there is one."""
        request = self.requests[index]
        message = {**request, "type": "subscribe", "correlationId": str(index)}
        key = request.get("subscription")
        stream = self.streams.get(key) if key else None
        if stream is not None and stream.offset is not None and stream.epoch is not None:
            message["since"] = {"offset": stream.offset, "epoch": stream.epoch}
        message.pop("subscription", None)
        return message

    async def _subscribe_later(self, ws: aiohttp.ClientWebSocketResponse, index: int) -> None:
        await asyncio.sleep(max(0.2, self._backoff_s(2)))
        with contextlib.suppress(aiohttp.ClientError, ConnectionError, RuntimeError):
            await ws.send_json(self._subscribe_message(index))

    async def _receive(
        self, ws: aiohttp.ClientWebSocketResponse, pending: set[str], retries: set[asyncio.Task[None]]
    ) -> bool:
        acknowledged = False
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                continue
            message = frame.json()
            kind = message.get("type")
            if kind in EVENT_TYPES:
                self._on_event(message)
            elif kind == "subscribed":
                self._on_subscribed(message)
                pending.discard(message.get("correlationId"))
                if not pending and not acknowledged:
                    acknowledged = True
                    self.subscribed_at.append(time.monotonic())
                    self.subscribed.set()
            elif kind == "resync":
                self.resyncs += 1
                stream = self.streams.setdefault(message["subscription"], Stream())
                stream.offset, stream.epoch = message["position"]["offset"], message["position"]["epoch"]
            elif kind == "error":
                self.errors.append(message)
                correlation = message.get("correlationId")
                if correlation in pending and message.get("code") in RETRYABLE_SUBSCRIBE_ERRORS:
                    # Refused for a while (Redis restarting): without asking again, the stream stays dead.
                    retries.add(asyncio.ensure_future(self._subscribe_later(ws, int(correlation))))
        return acknowledged

    def _on_subscribed(self, message: dict[str, Any]) -> None:
        key = message["subscription"]
        # The ack's correlationId is the request's index: two subscriptions may share a channel.
        index = message.get("correlationId")
        if isinstance(index, str) and index.isdigit() and int(index) < len(self.requests):
            self.requests[int(index)]["subscription"] = key
        stream = self.streams.setdefault(key, Stream())
        position = message["position"]
        if "recovered" in message and not message["recovered"]:
            self.unrecovered += 1
        if stream.offset is None or message.get("recovered") is False:
            stream.offset, stream.epoch = position["offset"], position["epoch"]

    def _on_event(self, message: dict[str, Any]) -> None:
        stream = self.streams.setdefault(message["subscription"], Stream())
        offset, epoch = message["offset"], message["epoch"]
        if stream.epoch is not None and epoch != stream.epoch:
            # A new epoch without a resync: history was lost under us.
            self.gaps += 1
        elif stream.offset is not None:
            if offset <= stream.offset:
                self.duplicates += 1
                return
            if offset > stream.offset + 1:
                self.gaps += offset - stream.offset - 1
        stream.offset, stream.epoch = offset, epoch
        stream.events.append(message)
