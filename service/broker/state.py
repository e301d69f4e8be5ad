"""The state store of a channel: the newest event of each live transaction, and what a publish changes in it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson

from service.broker.base import Position

# Event types that carry a transaction's whole newest `data` (the broker never imports the
# protocol module; tests/test_broker_state.py checks these are the protocol's transaction events).
STATE_SET_TYPES: Final = frozenset({"transaction_new", "transaction_update", "stage_change"})
STATE_DELETE_TYPE: Final = "transaction_delete"
MAX_ID_LENGTH: Final = 128


@dataclass(frozen=True, slots=True)
class StateChange:
    """What one published event does to its channel's state: `set` or `delete` transaction `id`."""

    delete: bool
    id: str
    # A string that orders the transaction's versions (see `is_older`): `n:<integer>` from
    # `data.version`, else `s:<data.updatedAt>`, else empty (no order: the newest publish wins).
    version: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A channel's state and the position it corresponds to: the state after event `position.offset`."""

    position: Position
    # The published payload that set each live transaction's state, least recently changed first.
    payloads: list[bytes]


def state_change(payload: bytes) -> StateChange | None:
    """What `payload` changes in the state; None for an event that is not about one transaction."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    kind, data = event.get("type"), event.get("data")
    if not isinstance(data, dict) or (kind not in STATE_SET_TYPES and kind != STATE_DELETE_TYPE):
        return None
    txn_id = data.get("id")
    if not isinstance(txn_id, str) or not 0 < len(txn_id) <= MAX_ID_LENGTH:
        return None
    return StateChange(delete=kind == STATE_DELETE_TYPE, id=txn_id, version=version_of(data))


def version_of(data: dict[str, object]) -> str:
    """The order key of a transaction's `data`; see StateChange.version."""
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        return f"n:{version}"
    updated_at = data.get("updatedAt")
    # Without a newline: the Redis state stores `<version>\n<payload>`.
    if isinstance(updated_at, str) and "\n" not in updated_at:
        return f"s:{updated_at}"
    return ""


def is_older(version: str, than: str) -> bool:
    """Whether `version` is older than `than`: both integers or both timestamps, and smaller.

    Versions of different kinds, or without one, do not order: the newest publish wins. The
    publish scripts compare the same way (service/redis_lua/publish.lua).
    """
    if not version or not than or version[:2] != than[:2]:
        return False
    if version.startswith("n:"):
        return int(version[2:]) < int(than[2:])
    return version[2:] < than[2:]
