"""The client protocol: what clients send (schema, channels, filters), error codes and close codes."""

from __future__ import annotations

import enum
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from service.broker.base import Position


class Channel(enum.StrEnum):
    TRANSACTIONS = "transactions"
    USER_UPDATES = "user_updates"
    NOTIFICATIONS = "notifications"


class EventType(enum.StrEnum):
    TRANSACTION_UPDATE = "transaction_update"
    TRANSACTION_NEW = "transaction_new"
    TRANSACTION_DELETE = "transaction_delete"
    STAGE_CHANGE = "stage_change"
    USER_UPDATE = "user_update"
    NOTIFICATION = "notification"


TRANSACTION_EVENTS: Final = frozenset(
    {EventType.TRANSACTION_UPDATE, EventType.TRANSACTION_NEW, EventType.TRANSACTION_DELETE, EventType.STAGE_CHANGE}
)
# Which event types each channel carries; transaction events may also go to a user's channels.
EVENTS_BY_CHANNEL: Final[dict[Channel, frozenset[EventType]]] = {
    Channel.TRANSACTIONS: TRANSACTION_EVENTS,
    Channel.USER_UPDATES: TRANSACTION_EVENTS | {EventType.USER_UPDATE},
    Channel.NOTIFICATIONS: TRANSACTION_EVENTS | {EventType.NOTIFICATION},
}


class ErrorCode(enum.StrEnum):
    """Stable `code` of an `error` message; the connection stays open after each."""

    INVALID_JSON = "invalid_json"  # the frame is not JSON
    INVALID_MESSAGE = "invalid_message"  # not an object, a field of the wrong type, an unknown field
    UNKNOWN_TYPE = "unknown_type"  # `type` is not subscribe, unsubscribe, ping or refresh
    UNKNOWN_CHANNEL = "unknown_channel"  # `channel` is not one of Channel
    INVALID_FILTERS = "invalid_filters"  # a filter is unknown, of the wrong type or too long
    FORBIDDEN = "forbidden"  # the token does not entitle the user to this subscription
    ALREADY_SUBSCRIBED = "already_subscribed"  # the same subscription key is active on this connection
    NOT_SUBSCRIBED = "not_subscribed"  # unsubscribe of a key that is not active
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"  # EVA_WS_MAX_SUBSCRIPTIONS reached
    RATE_LIMITED = "rate_limited"  # message dropped by the per-connection rate limit
    BINARY_NOT_SUPPORTED = "binary_not_supported"  # the protocol is JSON in text frames
    TOKEN_EXPIRING = "token_expiring"  # the token expired: send `refresh` before the grace period ends
    INVALID_TOKEN = "invalid_token"  # a `refresh` carried a token that is invalid or for another user
    TOKEN_REVOKED = "token_revoked"  # a `refresh` carried a token an operator revoked (POST /api/v1/revoke)
    UNAVAILABLE = "unavailable"  # the broker could not take the subscription now; retry later
    INTERNAL_ERROR = "internal_error"  # a bug; logged with the correlation id


