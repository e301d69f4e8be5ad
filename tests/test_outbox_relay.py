"""The relay publishes committed outbox rows once, in commit order per channel (one app, a real PostgreSQL)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from fleet.postgres_server import PostgresServer
from fleet.waiting import eventually
from service import keys
from service.postgres_outbox import enqueue
from tests.conftest import AppClient, connect, make_settings, metric_value, receive_type, subscribe, token_for, txn
from tests.openapi_document import assert_response
from tests.outbox_testing import outbox_rows

pytestmark = pytest.mark.timeout(120)

SETTINGS = make_settings()
# Long: the tests pass only if NOTIFY wakes the relay, and the poll finds what was missed.
SLOW_POLL = {"outbox_poll_interval_s": "3600"}


def update(txn_id: str, customer: str = "C1") -> dict[str, Any]:
    return {"type": "transaction_update", "data": txn(txn_id, customer)}


def rejected_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as connection:
        return connection.execute("SELECT id, error FROM eva_ws_outbox_rejected ORDER BY id").fetchall()


async def test_committed_rows_reach_a_subscriber_in_commit_order_and_rolled_back_ones_never(
    app_client: AppClient, postgres: PostgresServer
) -> None:
    client = await app_client(outbox_dsn=postgres.dsn, **SLOW_POLL)
    ws = await connect(client, token_for(SETTINGS))
    assert (await subscribe(ws, filters={"customerId": "C1"}))["type"] == "subscribed"
    async with await psycopg.AsyncConnection.connect(postgres.dsn) as connection:
        for n in range(5):
            async with connection.transaction(force_rollback=n == 2):
                await enqueue(connection, update(f"T{n}"))
    received = [(await receive_type(ws, "transaction_update"))["data"]["id"] for _ in range(4)]
    assert received == ["T0", "T1", "T3", "T4"]
    await eventually(lambda: outbox_rows(postgres.dsn) == [], "the outbox did not drain")
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, 'eva_ws_outbox_relayed_total{outcome="published"}') >= 4
    ready = await (await client.get("/readyz")).json()
    assert ready["outbox"] == "relaying"
    assert_response("/readyz", "get", 200, "application/json", ready)


async def test_rows_committed_before_the_pod_started_are_relayed(
    app_client: AppClient, postgres: PostgresServer
) -> None:
    with psycopg.connect(postgres.dsn) as connection:
        enqueue(connection, update("early"))
    await app_client(outbox_dsn=postgres.dsn, **SLOW_POLL)
    await eventually(lambda: outbox_rows(postgres.dsn) == [], "rows committed before the start stayed")


async def test_a_commit_whose_notification_is_missed_is_found_by_the_poll(
    app_client: AppClient, postgres: PostgresServer
) -> None:
    client = await app_client(outbox_dsn=postgres.dsn, outbox_poll_interval_s="0.2")
    ws = await connect(client, token_for(SETTINGS))
    await subscribe(ws, filters={"customerId": "C1"})
    await eventually(lambda: client.app[keys.OUTBOX_RELAY].ready, "the relay did not connect")
    with psycopg.connect(postgres.dsn) as connection:
        # This transaction's commit sends no NOTIFY (DDL is transactional: only this one is affected).
        connection.execute("ALTER TABLE eva_ws_outbox DISABLE TRIGGER eva_ws_outbox_after_insert")
        enqueue(connection, update("unannounced"))
        connection.execute("ALTER TABLE eva_ws_outbox ENABLE TRIGGER eva_ws_outbox_after_insert")
    assert (await receive_type(ws, "transaction_update", timeout_s=30))["data"]["id"] == "unannounced"


async def test_a_row_publish_would_refuse_is_set_aside_and_does_not_block_its_channel(
    app_client: AppClient, postgres: PostgresServer
) -> None:
    client = await app_client(outbox_dsn=postgres.dsn, **SLOW_POLL)
    ws = await connect(client, token_for(SETTINGS))
    await subscribe(ws, filters={"customerId": "C1"})
    with psycopg.connect(postgres.dsn) as connection:
        # Plain SQL, as another language would write it, with a mistake in each row.
        connection.execute(
            "INSERT INTO eva_ws_outbox (channel, event) VALUES ('transactions:C1', '{\"type\": \"bogus\"}')"
        )
        connection.execute(
            "INSERT INTO eva_ws_outbox (channel, event) VALUES ('transactions:C2', %s::jsonb)",
            ('{"type": "transaction_update", "data": {"id": "T9", "customerId": "C1"}}',),
        )
        enqueue(connection, update("after"))
    assert (await receive_type(ws, "transaction_update"))["data"]["id"] == "after"
    # The batch's transaction commits just after its events were published.
    await eventually(lambda: outbox_rows(postgres.dsn) == [], "the outbox did not drain")
    errors = [error for _, error in rejected_rows(postgres.dsn)]
    assert len(errors) == 2
    assert "unknown event type" in errors[0]
    assert "channel" in errors[1]


async def test_the_relay_recovers_from_a_killed_postgres_and_relays_what_was_committed_after(
    app_client: AppClient, postgres: PostgresServer
) -> None:
    client = await app_client(outbox_dsn=postgres.dsn, outbox_poll_interval_s="0.2")
    ws = await connect(client, token_for(SETTINGS))
    await subscribe(ws, filters={"customerId": "C1"})
    with psycopg.connect(postgres.dsn) as connection:
        enqueue(connection, update("before"))
    assert (await receive_type(ws, "transaction_update"))["data"]["id"] == "before"
    postgres.kill()

    async def not_relaying() -> bool:
        return (await (await client.get("/readyz")).json()).get("outbox") == "unavailable"

    await eventually(not_relaying, "the relay did not notice PostgreSQL was gone")
    # Sockets are still served: the pod stays ready and says what is missing.
    response = await client.get("/readyz")
    assert response.status == 200
    assert_response("/readyz", "get", 200, "application/json", await response.json())
    postgres.start()
    with psycopg.connect(postgres.dsn) as connection:
        enqueue(connection, update("after"))
    assert (await receive_type(ws, "transaction_update", timeout_s=30))["data"]["id"] == "after"
