"""The ConnectionCounter contract, run against every implementation, and the Redis one across pods."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import make_mocked_request

from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service import metrics
from service.limits import ConnectionCounter, ConnectionLimits, LocalConnectionCounter, client_ip
from service.limits_redis import REFRESH_KEYS_PER_CALL, RedisConnectionCounter
from service.redis_client import any_command_client, cluster_client, command_client
from tests.backends import Store

CounterFactory = Callable[[], Awaitable[ConnectionCounter]]


async def _local() -> ConnectionCounter:
    return LocalConnectionCounter()


def _redis_counter(server: RedisServer, pod_id: str = "pod-a", lease_ttl_s: float = 30.0) -> RedisConnectionCounter:
    # The pool the service uses: a burst waits for one of 16 connections instead of failing.
    client = command_client(server.url, max_connections=16, wait_s=2.0)
    return RedisConnectionCounter(client, prefix="t:", pod_id=pod_id, lease_ttl_s=lease_ttl_s)


def _cluster_counter(cluster: RedisCluster) -> RedisConnectionCounter:
    client = cluster_client(cluster.url, max_connections=16, options={})
    return RedisConnectionCounter(client, prefix=f"t{uuid.uuid4().hex[:6]}:", pod_id="pod-a")


@pytest.fixture(params=["local", "redis", "cluster"])
async def counter(request) -> AsyncIterator[ConnectionCounter]:
    if request.param == "local":
        made = await _local()
    elif request.param == "redis":
        made = _redis_counter(request.getfixturevalue("redis_server"))
    else:
        made = _cluster_counter(request.getfixturevalue("module_cluster"))
    yield made
    await made.close()


def _counter_on(store: Store, pod_id: str, lease_ttl_s: float = 30.0) -> ConnectionCounter:
    """A pod's counter on a store of any topology (tests/backends.py)."""
    if store.url is None:
        return LocalConnectionCounter()
    client = any_command_client(store.url, max_connections=16, wait_s=2.0, options={})
    return RedisConnectionCounter(client, prefix=store.prefix, pod_id=pod_id, lease_ttl_s=lease_ttl_s)


async def test_leases_taken_while_the_store_was_down_count_once_it_is_up(absent_store: Store) -> None:
    if not absent_store.shared:
        pytest.skip("an in-process counter is never down")
    early = _counter_on(absent_store, "pod-a", lease_ttl_s=1.5)
    later = _counter_on(absent_store, "pod-b")
    try:
        # Nobody is locked out while the shared store cannot answer.
        assert await early.acquire("user:a", "c1", 2)
        assert await early.acquire("user:a", "c2", 2)
        absent_store.up()

        async def counted() -> bool:
            try:
                return not await later.acquire("user:a", "c3", 2)
            finally:
                await later.release("user:a", "c3")

        # The refresh writes the leases the store missed, so the cap holds across pods again.
        await eventually(counted, "the leases taken while the store was down never counted")
    finally:
        await early.close()
        await later.close()


async def test_the_cap_holds_across_pods_sharing_redis(redis_server):
    pod_a, pod_b = _redis_counter(redis_server, "pod-a"), _redis_counter(redis_server, "pod-b")
    try:
        assert await pod_a.acquire("user:a", "c1", 2)
        assert await pod_b.acquire("user:a", "c2", 2)
        assert not await pod_b.acquire("user:a", "c3", 2)
        await pod_a.release("user:a", "c1")
        assert await pod_b.acquire("user:a", "c3", 2)
    finally:
        await pod_a.close()
        await pod_b.close()


async def test_leases_of_a_pod_that_died_stop_counting(redis_server):
    dead = _redis_counter(redis_server, "pod-dead", lease_ttl_s=1.0)
    alive = _redis_counter(redis_server, "pod-alive", lease_ttl_s=1.0)
    try:
        assert await dead.acquire("user:a", "c1", 1)
        assert dead._refresher is not None
        dead._refresher.cancel()  # the pod is gone: nobody refreshes or releases its lease
        assert not await alive.acquire("user:a", "c2", 1)

        async def freed() -> bool:
            return await alive.acquire("user:a", "c2", 1)

        await eventually(freed, "the dead pod's lease to expire")
        await asyncio.sleep(1.5)  # past one lease TTL: the living pod's refresh keeps its own lease
        assert not await dead.acquire("user:a", "c3", 1)
    finally:
        await alive.close()
        await dead.close()


async def test_the_refresh_keeps_the_leases_of_many_users_alive(redis_server):
    # More users than one refresh script takes, each with a lease and a cap of one.
    users = [f"user:{i}" for i in range(REFRESH_KEYS_PER_CALL + 20)]
    pod = _redis_counter(redis_server, "pod-a", lease_ttl_s=1.0)
    other = _redis_counter(redis_server, "pod-b", lease_ttl_s=1.0)
    try:
        assert all(await asyncio.gather(*(pod.acquire(user, f"c-{user}", 1) for user in users)))
        await asyncio.sleep(2.5)  # more than two lease TTLs: only refreshes keep them
        refused = await asyncio.gather(*(other.acquire(user, f"d-{user}", 1) for user in users))
        assert not any(refused), "a refreshed lease expired"
    finally:
        await other.close()
        await pod.close()


