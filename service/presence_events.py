"""presence_join / presence_leave: each pod announces its sockets' opens and closes per customer, through the broker.

A socket that opens or closes is announced on the broker channel `#presence:<customerId>`
of each customer presence lists it under, as the very message subscribers get. A pod
listens on that channel only while one of its clients subscribed to the customer's
`transactions` with `"presence": true` (see Hub).

On one Redis the presence write announces itself: the script that writes a batch of adds and
removes (RedisPresence) also PUBLISHes their messages, live only, which Redis drops when nobody
listens; announcing costs the pod no round trip and Redis no history. On a Redis Cluster a
script reaches only its own slot, so announcements go through the broker's publish (offset and
history, like any channel's event) after the write; in this process (no Redis) only to
channels this pod listens to. Those leave the socket's handler at once: they go through one
bounded queue per pod, written in batches, in the order the sockets opened and closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Final

from service import messages, metrics
from service.broker.base import Broker, BrokerUnavailable
from service.broker.memory import MemoryBroker
from service.broker.redis import RedisBroker
from service.log import get_logger
from service.presence import Presence, PresenceEntry
from service.presence_redis import Announcement, RedisPresence
from service.protocol import iso_utc, utc_now_iso

log = get_logger("eva_ws.presence_events")

# No client can subscribe to it: "#" is not allowed in an id.
CHANNEL_PREFIX: Final = "#presence:"
# Sockets opened or closed whose announcements wait to be published. A full queue drops new
# ones (logged, counted): presence itself stays right, and a watcher that needs certainty
# reads GET /api/v1/presence.
MAX_PENDING: Final = 10_000
# Sockets per publish batch: one pipelined round trip for their announcements.
BATCH: Final = 500
# How long close() waits for the writer to stop: a shutdown must not hang on an announcement.
CLOSE_TIMEOUT_S: Final = 5.0


def channel_of(customer_id: str) -> str:
    return CHANNEL_PREFIX + customer_id


def customer_of(channel: str) -> str:
    return channel.removeprefix(CHANNEL_PREFIX)


class AnnouncingPresence(Presence):
    """A Presence that also announces each add (`presence_join`) and remove (`presence_leave`).

    See Presence for the contract; announcements follow a write that succeeded, never one that raised.
    """

    def __init__(self, inner: Presence, broker: Broker, *, watched_here: Callable[[str], bool]) -> None:
        """`watched_here(channel)`: whether this pod listens to an announcement channel (Hub.listens)."""
        self._inner = inner
        self._broker = broker
        # The embedded broker is one process: an announcement this pod does not listen to
        # reaches nobody, so it is not made (it would cost each socket some 20 µs of CPU).
        self._only_if_watched: Callable[[str], bool] | None = watched_here if isinstance(broker, MemoryBroker) else None
        # One Redis: the presence write publishes the announcements (see the module's docstring).
        self._in_writes: tuple[RedisPresence, RedisBroker] | None = None
        if isinstance(inner, RedisPresence) and inner.announces and isinstance(broker, RedisBroker):
            self._in_writes = (inner, broker)
        # What is announced at a remove: the entry of the add (the remove names only the id).
        self._entries: dict[str, PresenceEntry] = {}
        # One item per socket opened or closed; encoded by the writer, off the socket's handler.
        self._queue: asyncio.Queue[tuple[str, Sequence[str], PresenceEntry]] = asyncio.Queue(MAX_PENDING)
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._inner.start()
        self._writer = asyncio.create_task(self._write_forever(), name="presence-announcements")

    async def add(self, customer_ids: Sequence[str], entry: PresenceEntry) -> None:
        if self._in_writes is not None:
            store, broker = self._in_writes
            announcements = _live_messages(broker, "presence_join", customer_ids, entry)
            await store.add(customer_ids, entry, announcements=announcements)
            self._entries[entry.conn_id] = entry
            metrics.PRESENCE_ANNOUNCEMENTS.labels("published").inc(len(announcements))
            return
        await self._inner.add(customer_ids, entry)
        self._entries[entry.conn_id] = entry
        self._announce("presence_join", customer_ids, entry)

    async def remove(self, customer_ids: Sequence[str], conn_id: str) -> None:
        entry = self._entries.pop(conn_id, None)
        if self._in_writes is not None and entry is not None:
            store, broker = self._in_writes
            announcements = _live_messages(broker, "presence_leave", customer_ids, entry)
            await store.remove(customer_ids, conn_id, announcements=announcements)
            metrics.PRESENCE_ANNOUNCEMENTS.labels("published").inc(len(announcements))
            return
        await self._inner.remove(customer_ids, conn_id)
        if entry is not None:
            self._announce("presence_leave", customer_ids, entry)

    async def list(self, customer_id: str) -> list[PresenceEntry]:
        return await self._inner.list(customer_id)

    async def count(self, customer_id: str) -> int:
        return await self._inner.count(customer_id)

    async def close(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
            # Bounded: a writer that does not stop (a cancellation lost in a client library)
            # must not keep the pod from shutting down.
            done, _ = await asyncio.wait([writer], timeout=CLOSE_TIMEOUT_S)
            if not done:
                log.warning("presence_announcements_writer_not_stopped", timeout_s=CLOSE_TIMEOUT_S)
            elif not writer.cancelled() and (error := writer.exception()) is not None:
                raise error
        await self._inner.close()

    def _announce(self, kind: str, customer_ids: Sequence[str], entry: PresenceEntry) -> None:
        watched = self._only_if_watched
        if watched is not None:
            customer_ids = [c for c in customer_ids if watched(channel_of(c))]
        if not customer_ids:
            return
        try:
            self._queue.put_nowait((kind, customer_ids, entry))
        except asyncio.QueueFull:
            metrics.PRESENCE_ANNOUNCEMENTS.labels("dropped").inc(len(customer_ids))
            log.warning("presence_announcement_dropped", kind=kind, conn_id=entry.conn_id)

    async def _write_forever(self) -> None:
        while True:
            sockets = [await self._queue.get()]
            while len(sockets) < BATCH and not self._queue.empty():
                sockets.append(self._queue.get_nowait())
            # Formatting times costs more than the rest of a message: once per batch and per socket.
            timestamp = utc_now_iso()
            batch: list[tuple[str, bytes]] = []
            for kind, customer_ids, entry in sockets:
                connected_at = iso_utc(entry.connected_at)
                batch.extend(
                    (channel_of(c), messages.presence(kind, c, entry, connected_at=connected_at, timestamp=timestamp))
                    for c in customer_ids
                )
            try:
                await self._broker.publish_many(batch)
            except BrokerUnavailable as error:
                # Not retried: a late join or leave would mislead more than a missing one.
                metrics.PRESENCE_ANNOUNCEMENTS.labels("lost").inc(len(batch))
                log.warning("presence_announcements_lost", count=len(batch), error=str(error))
            else:
                metrics.PRESENCE_ANNOUNCEMENTS.labels("published").inc(len(batch))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled (by close) during the publish, which still returned: on a Redis
                # Cluster the command client can swallow the CancelledError. Waiting for the
                # next socket instead would keep close() waiting.
                raise asyncio.CancelledError


def _live_messages(
    broker: RedisBroker, kind: str, customer_ids: Sequence[str], entry: PresenceEntry
) -> list[Announcement]:
    """Per customer, the PUBLISH that announces `entry`'s join or leave on one Redis."""
    connected_at, timestamp = iso_utc(entry.connected_at), utc_now_iso()
    return [
        broker.live_message(
            channel_of(c), messages.presence(kind, c, entry, connected_at=connected_at, timestamp=timestamp)
        )
        for c in customer_ids
    ]
