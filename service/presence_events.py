"""presence_join / presence_leave: each pod announces its sockets' opens and closes per customer, through the broker.

A socket that opens or closes is announced on the broker channel `#presence:<customerId>`
of each customer presence lists it under, as the very message subscribers get. A pod
listens on that channel only while one of its clients subscribed to the customer's
`transactions` with `"presence": true` (see Hub), so announcements nobody watches cost one
publish each and no delivery. Announcements leave the socket's handler at once: they go
through one bounded queue per pod, written in batches, in the order the sockets opened and
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Final

from service import metrics
from service.broker.base import Broker, BrokerUnavailable
from service.log import get_logger
from service.presence import Presence, PresenceEntry
from service.protocol import Channel, encode, iso_utc, subscription_key, utc_now_iso

log = get_logger("eva_ws.presence_events")

# No client can subscribe to it: "#" is not allowed in an id.
CHANNEL_PREFIX: Final = "#presence:"
# Announcements waiting to be published. A full queue drops new ones (logged): presence
# itself stays right, and a watcher that needs certainty reads GET /api/v1/presence.
MAX_PENDING: Final = 10_000
# Announcements per publish batch: one pipelined round trip.
BATCH: Final = 500


def channel_of(customer_id: str) -> str:
    return CHANNEL_PREFIX + customer_id


def customer_of(channel: str) -> str:
    return channel.removeprefix(CHANNEL_PREFIX)


def announcement(kind: str, customer_id: str, entry: PresenceEntry) -> bytes:
    """The `presence_join` or `presence_leave` message as its subscribers get it."""
    return encode(
        {
            "type": kind,
            "channel": Channel.TRANSACTIONS.value,
            "subscription": subscription_key(Channel.TRANSACTIONS, customer_id),
            "customerId": customer_id,
            "connId": entry.conn_id,
            "userId": entry.user_id,
            "podId": entry.pod_id,
            "connectedAt": iso_utc(entry.connected_at),
            "timestamp": utc_now_iso(),
        }
    )


class AnnouncingPresence(Presence):
    """A Presence that also announces each add (`presence_join`) and remove (`presence_leave`).

    See Presence for the contract; announcements follow a write that succeeded, never one that raised.
    """

    def __init__(self, inner: Presence, broker: Broker) -> None:
        self._inner = inner
        self._broker = broker
        # What is announced at a remove: the entry of the add (the remove names only the id).
        self._entries: dict[str, PresenceEntry] = {}
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_PENDING)
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._inner.start()
        self._writer = asyncio.create_task(self._write_forever(), name="presence-announcements")

    async def add(self, customer_ids: Sequence[str], entry: PresenceEntry) -> None:
        await self._inner.add(customer_ids, entry)
        self._entries[entry.conn_id] = entry
        self._announce("presence_join", customer_ids, entry)

    async def remove(self, customer_ids: Sequence[str], conn_id: str) -> None:
        entry = self._entries.pop(conn_id, None)
        await self._inner.remove(customer_ids, conn_id)
        if entry is not None:
            self._announce("presence_leave", customer_ids, entry)

    async def list(self, customer_id: str) -> list[PresenceEntry]:
        return await self._inner.list(customer_id)

    async def count(self, customer_id: str) -> int:
        return await self._inner.count(customer_id)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._inner.close()

    def _announce(self, kind: str, customer_ids: Sequence[str], entry: PresenceEntry) -> None:
        for index, customer_id in enumerate(customer_ids):
            try:
                self._queue.put_nowait((channel_of(customer_id), announcement(kind, customer_id, entry)))
            except asyncio.QueueFull:
                metrics.PRESENCE_ANNOUNCEMENTS.labels("dropped").inc(len(customer_ids) - index)
                log.warning("presence_announcement_dropped", kind=kind, conn_id=entry.conn_id)
                return

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._broker.publish_many(batch)
            except BrokerUnavailable as error:
                # Not retried: a late join or leave would mislead more than a missing one.
                metrics.PRESENCE_ANNOUNCEMENTS.labels("lost").inc(len(batch))
                log.warning("presence_announcements_lost", count=len(batch), error=str(error))
            else:
                metrics.PRESENCE_ANNOUNCEMENTS.labels("published").inc(len(batch))
