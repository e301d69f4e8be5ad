"""RedisBroker against a real redis-server: what only one Redis can break (the contract is in test_broker_contract)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service import metrics, redis_keys
from service.broker import redis_wire as wire
from service.broker.base import Broker, BrokerUnavailable, Position
from service.broker.canary import CANARY_CHANNEL_PART
from service.broker.redis import RedisBroker
from service.config import Settings
from service.presence import PresenceEntry
from service.presence_redis import RedisPresence
from tests.broker_contract import (
    BrokerFactory,
    Started,
    churn_while_publishing,
    new_channel,
    payload,
    start_broker,
)
from tests.tcp_proxy import PartitionProxy

# Short watchdog and backoff so faults are noticed quickly; correctness never depends on them.
FAST: dict[str, Any] = {
    "ping_interval_s": 0.2,
    "pong_timeout_s": 1.5,
    "reconnect_min_s": 0.02,
    "reconnect_max_s": 0.5,
    "connect_timeout_s": 1.0,
    "command_timeout_s": 1.0,
}


def redis_factory(server: RedisServer, **defaults: Any) -> BrokerFactory:
    prefix = f"t{uuid.uuid4().hex[:6]}:"

    def make(**options: Any) -> Broker:
        settings: dict[str, Any] = {
            "url": server.url,
            "prefix": prefix,
            "pod_id": f"pod-{uuid.uuid4().hex[:6]}",
            "history_size": 1000,
            "history_ttl_s": 600,
        }
        settings.update(FAST)
        settings.update(defaults)
        settings.update(options)
        return RedisBroker(**settings)

    return make


@pytest.fixture
async def pods(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    """Start any number of brokers sharing one prefix (pods of one deployment); all closed afterwards."""
    factory = redis_factory(redis_server)
    running: list[Started] = []

    async def start(**options: Any) -> Started:
        started = await start_broker(factory, **options)
        running.append(started)
        return started

    yield start
    for started in running:
        await started.broker.close()


async def pubsub_channels(raw: Redis, prefix: str) -> set[str]:
    """The broker channels subscribed in Redis, without the pods' private canary channels."""
    channels = await raw.pubsub_channels(f"{prefix}*")
    names = [c.decode() if isinstance(c, bytes) else c for c in channels]
    return {name[len(prefix) :] for name in names if not name[len(prefix) :].startswith(CANARY_CHANNEL_PART)}


def prefix_of(broker: Broker) -> str:
    assert isinstance(broker, RedisBroker)
    return broker._prefix


async def test_redis_subscriptions_follow_the_wanted_set_in_batches(pods: Callable[..., Any], raw: Redis) -> None:
    pod = await pods()
    prefix = prefix_of(pod.broker)
    channels = [new_channel() for _ in range(60)]
    await raw.config_resetstat()
    await asyncio.gather(*(pod.broker.subscribe(c) for c in channels))
    assert await pubsub_channels(raw, prefix) == set(channels)
    stats = await raw.info("commandstats")
    assert stats["cmdstat_subscribe"]["calls"] < len(channels), "subscribes were not batched"

    await asyncio.gather(*(pod.broker.unsubscribe(c) for c in channels[:40]))
    remaining = set(channels[40:])

    async def matches() -> bool:
        return await pubsub_channels(raw, prefix) == remaining

    await eventually(matches, "PUBSUB CHANNELS never dropped the unsubscribed channels")
    assert pod.broker.subscribed_channels == remaining
    await eventually(lambda: pod.broker.ready, "unsubscribe confirmations never arrived")


async def test_two_pods_exchange_events(pods: Callable[..., Any]) -> None:
    first, second = await pods(), await pods()
    to_first, to_second = new_channel(), new_channel()
    await first.broker.subscribe(to_first)
    await second.broker.subscribe(to_second)
    await second.broker.publish(to_first, payload(1))
    await first.broker.publish(to_second, payload(2))
    await eventually(lambda: len(first.recorder.envelopes) == 1, "pod 1 did not receive pod 2's event")
    await eventually(lambda: len(second.recorder.envelopes) == 1, "pod 2 did not receive pod 1's event")
    assert first.recorder.envelopes[0].payload == payload(1)
    assert second.recorder.envelopes[0].payload == payload(2)


