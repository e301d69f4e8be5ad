"""Control commands (disconnect, revoke, unsubscribe): their encoding and how they reach every pod.

A command is published on CONTROL_CHANNEL through the broker the pods share, so every pod
subscribed to it applies the command within the broker's delivery latency (milliseconds).
A revocation is also written to the revocation store first, so a pod that starts later
(or missed the message) still refuses the tokens. The pod's side is service/control.py;
`Publisher` (service/publisher.py) sends the same commands from a backend service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

import orjson

from service.broker.base import Broker
from service.protocol import Channel, Filters, is_valid_id
from service.revocations import Revocation, RevocationStore

# The broker channel of control commands. Subscription keys always start with a channel kind
# (`transactions:`, ...), so no client can ever subscribe to it or publish on it.
CONTROL_CHANNEL: Final = "#control"
# Close reasons and `unsubscribed` reasons go into a close frame (at most 123 bytes).
MAX_REASON_LENGTH: Final = 100


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close every socket of `user_id` with 4003."""

    user_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Revoke:
    """Refuse the tokens `revocation` names, and close the sockets admitted with them with 4003."""

    revocation: Revocation


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """End the subscriptions of `user_id` on `channel` whose filters include every one of `filters`."""

    user_id: str
    channel: Channel
    filters: Filters
    reason: str


Command = Disconnect | Revoke | Unsubscribe


@dataclass(frozen=True, slots=True)
class Issued:
    """A command as every pod receives it: what, who asked (a user id, or a publisher's name), when."""

    command: Command
    requested_by: str
    # Unix seconds.
    issued_at: float


def command_name(command: Command) -> str:
    """The bounded label of a command, for metrics and logs."""
    return type(command).__name__.lower()


def target(command: Command) -> str:
    """Whom a command is about, for logs: `user:<id>`, or `jti` for one token (its id stays out of logs)."""
    if isinstance(command, Revoke):
        user_id = command.revocation.user_id
        return "jti" if user_id is None else f"user:{user_id}"
    return f"user:{command.user_id}"


def check_reason(reason: object, default: str) -> str:
    """A reason fit for a close frame; ValueError otherwise."""
    if reason is None:
        return default
    if not isinstance(reason, str) or not 0 < len(reason.encode()) <= MAX_REASON_LENGTH:
        raise ValueError(f"reason must be a string of 1 to {MAX_REASON_LENGTH} bytes")
    return reason


def encode(issued: Issued) -> bytes:
    command = issued.command
    body: dict[str, Any] = {
        "command": command_name(command),
        "requestedBy": issued.requested_by,
        "issuedAt": issued.issued_at,
    }
    if isinstance(command, Disconnect):
        body.update(userId=command.user_id, reason=command.reason)
    elif isinstance(command, Revoke):
        body["revocation"] = command.revocation.to_json()
    else:
        body.update(
            userId=command.user_id,
            channel=command.channel.value,
            filters=command.filters.to_json(),
            reason=command.reason,
        )
    return orjson.dumps(body)


def decode(payload: bytes) -> Issued:
    """The command `encode` wrote; ValueError for anything else."""
    raw = orjson.loads(payload)
    if not isinstance(raw, dict):
        raise ValueError("a command is an object")
    name, requested_by, issued_at = raw.get("command"), raw.get("requestedBy"), raw.get("issuedAt")
    if not isinstance(requested_by, str) or not isinstance(issued_at, int | float):
        raise ValueError("a command names who asked and when")
    command: Command
    if name == "revoke":
        command = Revoke(Revocation.from_json(raw.get("revocation")))
        return Issued(command, requested_by, float(issued_at))
    user_id, reason = raw.get("userId"), raw.get("reason")
    if not isinstance(user_id, str) or not is_valid_id(user_id) or not isinstance(reason, str):
        raise ValueError("a command names a valid userId and a reason")
    if name == "disconnect":
        command = Disconnect(user_id, reason)
    elif name == "unsubscribe":
        channel, filters = raw.get("channel"), raw.get("filters")
        if not isinstance(channel, str) or not isinstance(filters, dict):
            raise ValueError("an unsubscribe names a channel and filters")
        command = Unsubscribe(user_id, Channel(channel), _filters(filters), reason)
    else:
        raise ValueError("unknown command")
    return Issued(command, requested_by, float(issued_at))


def _filters(raw: dict[str, Any]) -> Filters:
    ids = raw.get("transactionIds")
    return Filters(
        customer_id=raw.get("customerId"),
        user_id=raw.get("userId"),
        transaction_ids=frozenset(ids) if isinstance(ids, list) else None,
    )


async def send(broker: Broker, store: RevocationStore | None, command: Command, *, requested_by: str) -> Issued:
    """Keep a revocation in the store, then publish the command to every pod; return what was sent.

    Returns once the broker took the command: every subscribed pod gets it. Raises
    BackendUnavailable when the store or the broker cannot take it (nothing, or only the
    stored revocation, took effect: retrying is safe), ValueError for a revocation without a store.
    """
    if isinstance(command, Revoke):
        if store is None:
            raise ValueError("a revocation needs the revocation store the pods load at start")
        await store.add(command.revocation)
    issued = Issued(command, requested_by, time.time())
    await broker.publish(CONTROL_CHANNEL, encode(issued))
    return issued
