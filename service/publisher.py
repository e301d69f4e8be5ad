"""Publishing events: validation, the event envelope, and the Python API for backend services."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from service import metrics
from service.auth import MAX_JTI_LENGTH
from service.broker.base import IDEMPOTENCY_KEY_RE, Broker, Position
from service.broker.state import STATE_DELETE_TYPE, StateChange
from service.control_commands import Command, Disconnect, Revoke, check_reason, send
from service.protocol import (
    EVENTS_BY_CHANNEL,
    TRANSACTION_EVENTS,
    Channel,
    EventType,
    is_valid_id,
)
from service.revocations import Revocation, RevocationStore

# Redis kills subscribers whose output buffer overflows; big events must not get that far.
MAX_EVENT_BYTES: Final = 64 * 1024
_TRANSACTION_STRING_FIELDS: Final = ("status", "stage", "updatedAt", "updatedBy", "userId")


def new_correlation_id() -> str:
    """A random (version 4) UUID as text, like str(uuid.uuid4()) at a fraction of its cost."""
    try:
        return next(_correlation_ids)
    except StopIteration:
        _refill_correlation_ids()
        return next(_correlation_ids)


# Correlation ids made CORRELATION_IDS_AT_ONCE at a time from one read of os.urandom: reading
# 16 bytes per id cost more than the rest of the id. A list iterator hands each id out once,
# even to several threads.
CORRELATION_IDS_AT_ONCE: Final = 256
# The variant nibble of a version 4 UUID: 10xx, from the random nibble's two low bits.
_VARIANT: Final = {f"{n:x}": "89ab"[n & 3] for n in range(16)}
_correlation_ids: Iterator[str] = iter(())


def _refill_correlation_ids() -> None:
    global _correlation_ids
    pool = os.urandom(16 * CORRELATION_IDS_AT_ONCE).hex()
    _correlation_ids = iter(
        [
            f"{pool[i : i + 8]}-{pool[i + 8 : i + 12]}-4{pool[i + 13 : i + 16]}-"
            f"{_VARIANT[pool[i + 16]]}{pool[i + 17 : i + 20]}-{pool[i + 20 : i + 32]}"
            for i in range(0, len(pool), 32)
        ]
    )


class _EventClock:
    """The events' `timestamp` (UTC, milliseconds, as protocol.utc_now_iso), formatted once per millisecond.

    The events of a batch are stamped within the same millisecond or two; formatting a datetime
    for each one cost more than encoding the event.
    """

    __slots__ = ("_ms", "_text")

    def __init__(self) -> None:
        self._ms = -1
        self._text = ""

    def now_iso(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:
            seconds, millis = divmod(ms, 1000)
            whole = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").removesuffix("+00:00")
            self._ms, self._text = ms, f"{whole}.{millis:03d}Z"
        return self._text


_CLOCK: Final = _EventClock()


class InvalidEvent(ValueError):
    """The event was refused; the message says why and is safe to return to the publisher."""


# Not frozen, like PreparedEvent: a frozen dataclass costs three times as much to make, once per event.
@dataclass(slots=True)
class Published:
    correlation_id: str
    subscription: str
    # For a repeated idempotency key, the original event's position (`position.duplicate`).
    position: Position


@dataclass(slots=True)
class PreparedEvent:
    """A validated event, encoded once, ready for the broker (not to be changed: not frozen only
    because a frozen dataclass costs three times as much to make, once per event)."""

    subscription: str
    payload: bytes
    correlation_id: str
    # Names the event within its channel; see Broker.publish.
    idempotency_key: str | None = None
    # What the event changes in its channel's state (state.state_change of `payload`), known
    # from the event before it was encoded, so the broker need not parse the payload again.
    state: StateChange | None = None


# Lookups by text, with what each event needs: constructing and hashing the enums (Channel(text),
# kind in TRANSACTION_EVENTS) cost more per event than encoding it.
# A channel's text -> the channel, the start of its subscription keys, the event types it carries.
_CHANNELS: Final = {c.value: (c, f"{c.value}:", frozenset(t.value for t in EVENTS_BY_CHANNEL[c])) for c in Channel}
# An event type's text -> the type, its text, whether it is about one transaction.
_EVENT_TYPES: Final = {t.value: (t, t.value, t in TRANSACTION_EVENTS) for t in EventType}


def prepare_event(
    event_type: str,
    data: object,
    *,
    channel: str = Channel.TRANSACTIONS,
    user_id: str | None = None,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> PreparedEvent:
    """Validate an event and encode the payload every pod will fan out; raise InvalidEvent."""
    return _prepare(event_type, data, channel, user_id, correlation_id, idempotency_key)


def _prepare(
    event_type: object,
    data: object,
    channel: object,
    user_id: object,
    correlation_id: object,
    idempotency_key: object,
) -> PreparedEvent:
    """prepare_event with positional arguments, which cost less to pass once per event."""
    found = _CHANNELS.get(channel) if isinstance(channel, str) else None
    if found is None:
        raise InvalidEvent(f"unknown channel {str(channel)[:64]!r}")
    chan, key_start, carried = found
    typed = _EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
    if typed is None:
        raise InvalidEvent(f"unknown event type {str(event_type)[:64]!r}")
    kind, kind_text, about_a_transaction = typed
    if kind_text not in carried:
        raise InvalidEvent(f"{kind} events cannot be published on {chan}")
    if not isinstance(data, dict):
        raise InvalidEvent("data must be an object")
    if about_a_transaction:
        _check_transaction(data)

    if chan is Channel.TRANSACTIONS:
        customer_id = data.get("customerId")
        if not is_valid_id(customer_id):
            raise InvalidEvent("data.customerId is required and must be a valid id")
        routing_id: str = customer_id  # type: ignore[assignment]  # checked by is_valid_id
    else:
        if not is_valid_id(user_id):
            raise InvalidEvent(f"userId is required and must be a valid id for {chan}")
        routing_id = user_id  # type: ignore[assignment]  # checked by is_valid_id

    if correlation_id is None:
        correlation_id = new_correlation_id()
    elif not (isinstance(correlation_id, str) and 0 < len(correlation_id) <= 128):
        raise InvalidEvent("correlationId must be a string of 1 to 128 characters")
    if idempotency_key is not None and not (
        isinstance(idempotency_key, str) and IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key)
    ):
        raise InvalidEvent("idempotencyKey must be a string of 1 to 128 visible ASCII characters")
    try:
        payload = orjson.dumps(
            {"type": kind_text, "data": data, "timestamp": _CLOCK.now_iso(), "correlationId": correlation_id}
        )
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidEvent(f"data cannot be encoded as JSON: {exc}") from None
    if len(payload) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(payload)} bytes; the limit is {MAX_EVENT_BYTES}")
    return PreparedEvent(
        # As protocol.subscription_key(chan, routing_id); str + str, since a str subclass is its text.
        key_start + routing_id,
        payload,
        correlation_id,
        idempotency_key,
        _state_change(kind_text, data) if about_a_transaction else None,
    )


def _state_change(kind: str, data: dict[str, Any]) -> StateChange:
    """state.state_change of the payload of a checked transaction event, from its `data` in hand.

    The payload holds `data` as orjson encoded it, and the transaction checks leave only
    values that read back the same: `id` a valid id, `updatedAt` a string or absent.
    """
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        # int(): an int subclass is encoded as its number (the payload does not keep the type).
        order = f"n:{int(version)}"
    else:
        updated_at = data.get("updatedAt")
        # str + str: a str subclass is encoded as its text.
        order = "s:" + updated_at if isinstance(updated_at, str) and "\n" not in updated_at else ""
    return StateChange(kind == STATE_DELETE_TYPE, "" + data["id"], order)


# The fields of one event object of POST /api/v1/publish (and of an outbox row's event).
PUBLISH_FIELDS: Final = frozenset({"type", "data", "channel", "userId", "correlationId", "idempotencyKey"})


def prepare_event_object(item: object) -> PreparedEvent:
    """Validate one event object as POST /api/v1/publish takes it (JSON names); raise InvalidEvent."""
    if not isinstance(item, dict):
        raise InvalidEvent("an event must be an object")
    if not PUBLISH_FIELDS.issuperset(item):
        raise InvalidEvent(f"unknown field {sorted(set(item) - PUBLISH_FIELDS)[0][:64]!r}")
    get = item.get
    return _prepare(
        get("type"),
        get("data"),
        get("channel", "transactions"),
        get("userId"),
        get("correlationId"),
        get("idempotencyKey"),
    )


def _check_transaction(data: dict[str, Any]) -> None:
    if not is_valid_id(data.get("id")):
        raise InvalidEvent("data.id is required and must be a valid id")
    for name in _TRANSACTION_STRING_FIELDS:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidEvent(f"data.{name} must be a string")
    changed = data.get("changedFields")
    if changed is not None:
        if not isinstance(changed, list):
            raise InvalidEvent("data.changedFields must be a list of strings")
        for field_name in changed:
            if not isinstance(field_name, str):
                raise InvalidEvent("data.changedFields must be a list of strings")


class Publisher:
    """Publishes events through a broker, in-process or from any backend service.

    A backend service connects to the Redis the pods share:

    >>> async with Publisher.connect("redis://redis:6379/0") as publisher:
    ...     await publisher.publish("transaction_update", {"id": "T1", "customerId": "C1"})
    """

    def __init__(
        self, broker: Broker, *, revocations: RevocationStore | None = None, name: str = "publisher", leeway_s: int = 30
    ) -> None:
        """`revocations`: where `revoke` keeps revocations (None: this publisher cannot revoke).
        `name` says who sent a control command in the pods' logs; `leeway_s` is the pods' EVA_WS_JWT_LEEWAY_S."""
        self._broker = broker
        self._revocations = revocations
        self._name = name
        self._leeway_s = leeway_s

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        redis_url: str,
        *,
        prefix: str = "",
        history_size: int | None = None,
        history_ttl_s: int | None = None,
        idempotency_window_s: int | None = None,
    ) -> AsyncIterator[Publisher]:
        """A publisher on the Redis (or Redis Cluster) the pods use; its connections close with the block.

        `redis_url` and `prefix` are the pods' EVA_WS_REDIS_URL and EVA_WS_REDIS_PREFIX.
        `history_size` and `history_ttl_s` bound the history this publisher appends to, as
        EVA_WS_HISTORY_SIZE and EVA_WS_HISTORY_TTL_S do for the pods, and
        `idempotency_window_s` is their EVA_WS_IDEMPOTENCY_WINDOW_S; None keeps their
        defaults, so set them only where the pods do. Nothing is sent before the first
        publish: a Redis that cannot be reached makes `publish` raise BrokerUnavailable.
        """
        from service.backends import create_broker, create_revocation_store
        from service.config import REDIS_URL_SCHEMES, Settings

        if not redis_url.startswith(REDIS_URL_SCHEMES):
            raise ValueError(f"redis_url must start with {', '.join(REDIS_URL_SCHEMES)}")
        # The pod id only names the Redis connections (CLIENT LIST shows who is publishing).
        settings = Settings(redis_url=redis_url, redis_prefix=prefix, pod_id=f"publisher-{socket.gethostname()}")
        settings = replace(
            settings,
            history_size=settings.history_size if history_size is None else history_size,
            history_ttl_s=settings.history_ttl_s if history_ttl_s is None else history_ttl_s,
            idempotency_window_s=(
                settings.idempotency_window_s if idempotency_window_s is None else idempotency_window_s
            ),
        )
        broker = create_broker(settings)
        revocations = create_revocation_store(settings)
        try:
            yield cls(broker, revocations=revocations, name=settings.pod_id, leeway_s=settings.jwt_leeway_s)
        finally:
            await revocations.close()
            await broker.close()

    async def publish(
        self,
        event_type: str,
        data: dict[str, Any],
        *,
        channel: str = Channel.TRANSACTIONS,
        user_id: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """Validate, publish and return the event's position; raise InvalidEvent or BrokerUnavailable.

        With `idempotency_key`, a retry of a publish that raised BrokerUnavailable (and may
        have been stored) is safe: within EVA_WS_IDEMPOTENCY_WINDOW_S, a key already published
        on the event's channel returns the original position (`position.duplicate`) and the
        event is not delivered again. Use one key per event, e.g. the id of its database change.
        """
        try:
            event = prepare_event(
                event_type,
                data,
                channel=channel,
                user_id=user_id,
                correlation_id=correlation_id,
                idempotency_key=idempotency_key,
            )
        except InvalidEvent:
            metrics.PUBLISHED.labels("invalid").inc()
            raise
        return (await self.publish_prepared([event]))[0]

    async def disconnect(self, user_id: str, *, reason: str = "disconnected by an operator") -> None:
        """Close every socket of `user_id` on every pod with 4003 (as POST /api/v1/disconnect does).

        Returns once the pods' broker took the command; raises ValueError for a bad id or
        reason, BrokerUnavailable when Redis cannot be reached (retrying is safe).
        """
        if not is_valid_id(user_id):
            raise ValueError("user_id must be a valid id")
        await self._send(Disconnect(user_id, check_reason(reason, reason)))

    async def revoke(
        self, *, user_id: str | None = None, issued_before: int | None = None, jti: str | None = None
    ) -> None:
        """Refuse, on every pod, the tokens of `user_id` issued before `issued_before` (unix seconds), or
        the token `jti`; sockets opened with them close with 4003 (as POST /api/v1/revoke does).

        Returns once the revocation is stored and sent; raises ValueError for a bad request,
        BrokerUnavailable when Redis cannot be reached (retrying is safe).
        """
        if (jti is None) == (user_id is None):
            raise ValueError("revoke names either user_id and issued_before, or jti")
        if jti is not None:
            if issued_before is not None or not 0 < len(jti) <= MAX_JTI_LENGTH:
                raise ValueError(f"jti must be 1 to {MAX_JTI_LENGTH} characters, without issued_before")
            revocation = Revocation.of_token(jti, leeway_s=self._leeway_s)
        else:
            if not is_valid_id(user_id) or not isinstance(issued_before, int) or issued_before < 0:
                raise ValueError("revoke by user needs a valid user_id and issued_before in whole unix seconds")
            if issued_before > time.time() + self._leeway_s:
                raise ValueError("issued_before must not be in the future")
            revocation = Revocation.of_user(str(user_id), issued_before, leeway_s=self._leeway_s)
        await self._send(Revoke(revocation))

    async def _send(self, command: Command) -> None:
        await send(self._broker, self._revocations, command, requested_by=self._name)

    async def publish_prepared(self, events: list[PreparedEvent]) -> list[Published]:
        """Publish validated events in order (pipelined when the broker can)."""
        started = time.perf_counter()
        try:
            positions = await self._broker.publish_many(
                [(e.subscription, e.payload) for e in events],
                idempotency_keys=[e.idempotency_key for e in events],
                states=[e.state for e in events],
            )
        except Exception:
            metrics.PUBLISHED.labels("unavailable").inc(len(events))
            raise
        metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
        duplicates = sum(p.duplicate for p in positions)
        metrics.PUBLISHED.labels("ok").inc(len(events) - duplicates)
        if duplicates:
            metrics.PUBLISHED.labels("duplicate").inc(duplicates)
        return [Published(e.correlation_id, e.subscription, p) for e, p in zip(events, positions, strict=True)]
