"""The Broker contract as a reusable test class; each backend's test module subclasses it and supplies `make_broker`."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from fleet.waiting import eventually
from service.broker.base import Broker, Envelope, Position

BrokerFactory = Callable[..., Broker]
"""Builds an unstarted broker; accepts the keyword `history_size`."""

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


class BrokerContract:
    """Every test here must pass for every Broker implementation."""

    @pytest.fixture
    def make_broker(self) -> BrokerFactory:
        raise NotImplementedError("a backend's test class provides make_broker")

    @pytest.fixture
    async def started(self, make_broker: BrokerFactory) -> AsyncIterator[Started]:
        started = await start_broker(make_broker)
        yield started
        await started.broker.close()

    async def test_started_broker_is_ready(self, started: Started) -> None:
        await eventually(lambda: started.broker.ready, "broker never became ready")

    async def test_subscriber_receives_published_event(self, started: Started) -> None:
        channel = new_channel()
        await started.broker.subscribe(channel)
        position = await started.broker.publish(channel, payload(1))
        await eventually(lambda: len(started.recorder.on(channel)) == 1, "the event was not delivered")
        [envelope] = started.recorder.on(channel)
        assert envelope == Envelope(channel=channel, offset=1, epoch=position.epoch, payload=payload(1))
        assert position.offset == 1

    async def test_events_arrive_in_order_with_contiguous_offsets(self, started: Started) -> None:
        channel = new_channel()
        await started.broker.subscribe(channel)
        positions = [await started.broker.publish(channel, payload(n)) for n in range(1, 51)]
        assert [p.offset for p in positions] == list(range(1, 51))
        assert len({p.epoch for p in positions}) == 1
        await eventually(
            lambda: len(started.recorder.on(channel)) == 50, lambda: f"{len(started.recorder.on(channel))}/50"
        )
        received = started.recorder.on(channel)
        assert [e.offset for e in received] == list(range(1, 51))
        assert [e.payload for e in received] == [payload(n) for n in range(1, 51)]

    async def test_channels_have_independent_offsets_and_deliveries(self, started: Started) -> None:
        first, second = new_channel(), new_channel("user_updates")
        await started.broker.subscribe(first)
        await started.broker.subscribe(second)
        assert (await started.broker.publish(first, payload(1))).offset == 1
        assert (await started.broker.publish(second, payload(2))).offset == 1
        assert (await started.broker.publish(first, payload(3))).offset == 2
        await eventually(lambda: len(started.recorder.envelopes) == 3, "three events expected")
        assert [e.payload for e in started.recorder.on(first)] == [payload(1), payload(3)]
        assert [e.payload for e in started.recorder.on(second)] == [payload(2)]

    async def test_unsubscribe_stops_delivery(self, started: Started) -> None:
        channel, marker = new_channel(), new_channel()
        await started.broker.subscribe(channel)
        await started.broker.subscribe(marker)
        await started.broker.publish(channel, payload(1))
        await eventually(lambda: len(started.recorder.on(channel)) == 1, "first event not delivered")
        await started.broker.unsubscribe(channel)
        assert channel not in started.broker.subscribed_channels
        await started.broker.publish(channel, payload(2))
        await started.broker.publish(marker, payload(3))
        await eventually(lambda: len(started.recorder.on(marker)) == 1, "marker event not delivered")
        assert [e.offset for e in started.recorder.on(channel)] == [1]

    async def test_unsubscribe_of_unknown_channel_is_ignored(self, started: Started) -> None:
        await started.broker.unsubscribe(new_channel())
        assert started.broker.ready

    async def test_subscribed_channels_follow_subscriptions(self, started: Started) -> None:
        first, second = new_channel(), new_channel()
        await started.broker.subscribe(first)
        await started.broker.subscribe(second)
        assert started.broker.subscribed_channels == {first, second}
        await started.broker.unsubscribe(first)
        assert started.broker.subscribed_channels == {second}

    async def test_history_returns_events_after_position(self, started: Started) -> None:
        channel = new_channel()
        positions = [await started.broker.publish(channel, payload(n)) for n in range(1, 11)]
        history = await started.broker.history(channel, Position(offset=4, epoch=positions[0].epoch))
        assert history.recovered
        assert history.position == positions[-1]
        assert [e.offset for e in history.envelopes] == list(range(5, 11))
        assert [e.payload for e in history.envelopes] == [payload(n) for n in range(5, 11)]
        assert {e.channel for e in history.envelopes} == {channel}

    async def test_history_at_newest_position_is_empty_and_recovered(self, started: Started) -> None:
        channel = new_channel()
        position = await started.broker.publish(channel, payload(1))
        history = await started.broker.history(channel, position)
        assert history.recovered
        assert history.envelopes == []
        assert history.position == position

    async def test_history_without_position_returns_only_the_current_position(self, started: Started) -> None:
        channel = new_channel()
        for n in range(1, 4):
            await started.broker.publish(channel, payload(n))
        history = await started.broker.history(channel, None)
        assert history.envelopes == []
        assert history.position.offset == 3

    async def test_position_of_a_channel_without_events_resumes_after_its_first_event(self, started: Started) -> None:
        channel = new_channel()
        empty = await started.broker.history(channel, None)
        assert empty.position.offset == 0
        await started.broker.publish(channel, payload(1))
        history = await started.broker.history(channel, empty.position)
        assert history.recovered
        assert [e.payload for e in history.envelopes] == [payload(1)]

    async def test_too_old_position_is_not_recovered_and_gets_the_newest_history_size_events(
        self, make_broker: BrokerFactory
    ) -> None:
        started = await start_broker(make_broker, history_size=10)
        try:
            channel = new_channel()
            total = 10 + TRIM_OVERFLOW
            positions = await started.broker.publish_many([(channel, payload(n)) for n in range(1, total + 1)])
            epoch = positions[-1].epoch
            old = await started.broker.history(channel, Position(offset=1, epoch=epoch))
            assert not old.recovered
            # Whatever approximate trimming left behind, the window is the history size.
            assert [e.offset for e in old.envelopes] == list(range(total - 9, total + 1))
            assert [e.payload for e in old.envelopes] == [payload(n) for n in range(total - 9, total + 1)]
            assert old.position == positions[-1]
            edge = await started.broker.history(channel, Position(offset=total - 10, epoch=epoch))
            assert edge.recovered
            assert [e.offset for e in edge.envelopes] == list(range(total - 9, total + 1))
            beyond = await started.broker.history(channel, Position(offset=total - 11, epoch=epoch))
            assert not beyond.recovered
            recent = await started.broker.history(channel, Position(offset=total - 5, epoch=epoch))
            assert recent.recovered
            assert [e.offset for e in recent.envelopes] == list(range(total - 4, total + 1))
        finally:
            await started.broker.close()

    async def test_position_from_another_epoch_is_not_recovered(self, started: Started) -> None:
        channel = new_channel()
        position = await started.broker.publish(channel, payload(1))
        await started.broker.publish(channel, payload(2))
        history = await started.broker.history(channel, Position(offset=1, epoch=position.epoch + "x"))
        assert not history.recovered
        # What the current epoch holds, for a subscriber that restarts in it.
        assert [e.payload for e in history.envelopes] == [payload(1), payload(2)]
        assert history.position.offset == 2

    async def test_position_ahead_of_the_channel_is_not_recovered(self, started: Started) -> None:
        channel = new_channel()
        position = await started.broker.publish(channel, payload(1))
        history = await started.broker.history(channel, Position(offset=5, epoch=position.epoch))
        assert not history.recovered
        assert [e.offset for e in history.envelopes] == [1]

    async def test_publish_many_keeps_order_and_offsets(self, started: Started) -> None:
        first, second = new_channel(), new_channel()
        await started.broker.subscribe(first)
        await started.broker.subscribe(second)
        items = [(first, payload(1)), (second, payload(2)), (first, payload(3)), (first, payload(4))]
        positions = await started.broker.publish_many(items)
        assert [p.offset for p in positions] == [1, 1, 2, 3]
        assert await started.broker.publish_many([]) == []
        await eventually(lambda: len(started.recorder.envelopes) == 4, "four events expected")
        assert [e.payload for e in started.recorder.on(first)] == [payload(1), payload(3), payload(4)]
        assert [e.offset for e in started.recorder.on(first)] == [1, 2, 3]

    async def test_concurrent_subscribes_of_many_channels_all_take_effect(self, started: Started) -> None:
        channels = [new_channel() for _ in range(40)]
        await asyncio.gather(*(started.broker.subscribe(c) for c in channels))
        assert started.broker.subscribed_channels == set(channels)
        for channel in channels:
            await started.broker.publish(channel, payload(1))
        await eventually(lambda: len(started.recorder.envelopes) == 40, "one event per channel expected")

    async def test_close_is_idempotent(self, make_broker: BrokerFactory) -> None:
        started = await start_broker(make_broker)
        await started.broker.close()
        await started.broker.close()
        assert not started.broker.ready
