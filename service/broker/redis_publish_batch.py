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
from service.broker.state import state_change

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


_EMPTY: Final = _bulk(b"")
_SET: Final = _bulk(b"set")
_DEL: Final = _bulk(b"del")
_BY_SHA: Final = _bulk(b"EVALSHA") + _bulk(_SHA)
_BY_TEXT: Final = _bulk(b"EVAL") + _bulk(SCRIPT.encode())


class Chunk:
    """KEYS and ARGV of one publish_batch.lua call, each already a RESP bulk string."""

    __slots__ = ("args", "events", "keys")

    def __init__(self, limits: Limits) -> None:
        self.events = 0
        self.keys: list[bytes] = []
        self.args: list[bytes] = [
            _bulk(new_epoch().encode()),
            _bulk(b"%d" % limits.history_ttl_s),
            _bulk(b"%d" % limits.history_size),
            _bulk(b"%d" % limits.idempotency_window_s),
            _bulk(b"%d" % limits.state_max_items),
        ]

    def command(self, *, by_sha: bool) -> bytes:
        """`EVALSHA <sha> <numkeys> keys... args...` (or EVAL with the script's text) in RESP."""
        head = b"*%d\r\n" % (3 + len(self.keys) + len(self.args))
        numkeys = _bulk(b"%d" % len(self.keys))
        return b"".join((head, _BY_SHA if by_sha else _BY_TEXT, numkeys, *self.keys, *self.args))


def chunks(
    prefix: str,
    events: Sequence[tuple[str, bytes]],
    idempotency_keys: Sequence[str | None],
    *,
    pubsub_channel: Callable[[str, str], str],
    limits: Limits,
) -> list[Chunk]:
    """The script calls that publish `events` in order; `pubsub_channel(prefix, channel)` names the PUB/SUB channel."""
    # The names of a channel, encoded once per batch: its events usually come several at a time.
    names: dict[str, tuple[bytes, bytes, bytes, bytes, bytes]] = {}
    out: list[Chunk] = []
    chunk = Chunk(limits)
    for (channel, payload), idempotency_key in zip(events, idempotency_keys, strict=True):
        if chunk.events == CHUNK_EVENTS:
            out.append(chunk)
            chunk = Chunk(limits)
        named = names.get(channel)
        if named is None:
            named = names[channel] = (
                _bulk(redis_keys.meta_key(prefix, channel).encode()),
                _bulk(redis_keys.stream_key(prefix, channel).encode()),
                _bulk(redis_keys.state_key(prefix, channel).encode()),
                _bulk(redis_keys.state_order_key(prefix, channel).encode()),
                _bulk(pubsub_channel(prefix, channel).encode()),
            )
        meta, stream, state, order, pubsub = named
        idempotency = (
            _EMPTY
            if idempotency_key is None
            else _bulk(redis_keys.idempotency_key_name(prefix, channel, idempotency_key).encode())
        )
        chunk.keys += (meta, stream, idempotency, state, order)
        change = state_change(payload)
        if change is None:
            chunk.args += (pubsub, _bulk(payload), _EMPTY, _EMPTY, _EMPTY)
        else:
            chunk.args += (
                pubsub,
                _bulk(payload),
                _DEL if change.delete else _SET,
                _bulk(change.id.encode()),
                _bulk(change.version.encode()),
            )
        chunk.events += 1
    out.append(chunk)
    return out


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
    return [
        Position(offset=int(offset), epoch=epoch.decode(), duplicate=bool(duplicate))
        for reply in replies
        for offset, epoch, duplicate in reply
    ]
