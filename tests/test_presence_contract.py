"""The Presence contract, one suite run against every topology: in-process, one Redis, Redis Cluster."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fleet.waiting import eventually
from service.backend_errors import BackendUnavailable
from service.presence import MemoryPresence, Presence, PresenceEntry
from service.presence_redis import RedisPresence
from service.redis_client import cancel_and_wait
from tests.backends import Store

PresenceFactory = Callable[..., Presence]


def presence_factory(store: Store) -> PresenceFactory:
    """Presence of pods of one deployment on `store`; `options` are the Redis tunables."""

    def make(pod_id: str, **options: Any) -> Presence:
        if store.url is None:
            return MemoryPresence()
        return RedisPresence(url=store.url, prefix=store.prefix, pod_id=pod_id, **options)

    return make


def entry(pod_id: str, user_id: str = "u1", *, at: float | None = None) -> PresenceEntry:
    return PresenceEntry(
        conn_id=uuid.uuid4().hex, user_id=user_id, pod_id=pod_id, connected_at=time.time() if at is None else at
    )


async def simulate_kill(presence: Presence) -> None:
    """As kill -9 would: the heartbeat stops and nothing is cleaned up."""
    assert isinstance(presence, RedisPresence)
    assert presence._heartbeat is not None
    await cancel_and_wait(presence._heartbeat)
    presence._heartbeat = None
    presence._local.clear()


def pods_on(store: Store) -> tuple[Callable[..., Any], list[Presence]]:
    make = presence_factory(store)
    running: list[Presence] = []

    async def start(pod_id: str, **options: Any) -> Presence:
        presence = make(pod_id, **options)
        await presence.start()
        running.append(presence)
        return presence

    return start, running


@pytest.fixture
async def pods(store: Store) -> AsyncIterator[Callable[..., Any]]:
    """Start presence instances (one per pod) sharing the store; closed after the test."""
    start, running = pods_on(store)
    yield start
    for presence in running:
        await presence.close()


async def test_added_connections_are_listed_oldest_first_and_counted(pods: Callable[..., Any]) -> None:
    pod = await pods("pod-a")
    one, two = entry("pod-a", "u1", at=100.0), entry("pod-a", "u2", at=50.0)
    await pod.add(["c1", "c2"], one)
    await pod.add(["c1"], two)
    assert await pod.list("c1") == [two, one]
    assert await pod.count("c1") == 2
    assert await pod.list("c2") == [one]
    assert await pod.count("nobody") == 0
    assert await pod.list("nobody") == []


async def test_every_pod_reads_every_pods_connections(store: Store, pods: Callable[..., Any]) -> None:
    if not store.shared:
        pytest.skip("in-process presence is one pod's")
    first, second = await pods("pod-a"), await pods("pod-b")
    one, two = entry("pod-a", "u1", at=100.0), entry("pod-b", "u2", at=50.0)
    customers = [f"C{n}" for n in range(12)]  # on every master of a cluster
    await first.add(customers, one)
    await second.add(customers[:1], two)
    assert await second.list(customers[0]) == [two, one]
    for customer in customers[1:]:
        assert await second.count(customer) == 1


async def test_add_and_remove_are_idempotent(pods: Callable[..., Any]) -> None:
    pod = await pods("pod-a")
    connection = entry("pod-a")
    await pod.add(["c1"], connection)
    await pod.add(["c1"], connection)
    assert await pod.count("c1") == 1
    await pod.remove(["c1"], connection.conn_id)
    await pod.remove(["c1"], connection.conn_id)
    await pod.remove(["c1"], "never-added")
    assert await pod.count("c1") == 0
    assert await pod.list("c1") == []


async def test_close_removes_the_pods_entries(store: Store, pods: Callable[..., Any]) -> None:
    pod = await pods("pod-a")
    reader = await pods("pod-b") if store.shared else pod
    await pod.add(["c1"], entry("pod-a"))
    await pod.close()
    assert await reader.count("c1") == 0
    assert await reader.list("c1") == []


async def test_entries_of_a_killed_pod_disappear_within_the_heartbeat_ttl(
    store: Store, pods: Callable[..., Any]
) -> None:
    if not store.shared:
        pytest.skip("in-process entries die with their process")
    victim, survivor = await pods("pod-v", heartbeat_ttl_s=1.0), await pods("pod-s")
    lost, kept = entry("pod-v"), entry("pod-s")
    await victim.add(["c1"], lost)
    await survivor.add(["c1"], kept)
    await simulate_kill(victim)

    async def only_survivor() -> bool:
        return await survivor.list("c1") == [kept] and await survivor.count("c1") == 1

    await eventually(only_survivor, "the killed pod's entry did not expire")


async def test_a_pod_started_while_its_store_is_down_writes_its_entries_when_the_store_is_up(
    absent_store: Store,
) -> None:
    start, running = pods_on(absent_store)
    try:
        presence = await start("pod-s", heartbeat_ttl_s=1.5)
        connection = entry("pod-s")
        if absent_store.shared:
            with pytest.raises(BackendUnavailable):
                await presence.add(["c1"], connection)
            absent_store.up()
        else:
            await presence.add(["c1"], connection)

        async def listed() -> bool:
            try:
                return await presence.list("c1") == [connection]
            except BackendUnavailable:
                return False  # a cluster being created answers CLUSTERDOWN for a moment

        await eventually(listed, "the entry added before the store was up never reached it")
    finally:
        for presence in running:
            await presence.close()


async def test_writes_that_failed_while_the_store_was_down_are_retried_when_it_is_back(absent_store: Store) -> None:
    if not absent_store.shared:
        pytest.skip("in-process presence is never down")
    absent_store.up()
    start, running = pods_on(absent_store)
    try:
        presence, reader = await start("pod-d", heartbeat_ttl_s=1.5), await start("pod-r")
        gone_while_down = entry("pod-d", "u-gone")
        await presence.add(["c1"], gone_while_down)
        absent_store.down()
        added_while_down = entry("pod-d", "u-new")
        for call in (
            presence.add(["c1"], added_while_down),
            presence.remove(["c1"], gone_while_down.conn_id),
            presence.list("c1"),
            presence.count("c1"),
        ):
            with pytest.raises(BackendUnavailable):
                await call
        absent_store.up()

        async def healed() -> bool:
            try:
                return await reader.list("c1") == [added_while_down]
            except BackendUnavailable:
                return False  # a restarted node may refuse until the cluster agrees again

        # The heartbeat writes the add and the remove that the store could not take.
        await eventually(healed, "presence did not catch up with what happened while the store was down")
    finally:
        for presence in running:
            await presence.close()


async def test_a_customers_keys_carry_the_customer_as_hash_tag(store: Store, pods: Callable[..., Any]) -> None:
    if not store.shared:
        pytest.skip("no keys in process")
    pod = await pods("pod-a")
    await pod.add(["C1"], entry("pod-a"))
    for key in (f"{store.prefix}presence:{{C1}}", f"{store.prefix}presence_count:{{C1}}"):
        # Nodes that do not own the slot answer MOVED.
        assert sum(int(reply) for reply in store.cli("EXISTS", key) if reply.isdigit()) == 1, key


async def test_a_burst_of_connections_of_many_customers_is_recorded_and_removed(pods: Callable[..., Any]) -> None:
    pod = await pods("pod-a")
    entries = [entry("pod-a", f"u{n}") for n in range(300)]
    # More concurrent writes than a pod has connections to any one master.
    await asyncio.gather(*(pod.add([f"C{n}"], e) for n, e in enumerate(entries)))
    for n in range(0, 300, 23):
        assert await pod.list(f"C{n}") == [entries[n]]
    await asyncio.gather(*(pod.remove([f"C{n}"], e.conn_id) for n, e in enumerate(entries)))
    for n in range(0, 300, 23):
        assert await pod.count(f"C{n}") == 0