async def test_concurrent_publishers_deliver_every_event_exactly_once(pods: Callable[..., Any]) -> None:
    subscriber = await pods()
    publishers = [await pods() for _ in range(4)]
    channel = new_channel()
    await subscriber.broker.subscribe(channel)

    async def publish_all(index: int, publisher: Started) -> list[Position]:
        return [await publisher.broker.publish(channel, payload(index * 1000 + n)) for n in range(50)]

    results = await asyncio.gather(*(publish_all(i, p) for i, p in enumerate(publishers)))
    offsets = sorted(p.offset for positions in results for p in positions)
    assert offsets == list(range(1, 201))
    await eventually(
        lambda: len(subscriber.recorder.envelopes) == 200, lambda: f"{len(subscriber.recorder.envelopes)}/200"
    )
    received = subscriber.recorder.envelopes
    assert [e.offset for e in received] == list(range(1, 201))
    assert sorted(e.payload for e in received) == sorted(payload(i * 1000 + n) for i in range(4) for n in range(50))


def assert_complete(channel_envelopes: list[Any], history: list[Any], total_published: int) -> None:
    """Live plus history hold every offset exactly once, and agree where they overlap."""
    live_offsets = [e.offset for e in channel_envelopes]
    assert live_offsets == sorted(set(live_offsets)), "live delivery repeated or reordered an offset"
    by_offset = {e.offset: e for e in history}
    assert sorted(by_offset) == list(range(1, len(by_offset) + 1)), "history has a gap"
    assert len(by_offset) >= total_published
    for envelope in channel_envelopes:
        assert by_offset[envelope.offset] == envelope
    numbers = {e.payload for e in history}
    assert numbers >= {payload(n) for n in range(1, total_published + 1)}