async def test_concurrent_acquires_and_releases_of_many_keys_get_their_own_answers(redis_server):
    pod_a, pod_b = _redis_counter(redis_server, "pod-a"), _redis_counter(redis_server, "pod-b")
    try:
        assert all(await asyncio.gather(*(pod_a.acquire(f"user:{n}", "old", 2) for n in range(100))))
        # In one turn, per user: pod A gives back its lease, then both pods ask for two more.
        answers = await asyncio.gather(
            *(pod_a.release(f"user:{n}", "old") for n in range(100)),
            *(pod_a.acquire(f"user:{n}", "a", 2) for n in range(100)),
            *(pod_b.acquire(f"user:{n}", "b1", 2) for n in range(100)),
            *(pod_b.acquire(f"user:{n}", "b2", 2) for n in range(100)),
        )
        granted_a, granted_b1, granted_b2 = answers[100:200], answers[200:300], answers[300:]
        assert all(granted_a), "a released slot was not free for the acquires after it"
        assert all(granted_b1), "a released slot was not free for the acquires after it"
        assert not any(granted_b2), "a cap was exceeded"
        await pod_b.release("user:7", "b1")
        assert await pod_a.acquire("user:7", "a2", 2)
    finally:
        await pod_a.close()
        await pod_b.close()


async def test_an_unreachable_redis_lets_concurrent_connections_in_and_says_so(redis_server):
    counter = _redis_counter(redis_server)
    redis_server.kill()
    before = metrics.CONNECTION_CAPS_UNAVAILABLE._value.get()
    try:
        assert all(await asyncio.gather(*(counter.acquire("user:a", f"c{i}", 1) for i in range(50))))
        assert metrics.CONNECTION_CAPS_UNAVAILABLE._value.get() == before + 50
        await asyncio.gather(*(counter.release("user:a", f"c{i}") for i in range(50)))  # logged, not raised
    finally:
        await counter.close()


async def test_slots_up_to_the_limit_then_refused(counter):
    assert [await counter.acquire("user:a", f"c{i}", 3) for i in range(5)] == [True, True, True, False, False]


async def test_concurrent_acquires_never_exceed_the_limit(counter):
    granted = await asyncio.gather(*(counter.acquire("user:a", f"c{i}", 10) for i in range(200)))
    assert sum(granted) == 10


async def test_acquiring_the_same_lease_twice_holds_one_slot(counter):
    assert await counter.acquire("user:a", "c1", 2)
    assert await counter.acquire("user:a", "c1", 2)
    assert await counter.acquire("user:a", "c2", 2)
    assert not await counter.acquire("user:a", "c3", 2)


async def test_release_frees_a_slot_and_unknown_releases_do_nothing(counter):
    assert await counter.acquire("user:a", "c1", 1)
    await counter.release("user:a", "nobody")
    await counter.release("user:zzz", "c1")
    assert not await counter.acquire("user:a", "c2", 1)
    await counter.release("user:a", "c1")
    await counter.release("user:a", "c1")
    assert await counter.acquire("user:a", "c2", 1)
    assert not await counter.acquire("user:a", "c3", 1)


async def test_keys_are_independent(counter):
    assert await counter.acquire("user:a", "c1", 1)
    assert await counter.acquire("user:b", "c1", 1)
    assert await counter.acquire("ip:a", "c1", 1)


async def test_local_counter_forgets_empty_keys():
    counter = LocalConnectionCounter()
    for i in range(1000):
        await counter.acquire(f"user:{i}", "c", 1)
        await counter.release(f"user:{i}", "c")
    assert counter._leases == {}


async def test_zero_turns_a_cap_off():
    limits = ConnectionLimits(LocalConnectionCounter(), per_user=0, per_ip=0)
    assert all([await limits.acquire_user(f"c{i}", "u") for i in range(1000)])
    assert all([await limits.acquire_ip(f"c{i}", "1.2.3.4") for i in range(1000)])


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        (None, "6.6.6.6", None),
        ("X-Forwarded-For", "6.6.6.6, 10.0.0.7", "10.0.0.7"),
        ("X-Forwarded-For", "10.0.0.7", "10.0.0.7"),
        ("X-Forwarded-For", "", None),
        ("X-Forwarded-For", "6.6.6.6, ", None),
        ("X-Real-IP", "10.0.0.8", "10.0.0.8"),
    ],
)
def test_client_ip_is_the_last_proxy_entry_or_the_peer(header, value, expected):
    request = make_mocked_request("GET", "/", headers={header or "X-Forwarded-For": value})
    peer = request.remote or "unknown"
    assert client_ip(request, header) == (expected or peer)
