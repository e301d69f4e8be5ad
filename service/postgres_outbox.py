"""The write side of the transactional outbox: one event into eva_ws_outbox, in the caller's transaction."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Final, overload

import orjson

from service.publisher import prepare_event_object

if TYPE_CHECKING:
    import asyncpg
    import psycopg

# Kept in step with deploy/sql/outbox.sql, which creates the table and its triggers.
TABLE: Final = "eva_ws_outbox"
_INSERT_PSYCOPG: Final = "INSERT INTO eva_ws_outbox (channel, event) VALUES (%s, %s::jsonb)"
_INSERT_ASYNCPG: Final = "INSERT INTO eva_ws_outbox (channel, event) VALUES ($1, $2::jsonb)"


def outbox_row(event: Mapping[str, Any]) -> tuple[str, str]:
    """The (channel, event JSON) of a row for `event`, checked as POST /api/v1/publish checks it.

    Raises InvalidEvent (service.publisher) for an event the relay could not publish.
    """
    prepared = prepare_event_object(dict(event))
    return prepared.subscription, orjson.dumps(dict(event)).decode()


@overload
def enqueue(connection: psycopg.Connection[Any], event: Mapping[str, Any]) -> None: ...
@overload
def enqueue(
    connection: psycopg.AsyncConnection[Any] | asyncpg.Connection[Any], event: Mapping[str, Any]
) -> Awaitable[None]: ...


def enqueue(connection: Any, event: Mapping[str, Any]) -> Awaitable[None] | None:
    """Insert `event` (one event object of POST /api/v1/publish) into the outbox on `connection`.

    The row is part of the caller's open transaction: it is published after, and only if, that
    transaction commits. A psycopg 3 `Connection` inserts now; a psycopg 3 `AsyncConnection`
    or an asyncpg connection returns an awaitable. Raises InvalidEvent before touching the
    database for an event the relay would refuse, and TypeError for another kind of connection.
    """
    channel, document = outbox_row(event)
    module = type(connection).__module__
    if module.startswith("asyncpg"):
        return _discard(connection.execute(_INSERT_ASYNCPG, channel, document))
    if module.startswith("psycopg"):
        result = connection.execute(_INSERT_PSYCOPG, (channel, document))
        return _discard(result) if isinstance(result, Awaitable) else None
    raise TypeError(f"enqueue takes a psycopg 3 or asyncpg connection, not {type(connection).__name__}")


async def _discard(pending: Awaitable[object]) -> None:
    await pending
