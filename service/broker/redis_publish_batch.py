"""A batch of events published on one Redis by publish_batch.lua: hand-packed EVALSHA calls, one round trip.

Per event this is what publish.lua does, but one script call carries up to CHUNK_EVENTS
events, and the RESP command is built here directly from bytes: redis-py's per-argument
encoding and per-command pipeline bookkeeping cost more than the event itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from service import redis_keys, redis_lua
from service.broker.base import Position
from service.broker.redis_wire import new_epoch
from service.broker.state import StateChange

SCRIPT: Final = redis_lua.PUBLISH_BATCH
_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest().encode()  # noqa: S324  # Redis names scripts by SHA1
# Events per script call: Redis serves nothing else while a script runs (about 15 µs an event),
# so a large batch becomes several calls, sent together.
CHUNK_EVENTS: Final = 100


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings every event of a batch is published with (see RedisBroker)."""

    history_size: int
    history_ttl_s: int
    idempotency_window_s: int
    state_max_items: int


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _head(size: int) -> bytes:
    """The start of a bulk string of `size` bytes, kept for the sizes events usually have."""
    head = b"$%d\r\n" % size
    if size < _CACHED_HEADS:
        _HEADS[size] = head
    return head


# Bulk string heads by size, up to _CACHED_HEADS bytes: formatting the size was a good part of an event's cost.
_CACHED_HEADS: Final = 8192
_HEADS: Final[dict[int, bytes]] = {}
_CRLF: Final = b"\r\n"
_EMPTY: Final = _bulk(b"")
_NO_STATE: Final = _EMPTY * 3
_SET: Final = _bulk(b"set")
_DEL: Final = _bulk(b"del")
_BY_SHA: Final = _bulk(b"EVALSHA") + _bulk(_SHA)
_BY_TEXT: Final = _bulk(b"EVAL") + _bulk(SCRIPT.encode())


class _Names:
    """A channel's keys and PUB/SUB channel, as RESP bulk strings."""

    __slots__ = (
        "idempotency_prefix",
        "idempotency_prefix_length",
        "keys_after",
        "keys_before",
        "keys_without_idempotency",
        "pubsub",
    )

    def __init__(self, prefix: str, channel: str, pubsub: str) -> None:
        # An event's five KEYS are: meta, stream, idempotency key, state, state order.
        self.keys_before = _bulk(redis_keys.meta_key(prefix, channel).encode()) + _bulk(
            redis_keys.stream_key(prefix, channel).encode()
        )
        self.keys_after = _bulk(redis_keys.state_key(prefix, channel).encode()) + _bulk(
            redis_keys.state_order_key(prefix, channel).encode()
        )
        self.keys_without_idempotency = self.keys_before + _EMPTY + self.keys_after
        # The idempotency key's name is this prefix and the key (visible ASCII: one byte a character).
        self.idempotency_prefix = redis_keys.idempotency_key_name(prefix, channel, "").encode()
        self.idempotency_prefix_length = len(self.idempotency_prefix)
        self.pubsub = _bulk(pubsub.encode())


# Channels whose names ChannelNames keeps (about 0.5 KB each); more, and it starts again.
CACHED_CHANNELS: Final = 10_000


class ChannelNames:
    """The RESP names of the channels published to, kept from batch to batch.

    A batch's events are mostly on different channels (one per customer), but the same
    customers come back batch after batch: making their five key names each time cost more
    than the rest of the event's command.
    """

    __slots__ = ("_prefix", "_pubsub_channel", "known")

    def __init__(self, prefix: str, pubsub_channel: Callable[[str, str], str]) -> None:
        """`pubsub_channel(prefix, channel)` names a channel's PUB/SUB channel."""
        self._prefix = prefix
        self._pubsub_channel = pubsub_channel
        self.known: dict[str, _Names] = {}

    def add(self, channel: str) -> _Names:
        if len(self.known) >= CACHED_CHANNELS:
            self.known.clear()
        named = self.known[channel] = _Names(self._prefix, channel, self._pubsub_channel(self._prefix, channel))
        return named


class Chunk:
    """One publish_batch.lua call: its KEYS and ARGV in RESP, after the script's name."""

    __slots__ = ("body", "events")

    def __init__(self, events: int, body: bytes) -> None:
        self.events = events
        # `<numkeys> keys... args...`, each a bulk string.
        self.body = body

    def command(self, *, by_sha: bool) -> bytes:
        """`EVALSHA <sha> <numkeys> keys... args...` (or EVAL with the script's text) in RESP."""
        head = b"*%d\r\n" % (3 + 10 * self.events + LIMIT_ARGS)
        return b"".join((head, _BY_SHA if by_sha else _BY_TEXT, self.body))