class Reconnect(enum.StrEnum):
    """Whether a client should reconnect after a close code (AsyncAPI `x-close-codes`' `reconnect`)."""

    YES = "yes"  # with backoff, resuming from the last position it handled
    NO = "no"  # ended on purpose, or the client must change before it tries again
    WITH_NEW_TOKEN = "with_new_token"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the service sends or records: each with its meaning and reconnect advice.

    Members are `(code, label, reconnect, meaning, advice)`; `label` is the `reason` of
    eva_ws_disconnects_total and of the `connection_closed` log line (see `close_label`).
    docs/protocol.md's close-code table and docs/asyncapi.yaml's `x-close-codes` list the same
    codes, and tests/test_close_codes.py checks that they agree.
    """

    label: str
    reconnect: Reconnect
    meaning: str
    advice: str

    def __new__(cls, code: int, label: str, reconnect: Reconnect, meaning: str, advice: str) -> CloseCode:
        member = int.__new__(cls, code)
        member._value_ = code
        member.label, member.reconnect, member.meaning, member.advice = label, reconnect, meaning, advice
        return member

    NORMAL = 1000, "client_closed", Reconnect.NO, "the client asked to close", "no: the client asked"
    GOING_AWAY = (
        1001,
        "going_away",
        Reconnect.YES,
        "the server stopped without a drain",
        "yes, with backoff, resuming",
    )
    PROTOCOL_ERROR = (
        1002,
        "protocol_error",
        Reconnect.NO,
        "a frame broke RFC 6455 (unmasked, reserved bits or opcode, an invalid close code)",
        "fix the client",
    )
    UNSUPPORTED_DATA = (
        1003,
        "protocol_error",
        Reconnect.NO,
        "the client refused a kind of data (sent by clients only)",
        "the client's own choice",
    )
    ABNORMAL = (
        1006,
        "abnormal",
        Reconnect.YES,
        "no close frame: network loss or a missed heartbeat (never sent, only seen)",
        "yes, with backoff, resuming",
    )
    INVALID_TEXT = (
        1007,
        "protocol_error",
        Reconnect.NO,
        "a text frame or close reason that is not UTF-8",
        "fix the client",
    )
    POLICY_VIOLATION = (
        1008,
        "rate_limited",
        Reconnect.NO,
        "sustained rate-limit abuse",
        "only after a long backoff; fix the client",
    )
    MESSAGE_TOO_BIG = (
        1009,
        "message_too_big",
        Reconnect.NO,
        "a message above `EVA_WS_MAX_MESSAGE_BYTES` (default 64 KiB) or in more than 1,024 fragments",
        "fix the client",
    )
    INTERNAL_ERROR = 1011, "internal_error", Reconnect.YES, "a server error", "yes, with backoff"
    SERVICE_RESTART = (
        1012,
        "service_restart",
        Reconnect.YES,
        "the pod drains for a deploy",
        "yes, with backoff and full jitter, resuming",
    )
    TOKEN_EXPIRED = (
        4001,
        "token_expired",
        Reconnect.WITH_NEW_TOKEN,
        "the token expired and was not refreshed in time",
        "with a new token",
    )
    DISCONNECTED_BY_SERVER = (
        4003,
        "disconnected",
        Reconnect.NO,
        "an operator disconnected the user (`POST /api/v1/disconnect`) "
        "or revoked the token the socket was opened with; the close reason says which",
        "no: the session was ended on purpose; reconnect only after the user signs in again with a new token",
    )
    SLOW_CONSUMER = (
        4008,
        "slow_consumer",
        Reconnect.YES,
        "the client did not read fast enough and its queue overflowed",
        "yes, resuming",
    )
    REBALANCE = (
        4013,
        "rebalance",
        Reconnect.YES,
        "the pod sheds connections after a scale-out",
        "yes, at once with jitter, resuming",
    )


# Close codes after which a client should reconnect (with backoff) and resume.
RECONNECT_CODES: Final = frozenset(code for code in CloseCode if code.reconnect is Reconnect.YES)
_CLOSE_CODES: Final[dict[int, CloseCode]] = {int(code): code for code in CloseCode}
# Codes the WebSocket layer closes with (or sees) whoever ended the connection: their label
# applies always. The others are labelled only when this service chose them, else `client_closed`.
_PROTOCOL_CLOSES: Final = frozenset(
    {
        CloseCode.PROTOCOL_ERROR,
        CloseCode.UNSUPPORTED_DATA,
        CloseCode.ABNORMAL,
        CloseCode.INVALID_TEXT,
        CloseCode.MESSAGE_TOO_BIG,
    }
)


def close_label(code: int, *, server_initiated: bool) -> str:
    """A bounded label for why a connection ended (`server_initiated`: this service chose `code`)."""
    close = _CLOSE_CODES.get(code)
    if close is None or not (server_initiated or close in _PROTOCOL_CLOSES):
        return CloseCode.NORMAL.label
    return close.label


# Ids become part of Redis channel names: a conservative ASCII set with no glob characters.
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._~@+|:=-]{1,128}")
MAX_TRANSACTION_IDS: Final = 100
MAX_CORRELATION_ID_LENGTH: Final = 128
# Below the smallest request-head budget (EVA_WS_MAX_REQUEST_HEAD_BYTES, at least 8,192 bytes)
# with room for the path, the other parameters and a browser's headers, so a token the service
# accepts always fits in `?token=`.
MAX_TOKEN_LENGTH: Final = 6144
_MESSAGE_FIELDS: Final = frozenset(
    {"type", "channel", "filters", "timestamp", "correlationId", "since", "token", "presence", "snapshot"}
)
_FILTER_FIELDS: Final = frozenset({"customerId", "userId", "transactionIds"})


class ProtocolError(Exception):
    """A client message was refused; carries the error code and a message safe to show."""

    def __init__(self, code: ErrorCode, message: str, correlation_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.correlation_id = correlation_id


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Filters:
    customer_id: str | None = None
    user_id: str | None = None
    transaction_ids: frozenset[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.customer_id is not None:
            out["customerId"] = self.customer_id
        if self.user_id is not None:
            out["userId"] = self.user_id
        if self.transaction_ids is not None:
            out["transactionIds"] = sorted(self.transaction_ids)
        return out


@dataclass(frozen=True, slots=True)
class ClientMessage:
    type: str
    channel: Channel | None = None
    filters: Filters = Filters()
    correlation_id: str | None = None
    since: Position | None = None
    token: str | None = None
    # subscribe to transactions only: also presence_join / presence_leave of the customer.
    presence: bool = False
    # subscribe only: start from the channel's state (`snapshot` messages), not just a position.
    snapshot: bool = False


def parse_client_message(text: str) -> ClientMessage:
    """Validate one text frame against the schema in docs/protocol.md; raise ProtocolError."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "message is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")

    correlation_id = raw.get("correlationId")
    if correlation_id is not None and not (
        isinstance(correlation_id, str) and 0 < len(correlation_id) <= MAX_CORRELATION_ID_LENGTH
    ):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"correlationId must be a string of 1 to {MAX_CORRELATION_ID_LENGTH} characters"
        )

    def fail(code: ErrorCode, message: str) -> ProtocolError:
        return ProtocolError(code, message, correlation_id)

    unknown = set(raw) - _MESSAGE_FIELDS
    if unknown:
        raise fail(ErrorCode.INVALID_MESSAGE, f"unknown field {sorted(unknown)[0][:64]!r}")
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise fail(ErrorCode.INVALID_MESSAGE, "type must be a string")
    timestamp = raw.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str | int | float):
        raise fail(ErrorCode.INVALID_MESSAGE, "timestamp must be an ISO 8601 string")

    if kind == "ping":
        return ClientMessage(type=kind, correlation_id=correlation_id)
    if kind == "refresh":
        token = raw.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise fail(ErrorCode.INVALID_MESSAGE, "refresh needs a token string")
        return ClientMessage(type=kind, correlation_id=correlation_id, token=token)
    if kind not in ("subscribe", "unsubscribe"):
        raise fail(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}")

    channel_name = raw.get("channel")
    if not isinstance(channel_name, str):
        raise fail(ErrorCode.INVALID_MESSAGE, "channel must be a string")
    try:
        channel = Channel(channel_name)
    except ValueError:
        raise fail(ErrorCode.UNKNOWN_CHANNEL, f"unknown channel {channel_name[:64]!r}") from None

    since = _parse_since(raw.get("since"), fail) if kind == "subscribe" else None
    presence = raw.get("presence", False)
    if not isinstance(presence, bool):
        raise fail(ErrorCode.INVALID_MESSAGE, "presence must be true or false")
    if presence and (kind != "subscribe" or channel is not Channel.TRANSACTIONS):
        raise fail(ErrorCode.INVALID_MESSAGE, "presence is for a subscribe to transactions")
    snapshot = raw.get("snapshot", False)
    if not isinstance(snapshot, bool):
        raise fail(ErrorCode.INVALID_MESSAGE, "snapshot must be true or false")
    if snapshot and kind != "subscribe":
        raise fail(ErrorCode.INVALID_MESSAGE, "snapshot is for a subscribe")
    return ClientMessage(
        type=kind,
        channel=channel,
        filters=_parse_filters(raw.get("filters"), fail),
        correlation_id=correlation_id,
        since=since,
        presence=presence,
        snapshot=snapshot,
    )


