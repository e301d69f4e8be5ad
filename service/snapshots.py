"""Snapshots for clients: a channel's state decoded once per read, filtered per subscription, sent in chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from service.broker.base import Position
from service.broker.state import Snapshot
from service.messages import snapshot as snapshot_message
from service.protocol import utc_now_iso

# A `snapshot` message holds transactions up to about this many bytes, so no frame grows with
# the state: one event is at most 64 KiB (publisher.MAX_EVENT_BYTES), so a transaction alone
# always fits, and 1,000 typical transactions take a handful of frames.
CHUNK_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Transaction:
    """One transaction of a snapshot: its `data`, and that `data` encoded once for every recipient."""

    data: dict[str, Any]
    encoded: orjson.Fragment
    size: int


@dataclass(frozen=True, slots=True)
class DecodedSnapshot:
    """A channel's state as clients get it; shared by every subscription that asked for this read."""

    position: Position
    transactions: list[Transaction]


def decode(snapshot: Snapshot) -> DecodedSnapshot:
    """Each stored event's `data`; payloads that are not events are left out (the hub drops them live too)."""
    transactions: list[Transaction] = []
    for payload in snapshot.payloads:
        try:
            data = orjson.loads(payload)["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if isinstance(data, dict):
            encoded = orjson.dumps(data)
            transactions.append(Transaction(data, orjson.Fragment(encoded), len(encoded)))
    return DecodedSnapshot(snapshot.position, transactions)


def matching(snapshot: DecodedSnapshot, matches: Callable[[dict[str, Any]], bool]) -> list[Transaction]:
    return [t for t in snapshot.transactions if matches(t.data)]


def messages(key: str, position: Position, transactions: Iterable[Transaction]) -> list[bytes]:
    """The `snapshot` messages of one subscription: at least one, the last with `last: true`."""
    chunks: list[list[orjson.Fragment]] = [[]]
    size = 0
    for transaction in transactions:
        if chunks[-1] and size + transaction.size > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(transaction.encoded)
        size += transaction.size + 1
    now = utc_now_iso()
    return [
        snapshot_message(key, position, chunk, last=index == len(chunks) - 1, timestamp=now)
        for index, chunk in enumerate(chunks)
    ]