# ARGV before the events': epoch candidate, ttl, history size, idempotency window, state max items.
LIMIT_ARGS: Final = 5


def chunks(
    events: Sequence[tuple[str, bytes]],
    idempotency_keys: Sequence[str | None],
    states: Sequence[StateChange | None],
    *,
    names: ChannelNames,
    limits: Limits,
) -> list[Chunk]:
    """The script calls that publish `events` in order.

    `states[i]` is what event i changes in its channel's state (state.state_change of its payload).
    Each call's KEYS and ARGV are joined once from the events' pieces: per-argument objects,
    calls and formatting cost more than the event's own bytes.
    """
    known = names.known
    limit_args = b"".join(
        (
            _bulk(b"%d" % limits.history_ttl_s),
            _bulk(b"%d" % limits.history_size),
            _bulk(b"%d" % limits.idempotency_window_s),
            _bulk(b"%d" % limits.state_max_items),
        )
    )
    out: list[Chunk] = []
    # The pieces of the current call's KEYS and ARGV, joined once per call.
    keys: list[bytes] = []
    args: list[bytes] = []
    count = 0
    for (channel, payload), idempotency_key, change in zip(events, idempotency_keys, states, strict=True):
        if count == CHUNK_EVENTS:
            out.append(_chunk(count, keys, args, limit_args))
            keys, args, count = [], [], 0
        count += 1
        named = known.get(channel) or names.add(channel)
        if idempotency_key is None:
            keys.append(named.keys_without_idempotency)
        else:
            key = idempotency_key.encode()
            keys += (
                named.keys_before,
                _HEADS.get(named.idempotency_prefix_length + len(key))
                or _head(named.idempotency_prefix_length + len(key)),
                named.idempotency_prefix,
                key,
                _CRLF,
                named.keys_after,
            )
        size = len(payload)
        if change is None:
            args += (named.pubsub, _HEADS.get(size) or _head(size), payload, _CRLF, _NO_STATE)
        else:
            txn = change.id.encode()
            version = change.version.encode()
            args += (
                named.pubsub,
                _HEADS.get(size) or _head(size),
                payload,
                _CRLF,
                _DEL if change.delete else _SET,
                _HEADS.get(len(txn)) or _head(len(txn)),
                txn,
                _CRLF,
                _HEADS.get(len(version)) or _head(len(version)),
                version,
                _CRLF,
            )
    out.append(_chunk(count, keys, args, limit_args))
    return out


def _chunk(count: int, keys: list[bytes], args: list[bytes], limit_args: bytes) -> Chunk:
    """The call of `count` events with these pieces of KEYS and ARGV (the limits come before the events' ARGV)."""
    return Chunk(count, b"".join((_bulk(b"%d" % (5 * count)), *keys, _bulk(new_epoch().encode()), limit_args, *args)))


async def publish(client: Redis, chunks_to_send: list[Chunk]) -> list[Position]:
    """Send every chunk on one connection in one round trip; the positions of all events, in order.

    A chunk answered NOSCRIPT did not run (Redis lost its scripts): it is sent again with EVAL,
    after the others, which keeps the order since every later chunk was refused as well.
    """
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
    try:
        await connection.send_packed_command([c.command(by_sha=True) for c in chunks_to_send])
        replies: list[Any] = []
        for _ in chunks_to_send:
            try:
                replies.append(await connection.read_response())
            except ResponseError as refused:
                # Every reply is read before raising, so the connection stays in step.
                replies.append(refused)
        for reply in replies:
            if isinstance(reply, ResponseError) and not isinstance(reply, NoScriptError):
                raise reply
        for index, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                await connection.send_packed_command(chunks_to_send[index].command(by_sha=False))
                replies[index] = await connection.read_response()
    except BaseException:
        # A reply may still be on its way: this connection's answers could no longer be matched.
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)
    # A batch's channels mostly share one epoch (every channel of a Redis that never lost its
    # data): decoded once each.
    epochs: dict[bytes, str] = {}
    return [
        Position(
            int(offset),
            epochs.get(epoch) or epochs.setdefault(epoch, epoch.decode()),
            duplicate == 1,
        )
        for reply in replies
        for offset, epoch, duplicate in reply
    ]
