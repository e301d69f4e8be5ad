"""Rebalance after a scale-out: a pod holding more than its share of connections sheds a few with 4013, rate-limited.

Consistent hashing sends a new worker only the *new* connections of the customers it takes
over; the sockets already open stay where they are until they close. Every
`EVA_WS_REBALANCE_INTERVAL_S` (jittered) each pod writes its connection count to one Redis
hash and reads everyone's:

- `{prefix}rebalance:connections`: hash pod_id -> "count:unix_ms". Fields older than
  three intervals (a crashed pod) are deleted by the script that reads them, so the
  average is over live pods only. A draining pod removes its field.

A pod above `(1 + tolerance) x average` closes at most `max_shed_per_interval` sockets with
4013 (REBALANCE), spread over the interval. Clients reconnect at once with jitter and
resume from their offsets (nothing is lost), and the load balancer routes them by the
current ring, so some land on the new pod. The pod sheds whole routing keys (all sockets
of a customer), so a customer keeps living on one pod. A customer whose sockets come back
to this pod is routed here by the ring: it is not shed again for `PIN_INTERVALS`
intervals, so a ring that gives this pod more than the average settles instead of
churning.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from redis.asyncio import Redis, RedisCluster

from service import keys, metrics, redis_keys, redis_lua
from service.connection import Connection
from service.keys import Lifecycle
from service.log import get_logger
from service.protocol import CloseCode
from service.redis_client import (
    REDIS_ERRORS,
    any_command_client,
    cancel_and_wait,
    client_name_part,
    client_options,
    eval_script,
)

log = get_logger("eva_ws.rebalance")

# Report fields older than this many intervals belong to pods that are gone.
STALE_INTERVALS: Final = 3
# A routing key that came back after a shed stays for this many intervals.
PIN_INTERVALS: Final = 30


def routing_key(conn: Connection) -> str:
    """What the load balancer hashes for this socket: the customer of a one-customer token."""
    customers = conn.principal.customer_ids
    if len(customers) == 1:
        return customers[0]
    # Several customers: the socket's own routing key is unknown here, so it moves alone.
    return f"conn:{conn.conn_id}"


def plan_shed(count: int, *, pods: int, total: int, tolerance: float, max_shed: int) -> int:
    """How many sockets to shed now: the excess over the average, capped, 0 within tolerance."""
    if pods < 2 or count <= 0:
        return 0
    average = total / pods
    if count <= (1 + tolerance) * average:
        return 0
    return min(max_shed, math.ceil(count - average))


class Rebalancer:
    """One pod's side of the rebalance: report, compare, shed."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        lifecycle: Lifecycle,
        *,
        prefix: str,
        pod_id: str,
        interval_s: float,
        tolerance: float,
        max_shed: int,
    ) -> None:
        self._client = client
        self._lifecycle = lifecycle
        self._key = redis_keys.rebalance_report(prefix)
        self._pod_id = pod_id
        self._interval_s = interval_s
        self._tolerance = tolerance
        self._max_shed = max_shed
        self._shed_at: dict[str, float] = {}  # routing key -> when its sockets were shed
        self._pinned_until: dict[str, float] = {}  # routing key -> not shed again before

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s * random.uniform(0.8, 1.2))
            try:
                await self.step()
            except REDIS_ERRORS as exc:
                # Rebalancing is an optimisation; without Redis the pod simply keeps its sockets.
                log.warning("rebalance_report_failed", error=type(exc).__name__)

    async def step(self) -> int:
        """One round; returns how many sockets it shed."""
        connections = [c for c in self._lifecycle.connections if not c.closing]
        draining = self._lifecycle.draining
        stale_ms = int(STALE_INTERVALS * self._interval_s * 1000)
        async with asyncio.timeout(max(1.0, self._interval_s)):
            pods, total = await eval_script(
                self._client,
                redis_lua.REBALANCE_REPORT,
                [self._key],
                [self._pod_id, -1 if draining else len(connections), stale_ms],
            )
        if draining:
            return 0
        metrics.REBALANCE_CLUSTER_PODS.set(pods)
        metrics.REBALANCE_CLUSTER_CONNECTIONS.set(total)
        self._learn_pins(connections)
        budget = plan_shed(
            len(connections), pods=int(pods), total=int(total), tolerance=self._tolerance, max_shed=self._max_shed
        )
        if budget == 0:
            return 0
        victims = self._choose(connections, budget)
        if victims:
            log.info("rebalance_shedding", connections=len(connections), pods=pods, total=total, shed=len(victims))
            await self._shed(victims)
        return len(victims)

    def _learn_pins(self, connections: list[Connection]) -> None:
        now = time.monotonic()
        window_s = PIN_INTERVALS * self._interval_s
        for conn in connections:
            key = routing_key(conn)
            shed_at = self._shed_at.get(key)
            if shed_at is not None and conn.opened_at > shed_at:
                # The ring sends this key back here: moving it again would only churn.
                self._pinned_until[key] = now + window_s
                del self._shed_at[key]
        self._shed_at = {k: t for k, t in self._shed_at.items() if now - t < window_s}
        self._pinned_until = {k: t for k, t in self._pinned_until.items() if t > now}

    def _choose(self, connections: list[Connection], budget: int) -> list[Connection]:
        groups: dict[str, list[Connection]] = {}
        for conn in connections:
            key = routing_key(conn)
            if key not in self._pinned_until and key not in self._shed_at:
                groups.setdefault(key, []).append(conn)
        chosen: list[Connection] = []
        now = time.monotonic()
        for key in random.sample(list(groups), len(groups)):
            group = groups[key]
            if chosen and len(chosen) + len(group) > budget:
                continue
            chosen.extend(group)
            self._shed_at[key] = now
            if len(chosen) >= budget:
                break
        return chosen

    async def _shed(self, victims: list[Connection]) -> None:
        # Spread over half an interval so the reconnects do not arrive as one burst.
        spread_s = self._interval_s / 2

        async def close_later(conn: Connection) -> None:
            await asyncio.sleep(random.uniform(0, spread_s))
            if conn.closing:
                return  # closed for another reason while it waited: not shed
            metrics.REBALANCE_SHED.inc()
            await conn.close(CloseCode.REBALANCE, "rebalance")

        await asyncio.gather(*(close_later(c) for c in victims))

    async def close(self) -> None:
        """Leave the average at once, so the others do not count a pod that is going away."""
        try:
            async with asyncio.timeout(1.0):
                await eval_script(self._client, redis_lua.REBALANCE_REPORT, [self._key], [self._pod_id, -1, 1])
        except REDIS_ERRORS as exc:
            log.warning("rebalance_leave_failed", error=type(exc).__name__)


