"""The Broker contract, one suite run against every topology: in-process, one Redis, Redis Cluster."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import orjson
import pytest

from fleet.waiting import eventually
from service import redis_keys
from service.broker import redis_wire as wire
from service.broker.base import Envelope, Position
from service.broker.state import Snapshot
from tests.backends import Store
from tests.broker_contract import (
    TRIM_OVERFLOW,
    BrokerFactory,
    Started,
    broker_factory,
    new_channel,
    payload,
    start_broker,
)


@pytest.fixture
def make_broker(store: Store) -> BrokerFactory:
    return broker_factory(store)


@pytest.fixture
async def started(make_broker: BrokerFactory) -> AsyncIterator[Started]:
    started = await start_broker(make_broker)
    yield started
    await started.broker.close()


async def test_started_broker_is_ready(started: Started) -> None:
    await eventually(lambda: started.broker.ready, "broker never became ready")


async def test_subscriber_receives_published_event(started: Started) -> None:
    channel = new_channel()
    await started.broker.subscribe(channel)
    position = await started.broker.publish(channel, payload(1))
    await eventually(lambda: len(started.recorder.on(channel)) == 1, "the event was not delivered")
    [envelope] = started.recorder.on(channel)
    assert envelope == Envelope(channel=channel, offset=1, epoch=position.epoch, payload=payload(1))
    assert position.offset == 1


async def test_events_arrive_in_order_with_contiguous_offsets(started: Started) -> None:
    channel = new_channel()
    await started.broker.subscribe(channel)
    positions = [await started.broker.publish(channel, payload(n)) for n in range(1, 51)]
    assert [p.offset for p in positions] == list(range(1, 51))
    assert len({p.epoch for p in positions}) == 1
    await eventually(lambda: len(started.recorder.on(channel)) == 50, lambda: f"{len(started.recorder.on(channel))}/50")
    received = started.recorder.on(channel)
    assert [e.offset for e in received] == list(range(1, 51))
    assert [e.payload for e in received] == [payload(n) for n in range(1, 51)]


async def test_channels_have_independent_offsets_and_deliveries(started: Started) -> None:
    first, second = new_channel(), new_channel("user_updates")
    await started.broker.subscribe(first)
    await started.broker.subscribe(second)
    assert (await started.broker.publish(first, payload(1))).offset == 1
    assert (await started.broker.publish(second, payload(2))).offset == 1
    assert (await started.broker.publish(first, payload(3))).offset == 2
    await eventually(lambda: len(started.recorder.envelopes) == 3, "three events expected")
    assert [e.payload for e in started.recorder.on(first)] == [payload(1), payload(3)]
    assert [e.payload for e in started.recorder.on(second)] == [payload(2)]


async def test_unsubscribe_stops_delivery(started: Started) -> None:
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


async def test_unsubscribe_of_unknown_channel_is_ignored(started: Started) -> None:
    await started.broker.unsubscribe(new_channel())
    assert started.broker.ready


async def test_subscribed_channels_follow_subscriptions(started: Started) -> None:
    first, second = new_channel(), new_channel()
    await started.broker.subscribe(first)
    await started.broker.subscribe(second)
    assert started.broker.subscribed_channels == {first, second}
    await started.broker.unsubscribe(first)
    assert started.broker.subscribed_channels == {second}


async def test_history_returns_events_after_position(started: Started) -> None:
    channel = new_channel()
    positions = [await started.broker.publish(channel, payload(n)) for n in range(1, 11)]
    history = await started.broker.history(channel, Position(offset=4, epoch=positions[0].epoch))
    assert history.recovered
    assert history.position == positions[-1]
    assert [e.offset for e in history.envelopes] == list(range(5, 11))
    assert [e.payload for e in history.envelopes] == [payload(n) for n in range(5, 11)]
    assert {e.channel for e in history.envelopes} == {channel}


async def test_history_at_newest_position_is_empty_and_recovered(started: Started) -> None:
    channel = new_channel()
    position = await started.broker.publish(channel, payload(1))
    history = await started.broker.history(channel, position)
    assert history.recovered
    assert history.envelopes == []
    assert history.position == position


async def test_history_without_position_returns_only_the_current_position(started: Started) -> None:
    channel = new_channel()
    for n in range(1, 4):
        await started.broker.publish(channel, payload(n))
    history = await started.broker.history(channel, None)
    assert history.envelopes == []
    assert history.position.offset == 3


async def test_position_of_a_channel_without_events_resumes_after_its_first_event(started: Started) -> None:
    channel = new_channel()
    empty = await started.broker.history(channel, None)
    assert empty.position.offset == 0
    await started.broker.publish(channel, payload(1))
    history = await started.broker.history(channel, empty.position)
    assert history.recovered
    assert [e.payload for e in history.envelopes] == [payload(1)]


async def test_too_old_position_is_not_recovered_and_gets_the_newest_history_size_events(
    make_broker: BrokerFactory,
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


async def test_position_from_another_epoch_is_not_recovered(started: Started) -> None:
    channel = new_channel()
    position = await started.broker.publish(channel, payload(1))
    await started.broker.publish(channel, payload(2))
    history = await started.broker.history(channel, Position(offset=1, epoch=position.epoch + "x"))
    assert not history.recovered
    # What the current epoch holds, for a subscriber that restarts in it.
    assert [e.payload for e in history.envelopes] == [payload(1), payload(2)]
    assert history.position.offset == 2


async def test_position_ahead_of_the_channel_is_not_recovered(started: Started) -> None:
    channel = new_channel()
    position = await started.broker.publish(channel, payload(1))
    history = await started.broker.history(channel, Position(offset=5, epoch=position.epoch))
    assert not history.recovered
    assert [e.offset for e in history.envelopes] == [1]


async def test_publish_many_to_more_channels_than_connections_publishes_them_all(started: Started) -> None:
    channels = [new_channel() for _ in range(300)]
    positions = await started.broker.publish_many([(channel, payload(1)) for channel in channels])
    assert [p.offset for p in positions] == [1] * 300
    history = await started.broker.history(channels[-1], None)
    assert history.position == positions[-1]


async def test_publish_many_keeps_order_and_offsets(started: Started) -> None:
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


async def test_concurrent_subscribes_of_many_channels_all_take_effect(started: Started) -> None:
    channels = [new_channel() for _ in range(40)]
    await asyncio.gather(*(started.broker.subscribe(c) for c in channels))
    assert started.broker.subscribed_channels == set(channels)
    for channel in channels:
        await started.broker.publish(channel, payload(1))
    await eventually(lambda: len(started.recorder.envelopes) == 40, "one event per channel expected")


async def test_close_is_idempotent(make_broker: BrokerFactory) -> None:
    started = await start_broker(make_broker)
    await started.broker.close()
    await started.broker.close()
    assert not started.broker.ready


async def test_a_broker_started_while_its_store_is_down_is_not_ready_and_recovers_when_it_is_up(
    absent_store: Store,
) -> None:
    started = await start_broker(broker_factory(absent_store, canary_interval_s=0.1, canary_max_lag_s=0.5))
    try:
        if absent_store.shared:
            assert not started.broker.ready
            assert started.broker.not_ready_reasons() == ["broker_not_ready"]
            absent_store.up()
        await eventually(lambda: started.broker.ready, "the broker did not become ready when its store came up")
        channel = new_channel()
        await started.broker.subscribe(channel)
        position = await started.broker.publish(channel, payload(1))
        await eventually(lambda: [e.offset for e in started.recorder.on(channel)] == [position.offset], "no delivery")
    finally:
        await started.broker.close()


async def test_a_deaf_subscriber_link_makes_the_broker_not_ready_until_the_canary_returns(store: Store) -> None:
    if not store.shared:
        pytest.skip("an in-process broker has no link that could go deaf")
    started = await start_broker(broker_factory(store, canary_interval_s=0.1, canary_max_lag_s=0.5))
    try:
        await eventually(lambda: started.broker.ready, "broker never became ready")
        # Every PUBLISH waits while PINGs are still answered: connected, yet deaf.
        store.pause_writes(3000)
        await eventually(
            lambda: started.broker.not_ready_reasons() == ["broker_canary_lag"],
            lambda: str(started.broker.not_ready_reasons()),
        )
        await eventually(lambda: started.broker.ready, "readiness did not come back with the canary")
        # The canary is the pod's own business: not a client channel, never delivered as an event.
        assert started.broker.subscribed_channels == frozenset()
        assert started.recorder.envelopes == []
    finally:
        await started.broker.close()


# -- idempotency keys ---------------------------------------------------------------


async def test_a_repeated_idempotency_key_returns_the_original_position_and_is_delivered_once(started: Started) -> None:
    channel = new_channel()
    await started.broker.subscribe(channel)
    original = await started.broker.publish(channel, payload(1), idempotency_key="evt-1")
    repeated = await started.broker.publish(channel, payload(2), idempotency_key="evt-1")
    following = await started.broker.publish(channel, payload(3), idempotency_key="evt-3")
    assert (original.offset, original.duplicate) == (1, False)
    assert (repeated.offset, repeated.epoch, repeated.duplicate) == (1, original.epoch, True)
    assert (following.offset, following.duplicate) == (2, False)
    await eventually(lambda: len(started.recorder.on(channel)) == 2, "two events expected")
    assert [(e.offset, e.payload) for e in started.recorder.on(channel)] == [(1, payload(1)), (2, payload(3))]
    history = await started.broker.history(channel, Position(offset=0, epoch=original.epoch))
    assert [e.payload for e in history.envelopes] == [payload(1), payload(3)]


async def test_idempotency_keys_are_per_channel_and_events_without_a_key_are_never_deduplicated(
    started: Started,
) -> None:
    first, second = new_channel(), new_channel()
    assert (await started.broker.publish(first, payload(1), idempotency_key="k")).offset == 1
    assert not (await started.broker.publish(second, payload(1), idempotency_key="k")).duplicate
    assert [(await started.broker.publish(first, payload(2))).offset for _ in range(2)] == [2, 3]


async def test_publish_many_deduplicates_against_earlier_publishes_and_within_the_batch(started: Started) -> None:
    first, second = new_channel(), new_channel()
    await started.broker.publish(first, payload(1), idempotency_key="a")
    items = [(first, payload(1)), (second, payload(2)), (first, payload(3)), (first, payload(3)), (first, payload(4))]
    positions = await started.broker.publish_many(items, idempotency_keys=["a", "a", "b", "b", None])
    assert [(p.offset, p.duplicate) for p in positions] == [(1, True), (1, False), (2, False), (2, True), (3, False)]
    history = await started.broker.history(first, Position(offset=0, epoch=positions[0].epoch))
    assert [e.payload for e in history.envelopes] == [payload(1), payload(3), payload(4)]


async def test_a_pod_sees_the_idempotency_keys_another_pod_published(make_broker: BrokerFactory, store: Store) -> None:
    if not store.shared:
        pytest.skip("an in-process broker is the only pod")
    pod_a, pod_b = await start_broker(make_broker), await start_broker(make_broker)
    try:
        channel = new_channel()
        await pod_b.broker.subscribe(channel)
        original = await pod_a.broker.publish(channel, payload(1), idempotency_key="evt-1")
        retried = await pod_b.broker.publish(channel, payload(1), idempotency_key="evt-1")
        assert (retried.offset, retried.epoch, retried.duplicate) == (original.offset, original.epoch, True)
        marker = await pod_a.broker.publish(channel, payload(2))
        await eventually(lambda: len(pod_b.recorder.on(channel)) == 2, "two events expected")
        assert [e.offset for e in pod_b.recorder.on(channel)] == [original.offset, marker.offset]
    finally:
        await pod_a.broker.close()
        await pod_b.broker.close()


async def test_an_idempotency_key_is_forgotten_after_the_window(make_broker: BrokerFactory) -> None:
    started = await start_broker(make_broker, idempotency_window_s=1)
    try:
        channel = new_channel()
        await started.broker.publish(channel, payload(1), idempotency_key="evt-1")
        # Each duplicate appends nothing, so asking again until it is not one publishes exactly once more.
        positions: list[Position] = []

        async def published_again() -> bool:
            positions.append(await started.broker.publish(channel, payload(1), idempotency_key="evt-1"))
            return not positions[-1].duplicate

        await eventually(published_again, "the key was never forgotten")
        assert {p.offset for p in positions[:-1]} <= {1}
        assert positions[-1].offset == 2
    finally:
        await started.broker.close()


async def test_a_key_with_braces_stays_in_its_channels_slot(started: Started) -> None:
    # On Redis Cluster the key's name carries the channel's hash tag first, so a `{...}` in the
    # key cannot move it to another slot than the script's other keys.
    channel = new_channel()
    first = await started.broker.publish(channel, payload(1), idempotency_key="{other}:1")
    again = await started.broker.publish(channel, payload(1), idempotency_key="{other}:1")
    assert (first.duplicate, again.duplicate, again.offset) == (False, True, first.offset)


@pytest.mark.parametrize("key", ["", "x" * 129, "a b", "caf\u00e9", "line\n"])
async def test_an_invalid_idempotency_key_is_refused_before_anything_is_published(started: Started, key: str) -> None:
    channel = new_channel()
    with pytest.raises(ValueError, match="idempotency key"):
        await started.broker.publish(channel, payload(1), idempotency_key=key)
    with pytest.raises(ValueError, match="idempotency key"):
        await started.broker.publish_many([(channel, payload(1))], idempotency_keys=[key])
    assert (await started.broker.history(channel, None)).position.offset == 0


# -- the state store and snapshots ------------------------------------------------------


def txn(kind: str, txn_id: str, **data: object) -> bytes:
    event = {
        "type": kind,
        "data": {"id": txn_id, **data},
        "timestamp": "2026-12-01T00:00:00.000Z",
        "correlationId": "c",
    }
    return orjson.dumps(event)


def state_of(snapshot: Snapshot) -> dict[str, dict[str, object]]:
    return {event["data"]["id"]: event["data"] for event in map(orjson.loads, snapshot.payloads)}


async def test_a_snapshot_holds_the_newest_state_of_each_live_transaction_at_its_position(started: Started) -> None:
    channel = new_channel()
    broker = started.broker
    await broker.publish(channel, txn("transaction_new", "t1", status="new", version=1))
    await broker.publish(channel, txn("transaction_new", "t2", status="new", version=1))
    await broker.publish(channel, txn("transaction_new", "t3", status="new", version=1))
    await broker.publish(channel, txn("transaction_update", "t1", status="open", version=2))
    await broker.publish(channel, txn("stage_change", "t1", status="won", version=3))
    last = await broker.publish(channel, txn("transaction_delete", "t2", version=2))
    snapshot = await broker.snapshot(channel)
    assert snapshot.position == Position(6, last.epoch)
    assert state_of(snapshot) == {
        "t1": {"id": "t1", "status": "won", "version": 3},
        "t3": {"id": "t3", "status": "new", "version": 1},
    }
    following = await broker.publish(channel, txn("transaction_update", "t3", status="open", version=2))
    assert following == Position(7, last.epoch)
    history = await broker.history(channel, snapshot.position)
    assert [e.offset for e in history.envelopes] == [7]


async def test_an_older_version_published_after_a_newer_one_never_replaces_it(started: Started) -> None:
    channel = new_channel()
    broker = started.broker
    await broker.publish(channel, txn("transaction_update", "t1", status="newer", version=10))
    await broker.publish(channel, txn("transaction_update", "t1", status="older", version=9))
    await broker.publish(channel, txn("transaction_update", "t2", status="newer", updatedAt="2026-12-01T10:00:00Z"))
    await broker.publish(channel, txn("transaction_update", "t2", status="older", updatedAt="2026-12-01T09:00:00Z"))
    await broker.publish(channel, txn("transaction_delete", "t2", updatedAt="2026-12-01T08:00:00Z"))
    snapshot = await broker.snapshot(channel)
    assert snapshot.position.offset == 5  # published and delivered all the same, only the state stays
    assert {k: v["status"] for k, v in state_of(snapshot).items()} == {"t1": "newer", "t2": "newer"}


async def test_the_state_keeps_the_most_recently_changed_transactions_up_to_its_bound(
    make_broker: BrokerFactory,
) -> None:
    started = await start_broker(make_broker, state_max_items=3)
    try:
        channel = new_channel()
        for number in range(1, 6):
            await started.broker.publish(channel, txn("transaction_new", f"t{number}"))
        await started.broker.publish(channel, txn("transaction_update", "t3", status="touched"))
        await started.broker.publish(channel, txn("transaction_new", "t6"))
        assert sorted(state_of(await started.broker.snapshot(channel))) == ["t3", "t5", "t6"]
    finally:
        await started.broker.close()


async def test_the_snapshot_of_a_channel_without_events_is_empty_and_its_position_resumable(started: Started) -> None:
    channel = new_channel()
    snapshot = await started.broker.snapshot(channel)
    assert (snapshot.position.offset, snapshot.payloads) == (0, [])
    first = await started.broker.publish(channel, txn("transaction_new", "t1"))
    assert first == Position(1, snapshot.position.epoch)
    history = await started.broker.history(channel, snapshot.position)
    assert history.recovered
    assert [e.offset for e in history.envelopes] == [1]


async def test_events_that_are_not_about_a_transaction_leave_the_state_alone(started: Started) -> None:
    channel = new_channel("user_updates")
    await started.broker.publish(channel, txn("transaction_new", "t1"))
    await started.broker.publish(channel, orjson.dumps({"type": "user_update", "data": {"id": "u1"}}))
    await started.broker.publish(channel, payload(3))
    snapshot = await started.broker.snapshot(channel)
    assert (snapshot.position.offset, sorted(state_of(snapshot))) == (3, ["t1"])


async def test_a_snapshot_taken_while_publishes_run_is_followed_by_exactly_the_missing_changes(
    started: Started,
) -> None:
    """Replaying history after a snapshot's position onto it gives the final state: no gap, no duplicate."""
    channel = new_channel()
    broker = started.broker
    rng = random.Random(16)
    ids = [f"t{n}" for n in range(8)]

    async def publish_all() -> None:
        for version in range(1, 121):
            kind = rng.choice(["transaction_update", "transaction_update", "transaction_new", "transaction_delete"])
            await broker.publish(channel, txn(kind, rng.choice(ids), version=version))

    async def snapshots_meanwhile() -> list[Snapshot]:
        taken = []
        for _ in range(15):
            taken.append(await broker.snapshot(channel))
            await asyncio.sleep(0)
        return taken

    _, taken = await asyncio.gather(publish_all(), snapshots_meanwhile())
    final = state_of(await broker.snapshot(channel))
    for snapshot in taken:
        state = state_of(snapshot)
        history = await broker.history(channel, snapshot.position)
        assert history.recovered
        assert [e.offset for e in history.envelopes] == list(range(snapshot.position.offset + 1, 121))
        for envelope in history.envelopes:
            event = orjson.loads(envelope.payload)
            if event["type"] == "transaction_delete":
                state.pop(event["data"]["id"], None)
            else:
                state[event["data"]["id"]] = event["data"]
        assert state == final


