"""What the broker tests share: a recorder of deliveries, numbered payloads, and brokers built for a test store."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from service.broker.base import Broker, Envelope, Position
from service.broker.memory import MemoryBroker
from service.broker.redis import RedisBroker
from tests.backends import Store

BrokerFactory = Callable[..., Broker]
"""Builds an unstarted broker; accepts the keywords `history_size`, `idempotency_window_s` and `state_max_items`."""

# Short watchdog, backoff and topology refresh so faults are noticed quickly; correctness never depends on them.
FAST: Final[dict[str, Any]] = {
    "ping_interval_s": 0.2,
    "pong_timeout_s": 1.5,
    "reconnect_min_s": 0.02,
    "reconnect_max_s": 0.5,
    "connect_timeout_s": 1.0,
    "command_timeout_s": 1.0,
}

# Large enough that even approximate trimming (Redis MAXLEN ~ drops whole 100-entry nodes) drops the start.
TRIM_OVERFLOW = 300


@dataclass
class Recorder:
    """The hub's side of the broker: what arrived live and which resubscribe notices came."""

    envelopes: list[Envelope] = field(default_factory=list)
    resubscribed: list[list[str]] = field(default_factory=list)

    def on_message(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def on_resubscribed(self, channels: list[str]) -> None:
        self.resubscribed.append(channels)

    def on(self, channel: str) -> list[Envelope]:
        return [e for e in self.envelopes if e.channel == channel]


@dataclass
class Started:
    broker: Broker
    recorder: Recorder


def new_channel(kind: str = "transactions") -> str:
    return f"{kind}:{uuid.uuid4().hex[:12]}"


def payload(number: int) -> bytes:
    return b'{"type":"transaction_update","n":%d,"text":"\xc3\xa9\xe2\x82\xac"}' % number


async def churn_while_publishing(
    listener: Broker, publisher: Broker, steady: str, events: int
) -> tuple[set[str], list[Position]]:
    """Subscribe and unsubscribe 30 channels at random, 300 times, while `events` go to `steady`.

    `steady` must be subscribed already. Returns the set the listener wants at the end
    (including `steady`) and the positions of the published events.
    """
    pool = [new_channel() for _ in range(30)]
    rng = random.Random(7)
    wanted: set[str] = {steady}

    async def churn() -> None:
        for _ in range(300):
            channel = rng.choice(pool)
            if channel in wanted:
                wanted.discard(channel)
                await listener.unsubscribe(channel)
            else:
                wanted.add(channel)
                await listener.subscribe(channel)

    async def traffic() -> list[Position]:
        return [await publisher.publish(steady, payload(n)) for n in range(1, events + 1)]

    _, positions = await asyncio.gather(churn(), traffic())
    return wanted, positions


async def start_broker(factory: BrokerFactory, **options: object) -> Started:
    broker = factory(**options)
    recorder = Recorder()
    broker.set_handlers(on_message=recorder.on_message, on_resubscribed=recorder.on_resubscribed)
    await broker.start()
    return Started(broker, recorder)


def broker_factory(store: Store, **defaults: Any) -> BrokerFactory:
    """Brokers of one deployment on `store`: the same prefix, each its own pod id; `defaults` are tunables."""

    def make(**options: Any) -> Broker:
        if store.url is None:
            return MemoryBroker(
                history_size=options.get("history_size", 1000),
                idempotency_window_s=options.get("idempotency_window_s", 300),
                state_max_items=options.get("state_max_items", 10_000),
            )
        settings: dict[str, Any] = {
            "url": store.url,
            "prefix": store.prefix,
            "pod_id": f"pod-{uuid.uuid4().hex[:6]}",
            "history_size": 1000,
            "history_ttl_s": 600,
            **FAST,
            **defaults,
            **options,
        }
        if store.topology == "cluster":
            settings.setdefault("topology_refresh_s", 1.0)
        return RedisBroker(**settings)

    return make
