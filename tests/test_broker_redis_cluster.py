"""RedisBroker on a real three-master Redis Cluster: sharding, migration, node loss (contract elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service import metrics, redis_keys
from service.broker import create_broker
from service.broker import redis_wire as wire
from service.broker.base import Broker, BrokerUnavailable, Position
from service.broker.canary import CANARY_CHANNEL_PART
from service.broker.redis import RedisBroker
from service.broker.redis_shard_link import SHARDED
from service.config import Settings
from service.redis_client import parse_cluster_url
from tests.broker_contract import (
    BrokerFactory,
    Started,
    churn_while_publishing,
    new_channel,
    payload,
    start_broker,
)
from tests.conftest import AppClient, connect, make_settings, publish, receive_type, subscribe, token_for, txn

# Short watchdog, backoff and topology refresh so faults are noticed quickly; correctness never depends on them.
FAST: dict[str, Any] = {
    "ping_interval_s": 0.2,
    "pong_timeout_s": 1.5,
    "reconnect_min_s": 0.02,
    "reconnect_max_s": 0.5,
    "connect_timeout_s": 1.0,
    "command_timeout_s": 1.0,
    "topology_refresh_s": 1.0,
}


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One cluster for the tests that leave every node running."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster for one test that kills nodes."""
    cluster = RedisCluster(tmp_path)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three masters with one replica each, for a real failover."""
    cluster = RedisCluster(tmp_path, replicas=1)
    cluster.start()
    yield cluster
    cluster.stop()


def cluster_factory(cluster: RedisCluster, **defaults: Any) -> BrokerFactory:
    return cluster_factory_for_url(cluster.url, **defaults)


def cluster_factory_for_url(url: str, **defaults: Any) -> BrokerFactory:
    prefix = f"t{uuid.uuid4().hex[:6]}:"

    def make(**options: Any) -> Broker:
        settings: dict[str, Any] = {
            "url": url,
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


def pods_fixture(cluster: RedisCluster) -> tuple[Callable[..., Any], list[Started]]:
    factory = cluster_factory(cluster)
    running: list[Started] = []

    async def start(**options: Any) -> Started:
        started = await start_broker(factory, **options)
        running.append(started)
        return started

    return start, running


@pytest.fixture
async def pods(shared_cluster: RedisCluster) -> AsyncIterator[Callable[..., Any]]:
    start, running = pods_fixture(shared_cluster)
    yield start
    for started in running:
        await started.broker.close()


def prefix_of(broker: Broker) -> str:
    assert isinstance(broker, RedisBroker)
    return broker._prefix


def broker_shard_channels(node: RedisServer, prefix: str) -> set[str]:
    """The broker channels a node has sharded subscriptions for, without the pods' private canary channels."""
    names = node.cli("PUBSUB", "SHARDCHANNELS", f"{prefix}*").split()
    channels = {name[len(prefix) + 1 : -1] for name in names}
    return {channel for channel in channels if not channel.startswith(CANARY_CHANNEL_PART)}


def slot_of(broker: Broker, channel: str) -> int:
    return key_slot(redis_keys.shard_channel(prefix_of(broker), channel).encode())


def test_cluster_urls_name_every_seed_node() -> None:
    seeds, credentials = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001,redis-3")
    assert seeds == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("redis-3", 6379)]
    assert credentials == {"username": "u", "password": "p@ss"}


def test_create_broker_picks_sharded_delivery_for_cluster_urls() -> None:
    settings = Settings(redis_url="redis+cluster://127.0.0.1:1,127.0.0.1:2", pod_id="p")
    broker = create_broker(settings)
    assert isinstance(broker, RedisBroker)
    assert broker._subscriber._kind is SHARDED


