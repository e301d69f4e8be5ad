"""Fixtures of the outbox tests: the test's own PostgreSQL server with the outbox schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest

from fleet.postgres_server import PostgresServer

SCHEMA: Final = Path(__file__).resolve().parent.parent / "deploy" / "sql" / "outbox.sql"


def apply_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(SCHEMA.read_text().encode())


@pytest.fixture(scope="module")
def module_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        apply_schema(server.dsn)
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres(module_postgres: PostgresServer) -> PostgresServer:
    """The module's server with an empty outbox (restarted if a test killed it)."""
    if module_postgres.process is None:
        module_postgres.start()
    with psycopg.connect(module_postgres.dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE eva_ws_outbox, eva_ws_outbox_rejected")
    return module_postgres


def outbox_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as connection:
        return connection.execute("SELECT id, channel, event FROM eva_ws_outbox ORDER BY id").fetchall()
