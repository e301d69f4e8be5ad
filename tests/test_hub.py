"""The hub's delivery guarantees: exactly once, in order, gaps healed from history, resync when lost."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from service.broker.base import Envelope, Position
from service.broker.memory import MemoryBroker
from service.frames import text_frame
from service.hub import Hub, SubscribeResult, Subscription, Versions
from service.protocol import Filters
from service.publisher import prepare_event
from tests.test_frames import payload_of


class LossyBroker(MemoryBroker):
    """The in-process broker, except that chosen live deliveries are lost, as Redis pub/sub can lose them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drop_offsets: set[int] = set()
        self.deliver = True

    async def publish(self, channel: str, payload: bytes, *, idempotency_key: str | None = None) -> Position:
        handler = self._on_message

        def lossy(envelope: Envelope) -> None:
            if self.deliver and envelope.offset not in self.drop_offsets:
                handler(envelope)

        self._on_message = lossy
        try:
            return await super().publish(channel, payload, idempotency_key=idempotency_key)
        finally:
            self._on_message = handler

    def reset_history(self) -> None:
        """What a Redis restart without persistence does: history and offsets are gone."""
        self._streams.clear()
        self._epoch = "new-epoch"


class Inbox:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def enqueue(self, frame: bytes, conflation_key: str | None = None) -> None:
        self.frames.append(orjson.loads(payload_of(frame)))

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.frames if "offset" in f]


async def _publish(broker: MemoryBroker, n: int, customer: str = "C1", start: int = 0) -> None:
    for i in range(start, start + n):
        event = prepare_event("transaction_new", {"id": f"T{i}", "customerId": customer})
        await broker.publish(event.subscription, event.payload)


async def _subscribe(hub: Hub, inbox: Inbox, since: Position | None = None) -> tuple[Subscription, SubscribeResult]:
    results: list[SubscribeResult] = []

    def on_ready(sub: Subscription, result: SubscribeResult) -> None:
        results.append(result)
        inbox.enqueue(text_frame(orjson.dumps({"type": "subscribed", "recovered": result.recovered})))

    sub = await hub.subscribe(inbox, "transactions:C1", Filters(customer_id="C1"), since=since, on_ready=on_ready)
    return sub, results[0]


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_lost_live_events_are_healed_from_history_in_order():
    broker = LossyBroker()
    await broker.start()
    hub = Hub(broker)
    inbox = Inbox()
    await _subscribe(hub, inbox)
    broker.drop_offsets = {2, 3, 7}
    await _publish(broker, 10)
    await _settle()
    assert inbox.offsets() == list(range(1, 11))


async def test_reconnect_catch_up_delivers_what_was_published_while_deaf():
    broker = LossyBroker()
    await broker.start()
    hub = Hub(broker)
    inbox = Inbox()
    await _subscribe(hub, inbox)
    await _publish(broker, 2)
    broker.deliver = False
    await _publish(broker, 3, start=2)
    broker.deliver = True
    hub.on_resubscribed(["transactions:C1"])
    await _settle()
    assert inbox.offsets() == [1, 2, 3, 4, 5]


async def test_history_reset_sends_resync_and_continues_from_the_new_epoch():
    broker = LossyBroker()
    await broker.start()
    hub = Hub(broker)
    inbox = Inbox()
    await _subscribe(hub, inbox)
    await _publish(broker, 3)
    broker.reset_history()
    await _publish(broker, 2, start=3)
    await _settle()
    kinds = [f["type"] for f in inbox.frames]
    assert kinds.count("resync") == 1
    after = inbox.frames[kinds.index("resync") :]
    assert after[0]["position"]["epoch"] == "new-epoch"
    assert [f["offset"] for f in after[1:]] == [i for i in (1, 2) if i > after[0]["position"]["offset"]]


async def test_resume_while_publishing_has_no_gap_and_no_duplicate():
    broker = MemoryBroker()
    await broker.start()
    hub = Hub(broker)
    first = Inbox()
    await _subscribe(hub, first)  # keeps the channel live while the second one resumes
    await _publish(broker, 20)
    epoch = (await broker.history("transactions:C1", None)).position.epoch

    async def keep_publishing() -> None:
        for i in range(200):
            await _publish(broker, 1, start=100 + i)
            await asyncio.sleep(0)

    publisher = asyncio.ensure_future(keep_publishing())
    second = Inbox()
    _, result = await _subscribe(hub, second, since=Position(5, epoch))
    await publisher
    await _settle()
    assert result.recovered is True
    assert second.offsets() == list(range(6, 221))
    assert first.offsets() == list(range(1, 221))


async def test_last_unsubscribe_releases_the_broker_channel():
    broker = MemoryBroker()
    await broker.start()
    hub = Hub(broker)
    a, _ = await _subscribe(hub, Inbox())
    b, _ = await _subscribe(hub, Inbox())
    assert broker.subscribed_channels == {"transactions:C1"}
    await hub.unsubscribe(a)
    assert broker.subscribed_channels == {"transactions:C1"}
    await hub.unsubscribe(b)
    assert broker.subscribed_channels == frozenset()
    assert hub.channels == frozenset()


async def test_a_foreign_malformed_message_is_dropped_and_later_events_flow():
    broker = MemoryBroker()
    await broker.start()
    hub = Hub(broker)
    inbox = Inbox()
    await _subscribe(hub, inbox)
    await broker.publish("transactions:C1", b"\xff not json")
    await broker.publish("transactions:C1", orjson.dumps({"type": "transaction_new", "data": 5}))
    await _publish(broker, 1)
    await _settle()
    assert inbox.offsets() == [3]


def test_versions_forget_the_least_recently_changed_transaction_first() -> None:
    versions = Versions()
    for i in range(1000):
        assert versions.is_current(f"t{i}", "n:5")
    assert versions.is_current("t0", "n:6")  # changed again: now the most recently changed
    assert versions.is_current("t1000", "n:5")  # one over the bound: t1 is forgotten, not t0
    assert not versions.is_current("t0", "n:1")
    assert versions.is_current("t1", "n:1")