async def test_channels_spread_over_every_master_and_each_master_serves_its_own(
    pods: Callable[..., Any], shared_cluster: RedisCluster
) -> None:
    listener, publisher = await pods(), await pods()
    channels = [new_channel() for _ in range(60)]
    for channel in channels:
        await listener.broker.subscribe(channel)
    prefix = prefix_of(listener.broker)
    per_node: dict[int, set[str]] = {}
    for node in shared_cluster.nodes:
        per_node[node.port] = broker_shard_channels(node, prefix)
        # Every shard channel a node reports is one whose slot it owns.
        for channel in per_node[node.port]:
            assert shared_cluster.owner_of(slot_of(listener.broker, channel)) is node
    assert all(per_node[node.port] for node in shared_cluster.nodes), per_node
    assert set().union(*per_node.values()) == set(channels)
    positions = await publisher.broker.publish_many([(c, payload(n)) for n, c in enumerate(channels)])
    assert {p.offset for p in positions} == {1}
    await eventually(lambda: len(listener.recorder.envelopes) == 60, lambda: f"{len(listener.recorder.envelopes)}/60")
    assert listener.broker.ready


async def test_history_keys_and_shard_channel_share_the_channel_slot(
    pods: Callable[..., Any], shared_cluster: RedisCluster
) -> None:
    pod = await pods()
    channel = new_channel()
    await pod.broker.publish(channel, payload(1))
    prefix = prefix_of(pod.broker)
    slot = slot_of(pod.broker, channel)
    assert key_slot(redis_keys.meta_key(prefix, channel).encode()) == slot
    assert key_slot(redis_keys.stream_key(prefix, channel).encode()) == slot
    owner = shared_cluster.owner_of(slot)
    assert owner.cli("XLEN", redis_keys.stream_key(prefix, channel)) == "1"


async def test_migrating_a_subscribed_channel_slot_moves_the_subscription_and_delivery_continues(
    pods: Callable[..., Any], shared_cluster: RedisCluster
) -> None:
    listener, publisher = await pods(), await pods()
    channel, bystander = new_channel(), new_channel()
    await listener.broker.subscribe(channel)
    await listener.broker.subscribe(bystander)
    before = await publisher.broker.publish(channel, payload(1))
    await eventually(lambda: len(listener.recorder.on(channel)) == 1, "no delivery before the migration")
    slot = slot_of(listener.broker, channel)
    source = shared_cluster.owner_of(slot)
    target = next(node for node in shared_cluster.nodes if node is not source)
    shared_cluster.move_slot(slot, target)
    assert shared_cluster.owner_of(slot) is target

    shard_name = redis_keys.shard_channel(prefix_of(listener.broker), channel)

    async def moved() -> bool:
        on_target = shard_name in target.cli("PUBSUB", "SHARDCHANNELS", shard_name).split()
        return on_target and shard_name not in source.cli("PUBSUB", "SHARDCHANNELS", shard_name).split()

    await eventually(moved, "the subscription was not re-established on the slot's new master")
    await eventually(lambda: [channel] in listener.recorder.resubscribed, "the hub was not told to catch up")
    await eventually(lambda: listener.broker.ready, "broker not ready after the migration")
    # The history moved with the slot, so the position from before is still resumable.
    after = await publisher.broker.publish(channel, payload(2))
    assert (after.offset, after.epoch) == (2, before.epoch)
    await eventually(lambda: len(listener.recorder.on(channel)) == 2, "no live delivery after the migration")
    history = await listener.broker.history(channel, before)
    assert history.recovered
    assert [e.payload for e in history.envelopes] == [payload(2)]


