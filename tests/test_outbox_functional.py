"""Two real pods relay the outbox of a real PostgreSQL through a real Redis to WebSocket clients.

Concurrent writers commit and roll back; a relaying pod, Redis and PostgreSQL are killed with
kill -9 in the middle. Every committed event reaches the clients exactly once, in commit order per
channel; rolled-back ones never; the outbox drains. EVA_WS_OUTBOX_TEST_EVENTS sets how many
events are written (1,200 by default; `EVA_WS_OUTBOX_TEST_EVENTS=10000` for the full run of docs/outbox.md).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import psycopg
import pytest

from fleet.postgres_server import PostgresServer
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.postgres_outbox import enqueue
from tests.outbox_testing import outbox_rows
from tests.test_redis_functional import (  # noqa: F401  # fixtures
    CUSTOMERS,
    Client,
    PodFactory,
    log_events,
    session,
    start_pods,
    wait_ready,
)

EVENTS: Final = int(os.environ.get("EVA_WS_OUTBOX_TEST_EVENTS", "1200"))
WRITERS: Final = 6
ROLLBACK_SHARE: Final = 0.2
OUTBOX_POD: Final = {"outbox_poll_interval_s": "0.2", "outbox_batch_size": "100"}

pytestmark = pytest.mark.timeout(600)

# The test's own commit order: a counter row per channel, raised in the writer's transaction. Its
# row lock holds other writers of the channel until the commit, so the counter's values are the
# channel's commit order, with no gap for rolled-back transactions.
_COUNTERS: Final = """
CREATE TABLE IF NOT EXISTS test_commit_order (channel text PRIMARY KEY, n bigint NOT NULL);
TRUNCATE test_commit_order;
"""


@dataclass
class Writes:
    """What the writers asked for: tags of rolled-back events, and how many were written."""

    rolled_back: set[str] = field(default_factory=set)
    written: int = 0


async def writer(dsn: str, number: int, writes: Writes, paused: Callable[[], bool]) -> None:
    """Write events until EVENTS were written in all; survive PostgreSQL going away."""
    rng = random.Random(number)
    connection: psycopg.AsyncConnection[Any] | None = None
    attempt = 0
    while writes.written < EVENTS:
        if paused():
            await asyncio.sleep(0.05)
            continue
        try:
            if connection is None or connection.closed:
                connection = await psycopg.AsyncConnection.connect(dsn)
            customer = rng.choice(CUSTOMERS)
            count = rng.randint(1, 3)
            roll_back = rng.random() < ROLLBACK_SHARE
            tag = f"w{number}-{attempt}"
            attempt += 1
            async with connection.transaction(force_rollback=roll_back):
                cursor = await connection.execute(
                    "INSERT INTO test_commit_order VALUES (%s, %s) ON CONFLICT (channel)"
                    " DO UPDATE SET n = test_commit_order.n + excluded.n RETURNING n",
                    (customer, count),
                )
                row = await cursor.fetchone()
                assert row is not None
                for seq in range(row[0] - count + 1, row[0] + 1):
                    await enqueue(connection, transaction_new(customer, seq, tag))
                if roll_back:
                    writes.rolled_back.add(tag)
            writes.written += count
        except psycopg.OperationalError:
            # PostgreSQL went away: a commit in flight may or may not have landed. The counter
            # tells afterwards which did; the assertions need no more than that.
            if connection is not None:
                await connection.close()
            connection = None
            await asyncio.sleep(0.1)
    if connection is not None:
        await connection.close()


def transaction_new(customer: str, seq: int, tag: str) -> dict[str, Any]:
    # transaction_new is never conflated, so a client sees every one of them.
    return {
        "type": "transaction_new",
        "data": {"id": f"T{seq}", "customerId": customer, "status": "new", "seq": seq, "updatedBy": tag},
    }


def committed_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as connection:
        return dict(connection.execute("SELECT channel, n FROM test_commit_order").fetchall())


def received(client: Client, customer: str) -> list[int]:
    return [m["data"]["seq"] for m in client.events(customer) if m["type"] == "transaction_new"]


async def test_committed_events_reach_clients_once_in_commit_order_through_kills_of_a_pod_redis_and_postgres(
    postgres: PostgresServer,
    persistent_redis_server: RedisServer,
    start_pods: PodFactory,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute(_COUNTERS)
    killed_pod, watched_pod = start_pods(persistent_redis_server.url, outbox_dsn=postgres.dsn, **OUTBOX_POD)
    await wait_ready(session, killed_pod, watched_pod)
    clients = [await Client.connect(session, watched_pod, user=f"u{n}") for n in range(2)]
    for client in clients:
        for customer in CUSTOMERS:
            assert (await client.subscribe(customer))["type"] == "subscribed"

    writes = Writes()
    postgres_down = False
    writers = [asyncio.create_task(writer(postgres.dsn, n, writes, lambda: postgres_down)) for n in range(WRITERS)]

    async def written(share: float) -> None:
        await eventually(lambda: writes.written >= EVENTS * share, f"{writes.written}/{EVENTS} written", deadline_s=300)

    await written(0.2)
    killed_pod.kill()  # kill -9 of a relaying pod, in the middle of its batches
    await written(0.35)
    killed_pod.start()
    await written(0.5)
    persistent_redis_server.kill()  # both pods' broker: their batches roll back and wait
    await written(0.6)
    persistent_redis_server.start()
    await written(0.75)
    postgres_down = True
    postgres.kill()  # the relays' and the writers' connections reset
    await asyncio.sleep(0.5)  # the pods notice on their own; nothing is asserted on this time
    postgres.start()
    postgres_down = False
    await asyncio.gather(*writers)

    await eventually(lambda: outbox_rows(postgres.dsn) == [], "the outbox did not drain", deadline_s=120)
    counts = committed_counts(postgres.dsn)
    assert sum(counts.values()) >= EVENTS * (1 - ROLLBACK_SHARE) / 2

    def everything_arrived() -> bool:
        return all(len(received(c, customer)) >= counts.get(customer, 0) for c in clients for customer in CUSTOMERS)

    def progress() -> str:
        return str({customer: (counts.get(customer), len(received(clients[0], customer))) for customer in CUSTOMERS})

    await eventually(everything_arrived, progress, deadline_s=120)
    for client in clients:
        for customer in CUSTOMERS:
            # Exactly once, in commit order: 1..n, with nothing twice and no gap.
            assert received(client, customer) == list(range(1, counts.get(customer, 0) + 1))
        tags = {m["data"]["updatedBy"] for m in client.of_type("transaction_new")}
        assert tags.isdisjoint(writes.rolled_back)
    # The faults did hit the relays (which pod was relaying at the time is up to the locks).
    for fault_seen in ("outbox_relay_disconnected", "outbox_relay_broker_unavailable"):
        assert log_events(watched_pod, fault_seen) or log_events(killed_pod, fault_seen)
