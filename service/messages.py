"""Every message the server sends a client, as encoded JSON: replies, events, resyncs, snapshots, presence.

The schemas are in docs/schemas/ and docs/asyncapi.yaml; tests/test_protocol_schemas.py checks
what the service sends against them. Fan-out messages (events, snapshots, presence) are built
once and the same bytes go to every recipient.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from service.broker.base import Envelope, Position
from service.presence import PresenceEntry
from service.protocol import (
    Channel,
    Filters,
    ProtocolError,
    channel_of_key,
    position_json,
    subscription_key,
    utc_now_iso,
)


def pong(correlation_id: str | None) -> bytes:
    return orjson.dumps({"type": "pong", "timestamp": utc_now_iso(), "correlationId": correlation_id})


def error(error: ProtocolError) -> bytes:
    return orjson.dumps(
        {
            "type": "error",
            "code": error.code.value,
            "message": error.message,
            "correlationId": error.correlation_id,
            "timestamp": utc_now_iso(),
        }
    )


def subscribed(
    key: str,
    filters: Filters,
    position: Position,
    correlation_id: str | None,
    *,
    presence: bool,
    snapshot: bool,
    recovered: bool | None,
    replayed: int,
) -> bytes:
    """The ack of a subscribe; `recovered` None: the subscribe carried no `since`."""
    ack: dict[str, Any] = {
        "type": "subscribed",
        "channel": channel_of_key(key).value,
        "subscription": key,
        "filters": filters.to_json(),
        "position": position_json(position),
        "correlationId": correlation_id,
        "timestamp": utc_now_iso(),
    }
    if presence:
        ack["presence"] = True
    if snapshot:
        ack["snapshot"] = True
    if recovered is not None:
        ack["recovered"] = recovered
        ack["replayed"] = replayed
    return orjson.dumps(ack)


def unsubscribed(key: str, filters: Filters, correlation_id: str | None, *, reason: str | None = None) -> bytes:
    """The ack of an unsubscribe; with `reason` when the server ended the subscription itself."""
    message: dict[str, Any] = {
        "type": "unsubscribed",
        "channel": channel_of_key(key).value,
        "subscription": key,
        "filters": filters.to_json(),
    }
    if reason is not None:
        message["reason"] = reason
    message["correlationId"] = correlation_id
    message["timestamp"] = utc_now_iso()
    return orjson.dumps(message)


def refreshed(expires_at: str, correlation_id: str | None) -> bytes:
    return orjson.dumps(
        {"type": "refreshed", "expiresAt": expires_at, "correlationId": correlation_id, "timestamp": utc_now_iso()}
    )


# A subscription key's prefix -> the channel's name; a lookup instead of an Enum call per event.
_CHANNEL_NAMES: Final = {channel.value: channel.value for channel in Channel}


def event(envelope: Envelope, kind: str, data: dict[str, Any], timestamp: str, correlation_id: Any) -> bytes:
    """An event as every subscriber of its channel gets it: built once per event on each pod (see Hub)."""
    return orjson.dumps(
        {
            "type": kind,
            "channel": _CHANNEL_NAMES[envelope.channel.partition(":")[0]],
            "subscription": envelope.channel,
            "offset": envelope.offset,
            "epoch": envelope.epoch,
            "data": data,
            "timestamp": timestamp,
            "correlationId": correlation_id,
        }
    )


def resync(key: str, position: Position) -> bytes:
    """The subscription lost its place: it restarts at `position` (the events after it follow)."""
    return orjson.dumps(
        {
            "type": "resync",
            "channel": channel_of_key(key).value,
            "subscription": key,
            "position": position_json(position),
            "timestamp": utc_now_iso(),
        }
    )


def snapshot(key: str, position: Position, transactions: list[orjson.Fragment], *, last: bool, timestamp: str) -> bytes:
    """One `snapshot` message: transactions already encoded once for every recipient (see snapshots)."""
    return orjson.dumps(
        {
            "type": "snapshot",
            "channel": channel_of_key(key).value,
            "subscription": key,
            "position": position_json(position),
            "data": {"transactions": transactions, "last": last},
            "timestamp": timestamp,
        }
    )


def presence(kind: str, customer_id: str, entry: PresenceEntry, *, connected_at: str, timestamp: str) -> bytes:
    """A `presence_join` or `presence_leave` as its subscribers get it (published once, see presence_events)."""
    return orjson.dumps(
        {
            "type": kind,
            "channel": Channel.TRANSACTIONS.value,
            "subscription": subscription_key(Channel.TRANSACTIONS, customer_id),
            "customerId": customer_id,
            "connId": entry.conn_id,
            "userId": entry.user_id,
            "podId": entry.pod_id,
            "connectedAt": connected_at,
            "timestamp": timestamp,
        }
    )