def _parse_filters(raw: object, fail: Any) -> Filters:
    if raw is None:
        return Filters()
    if not isinstance(raw, dict):
        raise fail(ErrorCode.INVALID_FILTERS, "filters must be an object")
    unknown = set(raw) - _FILTER_FIELDS
    if unknown:
        raise fail(ErrorCode.INVALID_FILTERS, f"unknown filter {sorted(unknown)[0][:64]!r}")
    for key in ("customerId", "userId"):
        value = raw.get(key)
        if value is not None and not is_valid_id(value):
            raise fail(ErrorCode.INVALID_FILTERS, f"{key} must be 1-128 characters of A-Z a-z 0-9 . _ ~ @ + | : = -")
    ids = raw.get("transactionIds")
    transaction_ids: frozenset[str] | None = None
    if ids is not None:
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_TRANSACTION_IDS:
            raise fail(ErrorCode.INVALID_FILTERS, f"transactionIds must be a list of 1 to {MAX_TRANSACTION_IDS} ids")
        if not all(is_valid_id(i) for i in ids):
            raise fail(ErrorCode.INVALID_FILTERS, "transactionIds must hold valid ids")
        transaction_ids = frozenset(ids)
    customer_id = raw.get("customerId")
    if customer_id is not None:
        # Interned: the subscriptions of every socket of a customer hold its id, one string for all.
        customer_id = sys.intern(customer_id)
    return Filters(customer_id=customer_id, user_id=raw.get("userId"), transaction_ids=transaction_ids)


def _parse_since(raw: object, fail: Any) -> Position | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"offset", "epoch"}:
        raise fail(ErrorCode.INVALID_MESSAGE, "since must be an object with offset and epoch")
    offset, epoch = raw["offset"], raw["epoch"]
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 2**63:
        raise fail(ErrorCode.INVALID_MESSAGE, "since.offset must be a non-negative integer")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        raise fail(ErrorCode.INVALID_MESSAGE, "since.epoch must be a string")
    return Position(offset=offset, epoch=epoch)


def subscription_key(channel: Channel, routing_id: str) -> str:
    """The broker channel of a subscription: one stream of offsets per key."""
    return f"{channel}:{routing_id}"


def channel_of_key(key: str) -> Channel:
    return Channel(key.partition(":")[0])


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_utc(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def position_json(position: Position) -> dict[str, Any]:
    return {"offset": position.offset, "epoch": position.epoch}