async def test_losing_a_master_makes_the_broker_unready_until_the_node_is_back(own_cluster: RedisCluster) -> None:
    start, running = pods_fixture(own_cluster)
    try:
        listener, publisher = await start(), await start()
        channels = [new_channel() for _ in range(30)]
        for channel in channels:
            await listener.broker.subscribe(channel)
        victim = own_cluster.nodes[0]
        lost = [c for c in channels if own_cluster.owner_of(slot_of(listener.broker, c)) is victim]
        kept = [c for c in channels if c not in lost]
        assert lost
        assert kept
        await eventually(lambda: listener.broker.ready, "not ready before the fault")

        victim.kill()
        await eventually(lambda: not listener.broker.ready, "broker stayed ready with a master down")
        # The other masters' channels keep flowing while the node is away.
        await publisher.broker.publish(kept[0], payload(1))
        await eventually(lambda: len(listener.recorder.on(kept[0])) == 1, "a healthy master's channel went deaf")
        with pytest.raises(BrokerUnavailable):
            await publisher.broker.publish_many([(kept[1], payload(1)), (lost[0], payload(1))])
        with pytest.raises(BrokerUnavailable):
            await listener.broker.history(lost[0], None)

        victim.start()  # same port and nodes.conf: it rejoins with its slots
        own_cluster.wait_ok()
        await eventually(lambda: listener.broker.ready, "broker did not recover when the master came back")
        await eventually(
            lambda: set(lost) <= {c for notice in listener.recorder.resubscribed for c in notice},
            "the lost channels were not reported as resubscribed",
        )
        assert listener.broker.subscribed_channels == set(channels)

        async def delivered_again() -> bool:
            try:
                await publisher.broker.publish(lost[0], payload(2))
            except BrokerUnavailable:
                return False  # a pooled connection to the restarted node fails once, then is replaced
            return any(e.payload == payload(2) for e in listener.recorder.on(lost[0]))

        await eventually(delivered_again, "no live delivery on the restarted master's channels")
    finally:
        for started in running:
            await started.broker.close()


def shard_channels(cluster: RedisCluster, prefix: str) -> dict[int, set[str]]:
    """Broker channels each master has a sharded subscription for, by port."""
    return {node.port: broker_shard_channels(node, prefix) for node in cluster.nodes}


async def test_subscription_churn_during_traffic_ends_with_the_masters_matching_the_wanted_set(
    pods: Callable[..., Any], shared_cluster: RedisCluster
) -> None:
    listener, publisher = await pods(), await pods()
    prefix = prefix_of(listener.broker)
    steady = new_channel()
    await listener.broker.subscribe(steady)
    wanted, positions = await churn_while_publishing(listener.broker, publisher.broker, steady, 100)
    await eventually(lambda: listener.broker.ready, "broker not ready after churn")

    def matches() -> bool:
        return set().union(*shard_channels(shared_cluster, prefix).values()) == wanted

    await eventually(matches, lambda: f"masters have {shard_channels(shared_cluster, prefix)}, wanted {wanted}")
    assert listener.broker.subscribed_channels == wanted
    assert listener.recorder.resubscribed == []
    await eventually(lambda: len(listener.recorder.on(steady)) == 100, "steady channel events missing")
    assert [e.offset for e in listener.recorder.on(steady)] == [p.offset for p in positions]


async def test_close_leaves_no_tasks_and_no_subscriptions(shared_cluster: RedisCluster) -> None:
    baseline_tasks = {t for t in asyncio.all_tasks() if not t.done()}
    started = await start_broker(cluster_factory(shared_cluster))
    prefix = prefix_of(started.broker)
    channels = [new_channel() for _ in range(12)]
    for channel in channels:
        await started.broker.subscribe(channel)
    await started.broker.publish_many([(c, payload(1)) for c in channels])
    await eventually(lambda: len(started.recorder.envelopes) == 12, "events not delivered")
    assert set().union(*shard_channels(shared_cluster, prefix).values()) == set(channels)
    await started.broker.close()
    assert {t for t in asyncio.all_tasks() if not t.done()} == baseline_tasks

    def released() -> bool:
        return not any(shard_channels(shared_cluster, prefix).values())

    await eventually(released, "a master still lists the closed broker's shard channels")


