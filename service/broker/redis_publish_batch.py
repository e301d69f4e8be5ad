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
_KEYS_PER_EVENT: Final = 5


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings every event of a batch is published with (see RedisBroker)."""

    history_size: int
    history_ttl_s: int
    idempotency_window_s: int
    state_max_items: int


def _command(verb: bytes, script_ref: bytes, keys: list[bytes], args: list[bytes]) -> bytes:
    """`<verb> <script_ref> <numkeys> keys... args...` in RESP."""
    parts = [verb, script_ref, b"%d" % len(keys), *keys, *args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Chunk:
    """KEYS and ARGV of one publish_batch.lua call."""

    __slots__ = ("args", "keys")

    def __init__(self, limits: Limits) -> None:
        self.keys: list[bytes] = []
        self.args: list[bytes] = [
            new_epoch().encode(),
            b"%d" % limits.history_ttl_s,
            b"%d" % limits.history_size,
            b"%d" % limits.idempotency_window_s,
            b"%d" % limits.state_max_items,
        ]

    def command(self, *, by_sha: bool) -> bytes:
        if by_sha:
            return _command(b"EVALSHA", _SHA, self.keys, self.args)
        return _command(b"EVAL", SCRIPT.encode(), self.keys, self.args)


def chunks(
    prefix: str,
    events: Sequence[tuple[str, bytes]],
    idempotency_keys: Sequence[str | None],
    *,
    pubsub_channel: Callable[[str, str], str],
    limits: Limits,
) -> list[Chunk]:
    """The script calls that publish `events` in order; `pubsub_channel(prefix, channel)` names the PUB/SUB channel."""
    names: dict[str, tuple[bytes, bytes, bytes, bytes, bytes]] = {}
    out: list[Chunk] = []
    chunk = Chunk(limits)
    for (channel, payload), idempotency_key in zip(events, idempotency_keys, strict=True):
        if len(chunk.keys) == CHUNK_EVENTS * _KEYS_PER_EVENT:
            out.append(chunk)
            chunk = Chunk(limits)
        named = names.get(channel)
        if named is None:
            named = names[channel] = (
                redis_keys.meta_key(prefix, channel).encode(),
                redis_keys.stream_key(prefix, channel).encode(),
                redis_keys.state_key(prefix, channel).encode(),
                redis_keys.state_order_key(prefix, channel).encode(),
                pubsub_channel(prefix, channel).encode(),
            )
        meta, stream, state, order, pubsub = named
        idempotency = (
            b""
            if idempotency_key is None
            else redis_keys.idempotency_key_name(prefix, channel, idempotency_key).encode()
        )
        chunk.keys += (meta, stream, idempotency, state, order)
        change = state_change(payload)
        if change is None:
            chunk.args += (pubsub, payload, b"", b"", b"")
        else:
            chunk.args += (
                pubsub,
                payload,
                b"del" if change.delete else b"set",
                change.id.encode(),
                change.version.encode(),
            )
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
