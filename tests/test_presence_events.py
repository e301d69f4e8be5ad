"""presence_join / presence_leave on the embedded broker: delivered to who asked, not made for nobody."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from service import presence_events
from service.broker.base import Position
from service.broker.memory import MemoryBroker
from service.broker.state import StateChange
from service.presence import MemoryPresence, PresenceEntry
from service.presence_events import AnnouncingPresence
from tests.conftest import connect, make_settings, metric_value, receive_type, subscribe, token_for

PUBLISHED = 'eva_ws_presence_announcements_total{outcome="published"}'


async def published(client: Any) -> float:
    async with client.get("/metrics") as response:
        return metric_value(await response.text(), PUBLISHED)


async def test_only_sockets_of_a_watched_customer_are_announced_on_the_embedded_broker(app_client: Any) -> None:
    settings = make_settings()
    client = await app_client(settings)
    before = await published(client)
    unwatched = await connect(client, token_for(settings, sub="nobody-watches", customers=["C2"]))
    await unwatched.close()

    watcher = await connect(client, token_for(settings, sub="watcher", customers=["C1"]))
    ack = await subscribe(watcher, filters={"customerId": "C1"}, presence=True)
    assert ack["presence"] is True
    visitor = await connect(client, token_for(settings, sub="visitor", customers=["C1", "C2"]))
    joined = await receive_type(watcher, "presence_join")
    assert (joined["userId"], joined["customerId"], joined["podId"]) == ("visitor", "C1", settings.pod_id)
    await visitor.close()
    left = await receive_type(watcher, "presence_leave")
    assert left["connId"] == joined["connId"]
    # The visitor's join and leave for C1; nothing for C2, which nobody here watches.
    assert await published(client) - before == 2

    # Once the last watcher is gone, the pod stops announcing C1 too.
    await watcher.send_json({"type": "unsubscribe", "channel": "transactions", "filters": {"customerId": "C1"}})
    await receive_type(watcher, "unsubscribed")
    late = await connect(client, token_for(settings, sub="late", customers=["C1"]))
    await late.close()
    await watcher.send_json({"type": "ping"})
    await receive_type(watcher, "pong")
    assert await published(client) - before == 2
    await watcher.close()


class _CancelLosingBroker(MemoryBroker):
    """Its publish returns normally when cancelled, as a client library that loses the cancellation."""

    def __init__(self, *, forever: bool = False) -> None:
        super().__init__()
        self.publishing = asyncio.Event()
        self.forever = forever
        self.writer: asyncio.Task[Any] | None = None

    async def publish_many(
        self,
        items: Iterable[tuple[str, bytes]],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        states: Sequence[StateChange | None] | None = None,
    ) -> list[Position]:
        self.publishing.set()
        self.writer = asyncio.current_task()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not self.forever:
                    return []


async def _announcing_while_publishing(broker: _CancelLosingBroker) -> AnnouncingPresence:
    presence = AnnouncingPresence(MemoryPresence(), broker, watched_here=lambda channel: True)
    await presence.start()
    await presence.add(["C1"], PresenceEntry(conn_id="c1", user_id="u1", pod_id="p1", connected_at=0.0))
    await asyncio.wait_for(broker.publishing.wait(), 5)
    return presence


async def test_close_stops_the_writer_even_if_its_publish_loses_the_cancellation() -> None:
    # On a Redis Cluster a publish in flight at shutdown could return normally after the
    # cancellation: the writer then waited for the next socket and close() for the writer.
    presence = await _announcing_while_publishing(_CancelLosingBroker())
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(presence.close(), 10)
    # Not after close()'s bound: the writer stopped once its publish returned.
    assert asyncio.get_running_loop().time() - started < presence_events.CLOSE_TIMEOUT_S / 2


async def test_close_gives_up_on_a_writer_that_never_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presence_events, "CLOSE_TIMEOUT_S", 0.1)
    broker = _CancelLosingBroker(forever=True)
    presence = await _announcing_while_publishing(broker)
    await asyncio.wait_for(presence.close(), 5)
    # Not left running past the test.
    assert broker.writer is not None
    assert not broker.writer.done()
    broker.forever = False
    broker.writer.cancel()
    await asyncio.wait([broker.writer], timeout=5)
    assert broker.writer.done()
