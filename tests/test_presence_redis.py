"""RedisPresence on one Redis and on a Redis Cluster: what only Redis can break (the contract is elsewhere)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.backend_errors import BackendUnavailable
from service.config import Settings
from service.presence import PresenceEntry
from service.presence_redis import RedisPresence
from service.redis_client import cancel_and_wait


def entry(pod_id: str, user_id: str = "u1", *, at: float | None = None) -> PresenceEntry:
    return PresenceEntry(
        conn_id=uuid.uuid4().hex, user_id=user_id, pod_id=pod_id, connected_at=time.time() if at is None else at
    )


async def simulate_kill(presence: RedisPresence) -> None:
    """As kill -9 would: the heartbeat stops and nothing is cleaned up."""
    assert presence._heartbeat is not None
    await cancel_and_wait(presence._heartbeat)
    presence._heartbeat = None
    presence._local.clear()


@pytest.fixture
async def pods(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    """Start presence instances (one per pod) sharing a prefix; closed after the test."""
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    running: list[RedisPresence] = []

    async def start(pod_id: str, **options: Any) -> RedisPresence:
        presence = RedisPresence(url=redis_server.url, prefix=prefix, pod_id=pod_id, **options)
        await presence.start()
        running.append(presence)
        return presence

    yield start
    for presence in running:
        await presence.close()


async def test_a_lapsed_heartbeat_re_adds_the_pods_entries(pods: Callable[..., Any], raw: Redis) -> None:
    pod = await pods("pod-a", heartbeat_ttl_s=600)
    connection = entry("pod-a")
    await pod.add(["c1"], connection)
    # As after a long stall: the heartbeat expired and a reader dropped the entries.
    await raw.delete(f"{pod._prefix}presence_pod:{pod._instance}")
    assert await pod.count("c1") == 0
    await pod._refresh()
    assert await pod.list("c1") == [connection]
    assert await pod.count("c1") == 1


async def test_a_pod_restarted_under_the_same_name_does_not_revive_old_entries(pods: Callable[..., Any]) -> None:
    reader = await pods("pod-a")
    old_life = await pods("pod-b", heartbeat_ttl_s=1.0)
    await old_life.add(["c1"], entry("pod-b"))
    await simulate_kill(old_life)
    await pods("pod-b")

    async def gone() -> bool:
        return bool(await reader.count("c1") == 0)

    await eventually(gone, "the previous life's entry was kept alive by the new heartbeat")


async def test_presence_from_settings_works_without_an_explicit_start(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, redis_prefix="s:", pod_id="pod-s")
    writer, reader = RedisPresence.from_settings(settings), RedisPresence.from_settings(settings)
    try:
        connection = entry("pod-s")
        await writer.add(["c1"], connection)
        assert await reader.list("c1") == [connection]
        assert await reader.count("c1") == 1
    finally:
        await writer.close()
        await reader.close()
    later = RedisPresence.from_settings(settings)
    try:
        assert await later.count("c1") == 0, "close did not remove the pod's entries"
    finally:
        await later.close()


def heartbeat_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "redis-presence-heartbeat" and not t.done()]


async def test_concurrent_first_adds_start_one_heartbeat_and_close_stops_it(redis_server: RedisServer) -> None:
    presence = RedisPresence(url=redis_server.url, prefix="x:", pod_id="pod-a")
    reader = RedisPresence(url=redis_server.url, prefix="x:", pod_id="pod-b")
    try:
        entries = [entry("pod-a", f"u{n}") for n in range(300)]
        await asyncio.gather(*(presence.add(["c1", "c2"], e) for e in entries))
        assert len(heartbeat_tasks()) == 1
        assert await reader.count("c1") == 300
        await presence.close()
        assert heartbeat_tasks() == []
        assert await reader.count("c1") == 0
        assert await reader.list("c2") == []
    finally:
        await presence.close()
        await reader.close()


async def evalsha_calls(raw: Redis) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_adds_and_removes_each_land_in_few_round_trips(pods: Callable[..., Any], raw: Redis) -> None:
    pod, reader = await pods("pod-a"), await pods("pod-b")
    staying = [entry("pod-a", f"u{n}", at=float(n)) for n in range(200)]
    leaving = [entry("pod-a", f"v{n}") for n in range(100)]
    await asyncio.gather(*(pod.add(["c1", f"own{n % 3}"], e) for n, e in enumerate(leaving)))
    before = await evalsha_calls(raw)
    # Adds, and removes queued after them in the same turn: applied in the order they were called.
    await asyncio.gather(
        *(pod.add(["c1", f"own{n % 3}"], e) for n, e in enumerate(staying)),
        *(pod.remove(["c1", f"own{n % 3}"], e.conn_id) for n, e in enumerate(leaving)),
        *(pod.add(["c2"], e) for e in leaving),
        *(pod.remove(["c2"], e.conn_id) for e in leaving),
    )
    assert await evalsha_calls(raw) - before <= 3, "concurrent writes did not share round trips"
    assert await reader.list("c1") == staying
    assert await reader.count("c1") == 200
    assert await reader.list("own1") == [e for n, e in enumerate(staying) if n % 3 == 1]
    assert await reader.count("c2") == 0


async def test_concurrent_adds_without_redis_each_raise_backend_unavailable(redis_server: RedisServer) -> None:
    presence = RedisPresence(url=redis_server.url, prefix="d:", pod_id="pod-d")
    try:
        await presence.start()
        redis_server.kill()
        results = await asyncio.gather(
            *(presence.add(["c1"], entry("pod-d")) for _ in range(50)),
            *(presence.remove(["c1"], f"gone{n}") for n in range(50)),
            return_exceptions=True,
        )
        assert len(results) == 100
        assert all(isinstance(r, BackendUnavailable) for r in results)
    finally:
        await presence.close()


async def test_a_dead_master_makes_only_its_customers_presence_unavailable(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path)
    cluster.start()
    presence = RedisPresence(url=cluster.url, prefix="d:", pod_id="pod-a")
    try:
        await presence.start()
        customers = [f"c{n}" for n in range(12)]
        victim = cluster.nodes[0]
        on_victim = [c for c in customers if cluster.owner_of(key_slot(c.encode())) is victim]
        elsewhere = [c for c in customers if c not in on_victim]
        assert on_victim
        assert elsewhere
        victim.kill()
        with pytest.raises(BackendUnavailable):
            await presence.count(on_victim[0])
        with pytest.raises(BackendUnavailable):
            await presence.add([on_victim[0]], entry("pod-a"))

        async def served() -> bool:
            try:
                await presence.add(elsewhere, entry("pod-a"))
            except BackendUnavailable:
                return False  # the first command on a dead node's pooled connection
            return True

        await eventually(served, "customers of healthy masters lost their presence")
        assert await presence.count(elsewhere[0]) >= 1
    finally:
        await presence.close()
        cluster.stop()