async def rebalance_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs the rebalancer with the Redis broker (one Redis or a Cluster) when EVA_WS_REBALANCE_INTERVAL_S > 0."""
    settings = app[keys.SETTINGS]
    enabled = settings.rebalance_interval_s > 0 and settings.rebalance_max_shed_per_interval > 0
    if settings.redis_url is None or not enabled:
        yield
        return
    timeout_s = 1.0
    client = any_command_client(
        settings.redis_url,
        max_connections=2,
        wait_s=timeout_s,
        options=client_options(
            settings.redis_url,
            connect_timeout_s=timeout_s,
            command_timeout_s=timeout_s,
            keepalive_idle_s=10,
            client_name=f"eva-ws:{client_name_part(settings.pod_id)}:rebalance",
        ),
    )
    rebalancer = Rebalancer(
        client,
        app[keys.LIFECYCLE],
        prefix=settings.redis_prefix,
        pod_id=settings.pod_id,
        interval_s=settings.rebalance_interval_s,
        tolerance=settings.rebalance_tolerance,
        max_shed=settings.rebalance_max_shed_per_interval,
    )
    task = asyncio.create_task(rebalancer.run(), name="rebalance")
    log.info("rebalance_started", interval_s=settings.rebalance_interval_s, tolerance=settings.rebalance_tolerance)
    yield
    await cancel_and_wait(task)
    await rebalancer.close()
    await client.aclose()