async def test_a_replica_promoted_after_its_master_dies_takes_over_the_channels(
    replicated_cluster: RedisCluster,
) -> None:
    start, running = pods_fixture(replicated_cluster)
    try:
        listener, publisher = await start(), await start()
        channels = [new_channel() for _ in range(30)]
        for channel in channels:
            await listener.broker.subscribe(channel)
        slot = slot_of(listener.broker, channels[0])
        victim = replicated_cluster.owner_of(slot)
        lost = [c for c in channels if replicated_cluster.owner_of(slot_of(listener.broker, c)) is victim]
        before = await publisher.broker.publish(channels[0], payload(1))
        await eventually(lambda: len(listener.recorder.on(channels[0])) == 1, "no delivery before the failover")
        assert victim.cli("WAIT", "1", "5000") == "1", "the replica did not acknowledge the write"

        victim.kill()
        await eventually(lambda: not listener.broker.ready, "broker stayed ready with a master down")
        await eventually(lambda: replicated_cluster.owner_of(slot) is not victim, "no replica was promoted")
        promoted = replicated_cluster.owner_of(slot)
        await eventually(lambda: listener.broker.ready, "broker did not move to the promoted replica")
        assert isinstance(listener.broker, RedisBroker)
        assert channels[0] in listener.broker._subscriber.links()[("127.0.0.1", promoted.port)]
        await eventually(
            lambda: set(lost) <= {c for notice in listener.recorder.resubscribed for c in notice},
            "the moved channels were not reported as resubscribed",
        )

        last_publish = [0.0]

        async def delivered_again() -> bool:
            if any(e.payload == payload(2) for e in listener.recorder.on(channels[0])):
                return True
            # Once a second, not on every check: a loaded machine must not flood the history.
            if time.monotonic() - last_publish[0] >= 1.0:
                last_publish[0] = time.monotonic()
                with contextlib.suppress(BrokerUnavailable):  # until the client has the new slot map
                    await publisher.broker.publish(channels[0], payload(2))
            return False

        await eventually(delivered_again, "no live delivery from the promoted replica")
        # The replica had the history, so the position from before the failover is resumable.
        history = await listener.broker.history(channels[0], before)
        assert history.recovered, f"{before} not resumable: now at {history.position}"
        assert history.position.epoch == before.epoch
    finally:
        for started in running:
            await started.broker.close()


async def test_a_silent_master_is_noticed_and_its_channels_come_back_when_it_answers(own_cluster: RedisCluster) -> None:
    start, running = pods_fixture(own_cluster)
    try:
        listener, publisher = await start(), await start()
        channels = [new_channel() for _ in range(20)]
        for channel in channels:
            await listener.broker.subscribe(channel)
        victim = own_cluster.owner_of(slot_of(listener.broker, channels[0]))
        victim.pause()
        try:
            await eventually(lambda: not listener.broker.ready, "a silent master was not noticed")
        finally:
            victim.resume()
        own_cluster.wait_ok()
        await eventually(lambda: listener.broker.ready, "broker did not recover when the master answered again")
        notices = listener.recorder.resubscribed
        await eventually(
            lambda: any(channels[0] in n for n in notices), "the silent master's channels were not refilled"
        )

        async def delivered() -> bool:
            try:
                await publisher.broker.publish(channels[0], payload(1))
            except BrokerUnavailable:
                return False
            return bool(listener.recorder.on(channels[0]))

        await eventually(delivered, "no live delivery after the master answered again")
    finally:
        for started in running:
            await started.broker.close()


async def test_two_pods_on_the_cluster_deliver_published_events_and_share_presence(
    app_client: AppClient, shared_cluster: RedisCluster
) -> None:
    prefix = f"app{uuid.uuid4().hex[:6]}:"
    settings = [make_settings(redis_url=shared_cluster.url, redis_prefix=prefix, pod_id=f"pod-{n}") for n in (1, 2)]
    first, second = await app_client(settings[0]), await app_client(settings[1])
    customers = [f"C{n}" for n in range(6)]
    sockets = []
    for customer in customers:
        ws = await connect(first, token_for(settings[0], sub=f"user-{customer}", customers=[customer]))
        assert (await subscribe(ws))["type"] == "subscribed"
        sockets.append(ws)
    for customer in customers:
        response = await publish(
            second, settings[1], {"type": "transaction_new", "data": txn(f"T-{customer}", customer)}
        )
        assert response.status == 202
    for customer, ws in zip(customers, sockets, strict=True):
        event = await receive_type(ws, "transaction_new")
        assert event["data"]["id"] == f"T-{customer}"
        assert event["offset"] == 1
    owners = {
        shared_cluster.owner_of(key_slot(redis_keys.shard_channel(prefix, f"transactions:{c}").encode()))
        for c in customers
    }
    assert len(owners) > 1, "the customers' channels should live on several masters"
    auth = {"Authorization": "Bearer " + token_for(settings[1], sub="reader", customers=["C0"])}
    body = await (await second.get("/api/v1/presence/C0", headers=auth)).json()
    assert body["count"] == 1
    assert [c["podId"] for c in body["connections"]] == ["pod-1"]