async def test_a_store_that_lost_its_data_gives_an_empty_snapshot_in_a_new_epoch(
    started: Started, store: Store
) -> None:
    if not store.shared:
        pytest.skip("an in-process broker loses its state only with its process")
    channel = new_channel()
    before = await started.broker.publish(channel, txn("transaction_new", "t1"))
    store.cli("FLUSHALL")
    snapshot = await started.broker.snapshot(channel)
    assert snapshot.position.epoch != before.epoch
    assert (snapshot.position.offset, snapshot.payloads) == (0, [])
    after = await started.broker.publish(channel, txn("transaction_new", "t2"))
    assert after == Position(1, snapshot.position.epoch)
    assert sorted(state_of(await started.broker.snapshot(channel))) == ["t2"]


async def test_a_publisher_that_passes_no_state_arguments_publishes_and_leaves_the_state_alone(
    started: Started, store: Store
) -> None:
    if store.topology != "redis":
        pytest.skip("the script's arguments are the same on a cluster; redis-cli talks to one node here")
    channel = new_channel()
    await started.broker.publish(channel, txn("transaction_new", "t1", status="new"))
    store.cli(
        "EVAL",
        wire.PUBLISH_SCRIPT,
        "2",
        redis_keys.meta_key(store.prefix, channel),
        redis_keys.stream_key(store.prefix, channel),
        wire.new_epoch(),
        "600",
        redis_keys.pubsub_channel(store.prefix, channel),
        "1000",
        txn("transaction_update", "t1", status="unseen").decode(),
    )
    snapshot = await started.broker.snapshot(channel)
    assert snapshot.position.offset == 2
    assert state_of(snapshot) == {"t1": {"id": "t1", "status": "new"}}
