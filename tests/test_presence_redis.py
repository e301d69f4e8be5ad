"""RedisPresence against a real redis-server: shared entries, idempotence, and expiry of a crashed pod's entries."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.broker.base import BrokerUnavailable
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


async def test_added_connections_are_listed_and_counted_from_any_pod(pods: Callable[..., Any]) -> None:
    first, second = await pods("pod-a"), await pods("pod-b")
    one, two = entry("pod-a", "u1", at=100.0), entry("pod-b", "u2", at=50.0)
    await first.add(["c1", "c2"], one)
    await second.add(["c1"], two)
    assert await first.list("c1") == [two, one]
    assert await second.list("c2") == [one]
    assert await second.count("c1") == 2
    assert await first.count("c2") == 1
    assert await first.count("nobody") == 0
    assert await first.list("nobody") == []


async def test_add_and_remove_are_idempotent(pods: Callable[..., Any]) -> None:
    pod = await pods("pod-a")
    connection = entry("pod-a")
    await pod.add(["c1"], connection)
    await pod.add(["c1"], connection)
    assert await pod.count("c1") == 1
    await pod.remove(["c1"], connection.conn_id)
    await pod.remove(["c1"], connection.conn_id)
    assert await pod.count("c1") == 0
    assert await pod.list("c1") == []


async def test_close_removes_the_pods_entries(pods: Callable[..., Any]) -> None:
    leaving, staying = await pods("pod-a"), await pods("pod-b")
    await leaving.add(["c1"], entry("pod-a"))
    kept = entry("pod-b")
    await staying.add(["c1"], kept)
    await leaving.close()
    assert await staying.list("c1") == [kept]
    assert await staying.count("c1") == 1


async def test_entries_of_a_killed_pod_disappear_within_the_heartbeat_ttl(pods: Callable[..., Any], raw: Redis) -> None:
    survivor = await pods("pod-a")
    doomed = await pods("pod-b", heartbeat_ttl_s=1.0)
    kept = entry("pod-a")
    await survivor.add(["c1"], kept)
    for _ in range(3):
        await doomed.add(["c1", "c2"], entry("pod-b"))
    assert await survivor.count("c1") == 4

    await simulate_kill(doomed)

    async def only_survivor_counted() -> bool:
        return bool(await survivor.count("c1") == 1)

    await eventually(only_survivor_counted, "the killed pod's entries were still counted")
    assert await survivor.list("c1") == [kept]
    assert await survivor.list("c2") == []
    # Read cleanup deleted them for real, not only hid them.
    prefix = survivor._prefix
    assert await raw.hlen(f"{prefix}presence:c1") == 1
    assert await raw.hlen(f"{prefix}presence:c2") == 0


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


async def test_presence_without_redis_raises_broker_unavailable_and_heals_when_redis_is_back(
    redis_server: RedisServer,
) -> None:
    presence = RedisPresence(url=redis_server.url, prefix="d:", pod_id="pod-d", heartbeat_ttl_s=1.5)
    reader = RedisPresence(url=redis_server.url, prefix="d:", pod_id="pod-r")
    gone_while_down = entry("pod-d", "u-gone")
    try:
        await presence.add(["c1"], gone_while_down)
        redis_server.stop()
        await presence.start()  # already started: must not touch Redis
        added_while_down = entry("pod-d", "u-new")
        for call in (
            presence.add(["c1"], added_while_down),
            presence.remove(["c1"], gone_while_down.conn_id),
            presence.list("c1"),
            presence.count("c1"),
        ):
            with pytest.raises(BrokerUnavailable):
                await call
        redis_server.start()

        async def healed() -> bool:
            return await reader.list("c1") == [added_while_down]

        # The heartbeat writes the add and the remove that Redis could not take.
        await eventually(healed, "presence did not catch up with what happened while Redis was down")
    finally:
        await presence.close()
        await reader.close()


async def test_presence_starts_while_redis_is_down(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # not started yet
    presence = RedisPresence(url=server.url, prefix="s:", pod_id="pod-s", heartbeat_ttl_s=1.5)
    try:
        await presence.start()
        connection = entry("pod-s")
        with pytest.raises(BrokerUnavailable):
            await presence.add(["c1"], connection)
        server.start()

        async def listed() -> bool:
            return await presence.list("c1") == [connection]

        await eventually(listed, "the entry added before Redis was up never reached it")
    finally:
        await presence.close()
        server.kill()


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


async def test_concurrent_adds_without_redis_each_raise_broker_unavailable(redis_server: RedisServer) -> None:
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
        assert all(isinstance(r, BrokerUnavailable) for r in results)
    finally:
        await presence.close()