async def test_foreign_publishers_script_is_delivered_and_garbage_is_counted_and_dropped(
    pods: Callable[..., Any], shared_cluster: RedisCluster
) -> None:
    pod = await pods()
    channel = new_channel()
    await pod.broker.subscribe(channel)
    prefix = prefix_of(pod.broker)
    owner = shared_cluster.owner_of(slot_of(pod.broker, channel))
    shard = redis_keys.shard_channel(prefix, channel)
    invalid_before = metrics.BROKER_INVALID_MESSAGES._value.get()
    for garbage in ('{"type":"transaction_update"}', "e1:0:abc\n{}", "e1:1:abc\n"):
        assert owner.cli("SPUBLISH", shard, garbage) == "1"
    keys = [redis_keys.meta_key(prefix, channel), redis_keys.stream_key(prefix, channel)]
    reply = owner.cli("EVAL", wire.CLUSTER_PUBLISH_SCRIPT, "2", *keys, "fromgo1", "600", shard, "1000", '{"id":"t1"}')
    assert reply.split() == ["1", "fromgo1", "0"]  # offset, epoch, not a duplicate
    await eventually(lambda: len(pod.recorder.on(channel)) == 1, "the script's event was not delivered")
    assert pod.recorder.on(channel)[0].payload == b'{"id":"t1"}'
    assert metrics.BROKER_INVALID_MESSAGES._value.get() == invalid_before + 3
    assert pod.broker.ready


async def test_publishing_through_a_slot_migration_keeps_offsets_contiguous_and_history_complete(
    pods: Callable[..., Any], shared_cluster: RedisCluster
) -> None:
    listener, publisher = await pods(), await pods()
    channel = new_channel()
    await listener.broker.subscribe(channel)
    slot = slot_of(listener.broker, channel)
    source = shared_cluster.owner_of(slot)
    target = next(node for node in shared_cluster.nodes if node is not source)
    accepted: list[Position] = []
    refused = 0
    migrating = asyncio.Event()

    async def publish_steadily() -> None:
        nonlocal refused
        for n in range(1, 301):
            if n == 100:
                migrating.set()
            try:
                accepted.append(await publisher.broker.publish(channel, payload(n)))
            except BrokerUnavailable:
                refused += 1  # e.g. TRYAGAIN while the slot's keys are split between the nodes
            await asyncio.sleep(0)

    async def migrate() -> None:
        await migrating.wait()
        await asyncio.to_thread(shared_cluster.move_slot, slot, target)

    await asyncio.gather(publish_steadily(), migrate())
    assert shared_cluster.owner_of(slot) is target
    assert len(accepted) + refused == 300
    offsets = [p.offset for p in accepted]
    assert offsets == sorted(offsets)
    assert len({p.epoch for p in accepted}) == 1
    history = await listener.broker.history(channel, Position(offset=0, epoch=accepted[0].epoch))
    assert history.recovered
    assert [e.offset for e in history.envelopes] == list(range(1, history.position.offset + 1))
    assert set(offsets) <= {e.offset for e in history.envelopes}
    await eventually(lambda: listener.broker.ready, "broker not ready after the migration")
    last = await publisher.broker.publish(channel, payload(301))
    await eventually(
        lambda: any(e.offset == last.offset for e in listener.recorder.on(channel)), "no live delivery afterwards"
    )
