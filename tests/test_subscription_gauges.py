"""Counts kept off the per-event and per-subscribe paths still read exactly at scrape time."""

from __future__ import annotations

import asyncio

from fleet.redis_server import RedisServer
from service import metrics
from service.broker.memory import MemoryBroker
from service.hub import Hub
from service.protocol import Filters
from tests.broker_contract import new_channel, start_broker
from tests.test_broker_redis import redis_factory
from tests.test_hub import Inbox, _publish, _settle


def scraped(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    assert value is not None, name
    return value


def subscriptions(which: str) -> tuple[float, float]:
    """(client, internal) of eva_ws_broker_subscriptions_<which>."""
    name = f"eva_ws_broker_subscriptions_{which}"
    return scraped(name, kind="client"), scraped(name, kind="internal")


async def test_subscription_gauges_count_each_kind_at_every_scrape(redis_server: RedisServer) -> None:
    started = await start_broker(redis_factory(redis_server))
    broker = started.broker
    try:
        clients = [new_channel() for _ in range(30)]
        await asyncio.gather(*(broker.subscribe(c) for c in [*clients, "#control", "#presence:C1"]))
        assert subscriptions("wanted") == (30, 2)
        assert subscriptions("actual") == (30, 2)

        await asyncio.gather(*(broker.unsubscribe(c) for c in [*clients[:10], "#presence:C1"]))
        assert subscriptions("wanted") == (20, 1)
        assert subscriptions("actual") == (20, 1)
    finally:
        await broker.close()
    assert subscriptions("actual") == (0, 0)
    assert subscriptions("wanted") == (20, 1)


async def test_events_queued_to_clients_are_counted_by_type() -> None:
    broker = MemoryBroker()
    hub = Hub(broker)
    inboxes = [Inbox() for _ in range(3)]
    for inbox in inboxes:
        await hub.subscribe(inbox, "transactions:C1", Filters(customer_id="C1"), since=None, on_ready=lambda *_: None)
    await _settle()
    before = scraped("eva_ws_messages_sent_total", type="transaction_new")

    await _publish(broker, 5)
    await _settle()

    assert [len(inbox.offsets()) for inbox in inboxes] == [5, 5, 5]
    assert scraped("eva_ws_messages_sent_total", type="transaction_new") - before == 15
    await hub.close()