@pytest.mark.parametrize("fault", ["restart", "kill"])
async def test_subscriber_survives_redis_faults_mid_stream(fault: str, persistent_redis_server: RedisServer) -> None:
    factory = redis_factory(persistent_redis_server)
    subscriber = await start_broker(factory)
    publisher = await start_broker(factory)
    channel = new_channel()
    total = 300
    try:
        await subscriber.broker.subscribe(channel)

        async def publish_numbered() -> None:
            for n in range(1, total + 1):
                while True:
                    try:
                        await publisher.broker.publish(channel, payload(n))
                        break
                    except BrokerUnavailable:
                        # A failed publish may still have landed; duplicates get their own offsets.
                        await asyncio.sleep(0.05)
                if n in (total // 3, 2 * total // 3):
                    # Fault twice in the middle of the stream, while the subscriber listens.
                    if fault == "restart":
                        persistent_redis_server.restart()
                    else:
                        persistent_redis_server.kill()
                        persistent_redis_server.start()

        await publish_numbered()
        await eventually(lambda: len(subscriber.recorder.resubscribed) >= 2, "resubscribed handler did not fire twice")
        assert all(channel in channels for channels in subscriber.recorder.resubscribed)
        await eventually(lambda: subscriber.broker.ready, "subscriber never became ready again")
        # Live delivery works again after the faults.
        last = await publisher.broker.publish(channel, payload(total + 1))
        await eventually(
            lambda: any(e.offset == last.offset for e in subscriber.recorder.on(channel)),
            "no live delivery after recovery",
        )
        history = await subscriber.broker.history(channel, Position(offset=0, epoch=last.epoch))
        assert history.recovered
        raw = Redis.from_url(persistent_redis_server.url)
        try:
            redis_channel = prefix_of(subscriber.broker) + channel
            assert await raw.pubsub_numsub(redis_channel) == [(redis_channel.encode(), 1)]
        finally:
            await raw.aclose()
        assert_complete(subscriber.recorder.on(channel), history.envelopes, total + 1)
    finally:
        await subscriber.broker.close()
        await publisher.broker.close()


async def test_publish_while_redis_is_down_raises_broker_unavailable(
    pods: Callable[..., Any], redis_server: RedisServer
) -> None:
    pod = await pods()
    channel = new_channel()
    redis_server.stop()
    with pytest.raises(BrokerUnavailable):
        await pod.broker.publish(channel, payload(1))
    with pytest.raises(BrokerUnavailable):
        await pod.broker.publish_many([(channel, payload(1))])
    with pytest.raises(BrokerUnavailable):
        await pod.broker.history(channel, None)
    await eventually(lambda: not pod.broker.ready, "broker stayed ready without Redis")
    redis_server.start()
    await eventually(lambda: pod.broker.ready, "broker did not recover after Redis came back")
    assert (await pod.broker.publish(channel, payload(1))).offset == 1


async def test_publish_to_an_unresponsive_redis_raises_instead_of_hanging(
    pods: Callable[..., Any], redis_server: RedisServer
) -> None:
    pod = await pods()
    redis_server.pause()
    try:
        with pytest.raises(BrokerUnavailable):
            await pod.broker.publish(new_channel(), payload(1))
    finally:
        redis_server.resume()


async def test_half_open_subscriber_connection_is_detected_and_rebuilt(
    pods: Callable[..., Any], redis_server: RedisServer
) -> None:
    listener, publisher = await pods(), await pods()
    channel = new_channel()
    await listener.broker.subscribe(channel)
    connects_before = metrics.BROKER_CONNECTS.labels(outcome="ok")._value.get()
    redis_server.pause()
    try:
        await eventually(lambda: not listener.broker.ready, "a silent Redis was not noticed")
    finally:
        redis_server.resume()
    await eventually(lambda: listener.broker.ready, "broker did not recover after Redis answered again")
    assert metrics.BROKER_CONNECTS.labels(outcome="ok")._value.get() > connects_before
    await eventually(lambda: listener.recorder.resubscribed != [], "resubscribed handler did not fire")
    position = await publisher.broker.publish(channel, payload(7))
    await eventually(
        lambda: [e.offset for e in listener.recorder.on(channel)] == [position.offset],
        "no delivery on the rebuilt connection",
    )


async def test_malformed_message_from_a_foreign_publisher_is_counted_and_dropped(
    pods: Callable[..., Any], raw: Redis
) -> None:
    pod = await pods()
    channel = new_channel()
    await pod.broker.subscribe(channel)
    invalid_before = metrics.BROKER_INVALID_MESSAGES._value.get()
    redis_channel = prefix_of(pod.broker) + channel
    for garbage in (b'{"type":"transaction_update"}', b"e1:0:abc\n{}", b"e1:1:bad epoch!\n{}", b"e1:1:abc\n"):
        await raw.publish(redis_channel, garbage)
    position = await pod.broker.publish(channel, payload(1))
    await eventually(lambda: len(pod.recorder.on(channel)) == 1, "the valid event was not delivered")
    assert pod.recorder.on(channel)[0].offset == position.offset
    assert metrics.BROKER_INVALID_MESSAGES._value.get() == invalid_before + 4
    assert pod.broker.ready


async def test_foreign_publisher_calling_the_script_is_delivered(pods: Callable[..., Any], raw: Redis) -> None:
    pod = await pods()
    channel = new_channel()
    await pod.broker.subscribe(channel)
    prefix = prefix_of(pod.broker)
    keys = [redis_keys.meta_key(prefix, channel), redis_keys.stream_key(prefix, channel)]
    offset, epoch, duplicate = await raw.eval(
        wire.PUBLISH_SCRIPT, 2, *keys, "fromgo1", 600, prefix + channel, 1000, b'{"id":"t1"}'
    )
    assert (offset, epoch, duplicate) == (1, b"fromgo1", 0)
    await eventually(lambda: len(pod.recorder.on(channel)) == 1, "event from the script was not delivered")
    assert pod.recorder.on(channel)[0].payload == b'{"id":"t1"}'
    assert wire.encode_envelope(1, "fromgo1", b'{"id":"t1"}') == b'e1:1:fromgo1\n{"id":"t1"}'


async def test_history_after_lost_history_starts_a_new_epoch(pods: Callable[..., Any], raw: Redis) -> None:
    pod = await pods()
    channel = new_channel()
    old = await pod.broker.publish(channel, payload(1))
    await raw.flushall()
    new = await pod.broker.publish(channel, payload(2))
    assert new.offset == 1
    assert new.epoch != old.epoch
    history = await pod.broker.history(channel, old)
    assert not history.recovered
    assert history.position == new


async def test_subscribe_while_redis_is_down_fails_and_forgets_the_channel(
    pods: Callable[..., Any], redis_server: RedisServer
) -> None:
    pod = await pods(subscribe_timeout_s=0.5)
    redis_server.stop()
    await eventually(lambda: not pod.broker.ready, "broker stayed ready without Redis")
    with pytest.raises(BrokerUnavailable):
        await pod.broker.subscribe(new_channel())
    redis_server.start()
    await eventually(lambda: pod.broker.ready, "a failed subscribe left the broker not ready")
    assert pod.broker.subscribed_channels == frozenset()


async def test_close_leaves_no_tasks_and_no_connections(redis_server: RedisServer, raw: Redis) -> None:
    baseline_tasks = {t for t in asyncio.all_tasks() if not t.done()}
    baseline_clients = len(await raw.client_list())
    started = await start_broker(redis_factory(redis_server))
    channel = new_channel()
    await started.broker.subscribe(channel)
    await started.broker.publish(channel, payload(1))
    await started.broker.publish_many([(channel, payload(2))])
    await started.broker.history(channel, None)
    await eventually(lambda: len(started.recorder.envelopes) == 2, "events not delivered")
    assert len(await raw.client_list()) > baseline_clients
    await started.broker.close()
    assert {t for t in asyncio.all_tasks() if not t.done()} == baseline_tasks

    async def clients_released() -> bool:
        return len(await raw.client_list()) == baseline_clients

    await eventually(clients_released, "Redis still lists the broker's connections")
    assert await raw.pubsub_numsub(prefix_of(started.broker) + channel) == [
        ((prefix_of(started.broker) + channel).encode(), 0)
    ]


async def test_pod_id_with_spaces_still_connects(pods: Callable[..., Any]) -> None:
    pod = await pods(pod_id="node 1 (eu-west)")
    channel = new_channel()
    await pod.broker.subscribe(channel)
    await pod.broker.publish(channel, payload(1))
    await eventually(lambda: len(pod.recorder.envelopes) == 1, "event not delivered")


async def test_a_failing_message_handler_does_not_stop_delivery(pods: Callable[..., Any]) -> None:
    pod = await pods()
    channel = new_channel()
    delivered: list[int] = []

    def flaky(envelope: Any) -> None:
        delivered.append(envelope.offset)
        if envelope.offset == 1:
            raise RuntimeError("handler bug")

    pod.broker.set_handlers(on_message=flaky, on_resubscribed=pod.recorder.on_resubscribed)
    await pod.broker.subscribe(channel)
    await pod.broker.publish_many([(channel, payload(1)), (channel, payload(2))])
    await eventually(lambda: delivered == [1, 2], lambda: f"delivered {delivered}")
    assert pod.broker.ready


async def test_subscription_churn_during_traffic_ends_with_redis_matching_the_wanted_set(
    pods: Callable[..., Any], raw: Redis
) -> None:
    listener, publisher = await pods(), await pods()
    prefix = prefix_of(listener.broker)
    steady = new_channel()
    await listener.broker.subscribe(steady)
    wanted, positions = await churn_while_publishing(listener.broker, publisher.broker, steady, 200)
    await eventually(lambda: listener.broker.ready, "broker not ready after churn")
    assert await pubsub_channels(raw, prefix) == wanted
    assert listener.broker.subscribed_channels == wanted
    await eventually(
        lambda: len(listener.recorder.on(steady)) == 200,
        lambda: f"{len(listener.recorder.on(steady))} of 200 on the steady channel",
    )
    received = listener.recorder.on(steady)
    assert [e.offset for e in received] == [p.offset for p in positions] == list(range(1, 201))


async def test_broker_from_settings_uses_prefix_and_history_size(redis_server: RedisServer, raw: Redis) -> None:
    settings = Settings(redis_url=redis_server.url, redis_prefix="app1:", pod_id="pod-s", history_size=50)
    broker = RedisBroker.from_settings(settings, **FAST)
    await broker.start()
    try:
        position = await broker.publish("transactions:C1", payload(1))
        assert position.offset == 1
        assert await raw.xlen("app1:history:{transactions:C1}") == 1
        assert await raw.hget("app1:meta:{transactions:C1}", "epoch") == position.epoch.encode()
        assert 0 < await raw.ttl("app1:history:{transactions:C1}") <= settings.history_ttl_s
    finally:
        await broker.close()


async def test_history_lost_in_a_restart_without_persistence_is_reported_unrecovered(
    pods: Callable[..., Any], redis_server: RedisServer
) -> None:
    listener, publisher = await pods(), await pods()
    channel = new_channel()
    await listener.broker.subscribe(channel)
    before = await publisher.broker.publish(channel, payload(1))
    redis_server.restart()
    await eventually(lambda: listener.recorder.resubscribed != [], "resubscribed handler did not fire")
    await eventually(lambda: listener.broker.ready, "listener not ready after the restart")
    history = await listener.broker.history(channel, before)
    assert not history.recovered
    assert history.position.epoch != before.epoch
    after = await publisher.broker.publish(channel, payload(2))
    assert (after.offset, after.epoch) == (1, history.position.epoch)
    await eventually(lambda: len(listener.recorder.on(channel)) == 2, "no live delivery after the restart")


async def test_silent_network_partition_is_detected_and_healed_while_redis_stays_up(
    redis_server: RedisServer, raw: Redis
) -> None:
    proxy = PartitionProxy(redis_server.port)
    await proxy.start()
    factory = redis_factory(redis_server)
    listener = await start_broker(factory, url=proxy.url)
    publisher = await start_broker(factory)
    try:
        channel = new_channel()
        await listener.broker.subscribe(channel)
        redis_channel = prefix_of(listener.broker) + channel
        proxy.partition()
        await eventually(lambda: not listener.broker.ready, "a silent connection was not noticed")
        proxy.heal()
        await eventually(lambda: listener.broker.ready, "the connection was not rebuilt after the partition healed")
        await eventually(lambda: listener.recorder.resubscribed != [], "resubscribed handler did not fire")
        # The frozen connection still counts as a subscriber in Redis; the new one must too.
        assert (await raw.pubsub_numsub(redis_channel))[0][1] >= 1
        position = await publisher.broker.publish(channel, payload(1))
        await eventually(
            lambda: [e.offset for e in listener.recorder.on(channel)] == [position.offset],
            "no delivery on the rebuilt connection",
        )
    finally:
        await listener.broker.close()
        await publisher.broker.close()
        await proxy.close()


async def test_a_cancelled_publish_does_not_mix_up_later_replies(
    pods: Callable[..., Any], redis_server: RedisServer
) -> None:
    pod = await pods(command_timeout_s=30.0)
    channel = new_channel()
    redis_server.pause()
    try:
        stuck = asyncio.create_task(pod.broker.publish(channel, payload(1)))
        await asyncio.sleep(0.2)  # let it send and wait for the reply
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    finally:
        redis_server.resume()
    position = await pod.broker.publish(channel, payload(2))
    history = await pod.broker.history(channel, None)
    assert history.position == position
    assert position.offset in (1, 2)  # the cancelled publish may or may not have run


async def test_bursts_larger_than_the_connection_pool_wait_for_a_connection(pods: Callable[..., Any]) -> None:
    # Generous time bounds, for connecting too: the point is waiting for a connection, not how
    # fast that is, and a loaded machine can hold up the connect's wake-up for over a second.
    pod = await pods(max_connections=4, connect_timeout_s=30.0, command_timeout_s=30.0)
    channel = new_channel()
    positions = await asyncio.gather(*(pod.broker.publish(channel, payload(n)) for n in range(500)))
    assert sorted(p.offset for p in positions) == list(range(1, 501))
    histories = await asyncio.gather(*(pod.broker.history(channel, positions[0]) for _ in range(300)))
    assert all(h.recovered and h.position.offset == 500 for h in histories)


async def test_broker_and_presence_work_over_a_unix_socket(redis_server: RedisServer) -> None:
    factory = redis_factory(redis_server)
    listener = await start_broker(factory, url=redis_server.unix_url)
    publisher = await start_broker(factory)
    presence = RedisPresence(url=redis_server.unix_url, prefix="u:", pod_id="pod-u")
    try:
        channel = new_channel()
        await listener.broker.subscribe(channel)
        await publisher.broker.publish(channel, payload(1))
        await eventually(lambda: len(listener.recorder.envelopes) == 1, "no delivery over the unix socket")
        await presence.add(["c1"], PresenceEntry(conn_id="k1", user_id="u1", pod_id="pod-u", connected_at=1.0))
        assert await presence.count("c1") == 1
    finally:
        await listener.broker.close()
        await publisher.broker.close()
        await presence.close()


async def test_subscriber_outlives_a_long_outage_and_many_failed_reconnects(
    pods: Callable[..., Any], redis_server: RedisServer
) -> None:
    pod = await pods(reconnect_max_s=0.1)
    channel = new_channel()
    await pod.broker.subscribe(channel)
    failed = metrics.BROKER_CONNECTS.labels(outcome="failed")
    before = failed._value.get()
    redis_server.stop()
    await eventually(lambda: failed._value.get() >= before + 20, "the subscriber stopped trying to reconnect")
    assert not pod.broker.ready
    redis_server.start()
    await eventually(lambda: pod.broker.ready, "no recovery after a long outage")
    await eventually(lambda: [channel] in pod.recorder.resubscribed, "resubscribed handler did not fire")
    position = await pod.broker.publish(channel, payload(1))
    await eventually(lambda: [e.offset for e in pod.recorder.on(channel)] == [position.offset], "no live delivery")
