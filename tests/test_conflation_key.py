"""Conflation drops a transaction update only for a newer update of the same transaction on the same channel."""

from __future__ import annotations

import orjson

from service.broker.memory import MemoryBroker
from service.hub import Hub, SubscribeResult, Subscription
from service.outbox import Outbox
from service.protocol import Filters
from service.publisher import prepare_event
from tests.test_frames import payload_of
from tests.test_hub import _settle


class KeyedInbox:
    """A recipient that keeps what the hub handed over, conflation key included."""

    def __init__(self) -> None:
        self.queued: list[tuple[bytes, str | None]] = []

    def enqueue(self, frame: bytes, conflation_key: str | None = None) -> None:
        self.queued.append((frame, conflation_key))


def _ignore(sub: Subscription, result: SubscribeResult) -> None:
    return None


async def test_ids_with_a_bar_do_not_make_two_transactions_share_a_conflation_key():
    # "transactions:C1|X" + "Y" and "transactions:C1" + "X|Y" joined with "|" read alike.
    broker = MemoryBroker()
    await broker.start()
    hub = Hub(broker)
    inbox = KeyedInbox()
    for customer in ("C1|X", "C1"):
        channel = f"transactions:{customer}"
        await hub.subscribe(inbox, channel, Filters(customer_id=customer), since=None, on_ready=_ignore)
    for txn_id, customer in (("Y", "C1|X"), ("X|Y", "C1")):
        event = prepare_event("transaction_update", {"id": txn_id, "customerId": customer, "status": "approved"})
        await broker.publish(event.subscription, event.payload)
    await _settle()
    assert len(inbox.queued) == 2
    keys = [key for _, key in inbox.queued]
    assert None not in keys
    assert keys[0] != keys[1]

    # What a backed-up client would get: both updates, since neither supersedes the other.
    outbox = Outbox(capacity=10)
    for frame, key in inbox.queued:
        outbox.put(frame, key)
    delivered = [orjson.loads(payload_of(frame))["data"]["id"] for frame in outbox.pop_all()]
    assert delivered == ["Y", "X|Y"]


async def test_a_newer_update_of_the_same_transaction_still_supersedes_the_older():
    broker = MemoryBroker()
    await broker.start()
    hub = Hub(broker)
    inbox = KeyedInbox()
    await hub.subscribe(inbox, "transactions:C1", Filters(customer_id="C1"), since=None, on_ready=_ignore)
    for status in ("pending", "approved"):
        event = prepare_event("transaction_update", {"id": "A|B", "customerId": "C1", "status": status})
        await broker.publish(event.subscription, event.payload)
    await _settle()
    outbox = Outbox(capacity=10)
    for frame, key in inbox.queued:
        outbox.put(frame, key)
    delivered = [orjson.loads(payload_of(frame))["data"]["status"] for frame in outbox.pop_all()]
    assert delivered == ["approved"]
