"""RedisClusterPresence against a real three-master Redis Cluster: every master, read from any pod, expiry."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from fleet.redis_cluster import RedisCluster
from fleet.waiting import eventually
from service.broker import create_presence
from service.broker.base import BrokerUnavailable
from service.config import Settings
from service.presence import PresenceEntry
from service.presence_redis_cluster import RedisClusterPresence
from service.redis_client import cancel_and_wait


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    started = RedisCluster(tmp_path_factory.mktemp("presence-cluster"))
    started.start()
    yield started
    started.stop()


@pytest.fixture
async def pods(cluster: RedisCluster) -> AsyncIterator[Callable[..., Any]]:
    """Start presence instances (one per pod) sharing a prefix; closed after the test."""
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    running: list[RedisClusterPresence] = []

    async def start(pod_id: str, **options: Any) -> RedisClusterPresence:
        presence = RedisClusterPresence(url=cluster.url, prefix=prefix, pod_id=pod_id, **options)
        await presence.start()
        running.append(presence)
        return presence

    yield start
    for presence in running:
        await presence.close()


def entry(pod_id: str, user_id: str = "u1", *, at: float | None = None) -> PresenceEntry:
    return PresenceEntry(
        conn_id=uuid.uuid4().hex, user_id=user_id, pod_id=pod_id, connected_at=time.time() if at is None else at
    )


def test_create_presence_picks_the_cluster_presence_for_cluster_urls() -> None:
    settings = Settings(redis_url="redis+cluster://127.0.0.1:1", pod_id="p")
    assert isinstance(create_presence(settings), RedisClusterPresence)


async def test_customers_on_every_master_are_listed_and_counted_from_any_pod(
    pods: Callable[..., Any], cluster: RedisCluster
) -> None:
    first, second = await pods("pod-a"), await pods("pod-b")
    customers = [f"c{n}" for n in range(12)]
    owners = {cluster.owner_of(key_slot(first._keys(c)[0].encode())).port for c in customers}
    assert owners == {node.port for node in cluster.nodes}, "the customers should span every master"
    one, two = entry("pod-a", "u1", at=100.0), entry("pod-b", "u2", at=50.0)
    await first.add(customers, one)
    await second.add(customers[:6], two)
    for customer in customers[:6]:
        assert await second.list(customer) == [two, one]
        assert await first.count(customer) == 2
    for customer in customers[6:]:
        assert await second.list(customer) == [one]
        assert await second.count(customer) == 1
    assert await first.count("nobody") == 0


async def test_a_customers_hashes_share_one_slot(pods: Callable[..., Any]) -> None:
    pod = await pods("pod-a")
    entries_key, counts_key = pod._keys("C-42")
    assert key_slot(entries_key.encode()) == key_slot(counts_key.encode()) == key_slot(b"C-42")


async def test_add_and_remove_are_idempotent(pods: Callable[..., Any]) -> None:
    pod = await pods("pod-a")
    connection = entry("pod-a")
    await pod.add(["c1", "c2"], connection)
    await pod.add(["c1", "c2"], connection)
    assert await pod.count("c1") == 1
    await pod.remove(["c1", "c2"], connection.conn_id)
    await pod.remove(["c1", "c2"], connection.conn_id)
    assert await pod.count("c1") == 0
    assert await pod.list("c2") == []


async def test_entries_of_a_killed_pod_disappear_within_the_heartbeat_ttl(pods: Callable[..., Any]) -> None:
    survivor = await pods("pod-a")
    doomed = await pods("pod-b", heartbeat_ttl_s=1.0)
    kept = entry("pod-a")
    await survivor.add(["c1"], kept)
    for _ in range(3):
        await doomed.add(["c1", "c2", "c3"], entry("pod-b"))
    assert await survivor.count("c1") == 4
    # As kill -9 would: the heartbeat stops and nothing is cleaned up.
    assert doomed._heartbeat is not None
    await cancel_and_wait(doomed._heartbeat)
    doomed._heartbeat = None
    doomed._local.clear()

    async def only_survivor_counted() -> bool:
        return bool(await survivor.count("c1") == 1)

    await eventually(only_survivor_counted, "the killed pod's entries were still counted")
    assert await survivor.list("c1") == [kept]
    assert await survivor.list("c2") == []
    assert await survivor.count("c3") == 0


async def test_close_removes_the_pods_entries(pods: Callable[..., Any]) -> None:
    leaving, staying = await pods("pod-a"), await pods("pod-b")
    await leaving.add(["c1", "c2", "c3"], entry("pod-a"))
    kept = entry("pod-b")
    await staying.add(["c1"], kept)
    await leaving.close()
    assert await staying.list("c1") == [kept]
    assert await staying.count("c2") == 0


async def test_a_dead_master_makes_only_its_customers_presence_unavailable(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path)
    cluster.start()
    presence = RedisClusterPresence(url=cluster.url, prefix="d:", pod_id="pod-a")
    try:
        await presence.start()
        customers = [f"c{n}" for n in range(12)]
        victim = cluster.nodes[0]
        on_victim = [c for c in customers if cluster.owner_of(key_slot(c.encode())) is victim]
        elsewhere = [c for c in customers if c not in on_victim]
        assert on_victim
        assert elsewhere
        victim.kill()
        with pytest.raises(BrokerUnavailable):
            await presence.count(on_victim[0])
        with pytest.raises(BrokerUnavailable):
            await presence.add([on_victim[0]], entry("pod-a"))

        async def served() -> bool:
            try:
                await presence.add(elsewhere, entry("pod-a"))
            except BrokerUnavailable:
                return False  # the first command on a dead node's pooled connection
            return True

        await eventually(served, "customers of healthy masters lost their presence")
        assert await presence.count(elsewhere[0]) >= 1
    finally:
        await presence.close()
        cluster.stop()
