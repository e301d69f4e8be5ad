"""enqueue writes one checked event into eva_ws_outbox within the caller's transaction (a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import asyncpg
import psycopg
import pytest

from fleet.postgres_server import PostgresServer
from fleet.waiting import eventually
from service.postgres_outbox import enqueue
from service.publisher import InvalidEvent
from tests.outbox_testing import apply_schema, outbox_rows

pytestmark = pytest.mark.timeout(120)


def event(txn_id: str = "T1", customer: str = "C1") -> dict[str, Any]:
    return {"type": "transaction_update", "data": {"id": txn_id, "customerId": customer, "status": "paid"}}


def test_the_schema_can_be_applied_twice(postgres: PostgresServer) -> None:
    apply_schema(postgres.dsn)
    with psycopg.connect(postgres.dsn) as connection:
        enqueue(connection, event())
    assert [row[1] for row in outbox_rows(postgres.dsn)] == ["transactions:C1"]


def test_a_committed_psycopg_transaction_leaves_its_event_and_a_rolled_back_one_none(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.dsn) as connection:
        with connection.transaction():
            enqueue(connection, event("T1"))
        with connection.transaction(force_rollback=True):
            enqueue(connection, event("T2"))
    rows = outbox_rows(postgres.dsn)
    assert [(channel, doc["data"]["id"]) for _, channel, doc in rows] == [("transactions:C1", "T1")]


def test_user_channels_are_keyed_by_user(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.dsn) as connection:
        enqueue(connection, {"type": "notification", "channel": "notifications", "userId": "U7", "data": {"m": 1}})
    assert [row[1] for row in outbox_rows(postgres.dsn)] == ["notifications:U7"]


async def test_psycopg_async_and_asyncpg_connections_enqueue_in_their_transaction(postgres: PostgresServer) -> None:
    async with await psycopg.AsyncConnection.connect(postgres.dsn) as connection, connection.transaction():
        await enqueue(connection, event("A1"))
    connection2 = await asyncpg.connect(postgres.dsn)
    try:
        async with connection2.transaction():
            await enqueue(connection2, event("A2", customer="C2"))
        rolled_back = connection2.transaction()
        await rolled_back.start()
        await enqueue(connection2, event("A3"))
        await rolled_back.rollback()
    finally:
        await connection2.close()
    rows = outbox_rows(postgres.dsn)
    assert [(channel, doc["data"]["id"]) for _, channel, doc in rows] == [
        ("transactions:C1", "A1"),
        ("transactions:C2", "A2"),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"type": "nope", "data": {}}, "unknown event type"),
        ({"type": "transaction_update", "data": {"id": "T1"}}, "customerId"),
        ({"type": "transaction_update", "data": {"id": "T1", "customerId": "C1"}, "extra": 1}, "unknown field"),
        ({"type": "notification", "channel": "notifications", "data": {}}, "userId"),
    ],
)
def test_an_event_publish_would_refuse_is_refused_before_the_database(
    postgres: PostgresServer, bad: dict[str, Any], message: str
) -> None:
    with psycopg.connect(postgres.dsn) as connection:
        with pytest.raises(InvalidEvent, match=message):
            enqueue(connection, bad)
        # The transaction is still usable: nothing was sent.
        enqueue(connection, event())
    assert len(outbox_rows(postgres.dsn)) == 1


def test_another_kind_of_connection_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="psycopg 3 or asyncpg"):
        enqueue(object(), event())  # type: ignore[call-overload]


async def test_a_later_id_of_a_channel_is_a_later_commit(postgres: PostgresServer) -> None:
    # The first writer inserts first and commits last; the second commits in between. Ids are
    # drawn at insert: without the channel's lock the second would commit first with the larger id.
    committed: list[str] = []
    # Each writer commits and notes its name under this lock, so `committed` is the commit order:
    # the second writer, let go by the first commit, cannot note itself before the first does.
    noting_a_commit = threading.Lock()
    first = psycopg.connect(postgres.dsn)
    try:
        enqueue(first, event("first"))

        def second_writer() -> None:
            with psycopg.connect(postgres.dsn) as second:
                enqueue(second, event("second"))
                with noting_a_commit:
                    second.commit()
                    committed.append("second")

        writer = threading.Thread(target=second_writer)
        writer.start()
        with psycopg.connect(postgres.dsn, autocommit=True) as observer:

            def second_waits_for_the_lock() -> bool:
                waiting = observer.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
                ).fetchone()
                return waiting is not None and waiting[0] == 1

            await eventually(second_waits_for_the_lock, "the second writer did not wait for the channel's lock")
        with noting_a_commit:
            first.commit()
            committed.append("first")
        await asyncio.to_thread(writer.join)
    finally:
        first.close()
    rows = outbox_rows(postgres.dsn)
    assert [doc["data"]["id"] for _, _, doc in rows] == committed == ["first", "second"]


async def test_writers_of_other_channels_do_not_wait(postgres: PostgresServer) -> None:
    first = psycopg.connect(postgres.dsn)
    try:
        enqueue(first, event("first", customer="C1"))
        with psycopg.connect(postgres.dsn) as second:
            enqueue(second, event("second", customer="C2"))  # would hang here if it waited
        first.commit()
    finally:
        first.close()
    assert len(outbox_rows(postgres.dsn)) == 2
