"""The ConnectionCounter contract, run against every implementation (the Redis one joins the list)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import make_mocked_request

from service.limits import ConnectionCounter, ConnectionLimits, LocalConnectionCounter, client_ip

CounterFactory = Callable[[], Awaitable[ConnectionCounter]]


async def _local() -> ConnectionCounter:
    return LocalConnectionCounter()


@pytest.fixture(params=[_local], ids=["local"])
async def counter(request) -> AsyncIterator[ConnectionCounter]:
    made = await request.param()
    yield made
    await made.close()


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
