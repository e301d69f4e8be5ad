"""The rebalancer against a real Redis: shares are computed over live pods, a pod above its share sheds whole
customers with 4013, customers that come back are not shed again, and a draining pod leaves the average."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from fleet.redis_cluster import RedisCluster as RedisCluster_
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.auth import Principal
from service.keys import Lifecycle
from service.protocol import CloseCode
from service.rebalance import Rebalancer
from tests.conftest import AppClient

_ids = itertools.count()


@dataclass(eq=False)
class FakeSocket:
    """What the rebalancer reads of a connection, and the close it performs."""

    principal: Principal
    conn_id: str = field(default_factory=lambda: f"c{next(_ids)}")
    opened_at: float = field(default_factory=time.monotonic)
    closing: bool = False
    close_code: CloseCode | None = None
    lifecycle: Lifecycle | None = None

    async def close(self, code: CloseCode, message: str) -> None:
        self.closing = True
        self.close_code = code
        if self.lifecycle is not None:
            self.lifecycle.connections.discard(self)


def sockets(lifecycle: Lifecycle, customer: str, count: int) -> list[FakeSocket]:
    principal = Principal(user_id="u", customer_ids=(customer,), roles=frozenset(), expires_at=0)
    made = [FakeSocket(principal, lifecycle=lifecycle) for _ in range(count)]
    lifecycle.connections.update(made)  # type: ignore[arg-type]
    return made


def customers_of(lifecycle: Lifecycle) -> set[str]:
    return {next(iter(s.principal.customer_ids)) for s in lifecycle.connections}


@pytest.fixture(params=["redis", "cluster"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Redis | RedisCluster]:
    """A client of one Redis or of a Redis Cluster, with no rebalance report in it yet."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis: Redis | RedisCluster = Redis.from_url(server.url)
    else:
        cluster: RedisCluster_ = request.getfixturevalue("module_cluster")
        redis = RedisCluster.from_url(cluster.nodes[0].url)
    await redis.delete("t:rebalance:connections")
    yield redis
    await redis.aclose()


def rebalancer(client: Redis | RedisCluster, lifecycle: Lifecycle, pod_id: str, **options: Any) -> Rebalancer:
    settings: dict[str, Any] = {"interval_s": 0.1, "tolerance": 0.2, "max_shed": 4} | options
    return Rebalancer(client, lifecycle, prefix="t:", pod_id=pod_id, **settings)


async def test_a_pod_above_its_share_sheds_whole_customers_with_4013(client: Redis | RedisCluster):
    busy, idle = Lifecycle(), Lifecycle()
    for n in range(10):
        sockets(busy, f"C{n}", 2)  # 20 sockets, two per customer
    big, small = rebalancer(client, busy, "busy"), rebalancer(client, idle, "idle")
    assert await small.step() == 0  # alone so far: nobody to give to
    before = set(busy.connections)
    shed = await big.step()  # average 10, threshold 12: shed the excess, capped at 4
    assert shed == 4
    closed = before - busy.connections
    assert {s.close_code for s in closed} == {CloseCode.REBALANCE}
    assert len(busy.connections) == 16
    assert len(customers_of(busy)) == 8  # two whole customers left; none was split
    assert await small.step() == 0


async def test_customers_that_come_back_are_not_shed_again(client: Redis | RedisCluster):
    busy, idle = Lifecycle(), Lifecycle()
    for n in range(6):
        sockets(busy, f"C{n}", 2)
    big, small = rebalancer(client, busy, "busy", max_shed=2), rebalancer(client, idle, "idle")
    await small.step()
    assert await big.step() == 2
    (gone,) = {f"C{n}" for n in range(6)} - customers_of(busy)
    # The load balancer sends that customer straight back: the ring routes it to this pod.
    await asyncio.sleep(0.01)
    sockets(busy, gone, 2)
    for _ in range(5):
        await small.step()
        await big.step()
    still = customers_of(busy)
    assert gone in still
    assert len(still) < 6  # others were shed meanwhile


async def test_a_draining_or_crashed_pod_leaves_the_average(client: Redis | RedisCluster):
    busy, gone = Lifecycle(), Lifecycle()
    for n in range(10):
        sockets(busy, f"C{n}", 1)
    crashed = rebalancer(client, gone, "crashed", interval_s=0.05)
    await crashed.step()  # reports 0 sockets, then never again
    big = rebalancer(client, busy, "busy", interval_s=0.05)
    assert await big.step() == 4  # average 5: sheds
    await asyncio.sleep(0.3)  # more than three of the crashed pod's intervals
    assert await big.step() == 0  # alone again
    assert set(await client.hkeys("t:rebalance:connections")) == {b"busy"}

    busy.draining = True
    assert await big.step() == 0
    assert await client.hkeys("t:rebalance:connections") == []


async def test_a_pod_on_redis_cluster_with_rebalancing_starts_and_reports_its_connections(
    app_client: AppClient, module_cluster: RedisCluster_
) -> None:
    prefix = f"r{uuid.uuid4().hex[:6]}:"
    await app_client(redis_url=module_cluster.url, redis_prefix=prefix, pod_id="pod-r", rebalance_interval_s="0.1")
    reader = RedisCluster.from_url(module_cluster.nodes[0].url)
    try:

        async def reported() -> bool:
            return await reader.hkeys(f"{prefix}rebalance:connections") == [b"pod-r"]

        await eventually(reported, "the pod never reported its connections to the cluster")
    finally:
        await reader.aclose()
