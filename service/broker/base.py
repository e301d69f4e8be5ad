"""The Broker interface: how pods share events, history and liveness, and its contract."""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from service.backend_errors import BackendUnavailable

if TYPE_CHECKING:
    from service.broker.state import Snapshot, StateChange

# What an idempotency key may be: visible ASCII, so it can be part of a Redis key name as it is.
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")
# Channels between pods (control commands, inspect queries, presence events) start with it;
# no client channel can, since "#" is not allowed in an id.
INTERNAL_CHANNEL_PREFIX: Final = "#"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a channel's stream stands: the offset of its newest event within an epoch.

    Offsets start at 1 and grow by exactly 1 per published event. The epoch changes
    whenever the history is lost (an empty Redis, a restarted in-process broker), so
    a position from another epoch cannot be resumed.
    """

    offset: int
    epoch: str
    # Only on what `Broker.publish` returns: True when the event's idempotency key was
    # published within the window, so this is the original event's position and nothing
    # was appended. Not part of the position: equal places compare equal.
    duplicate: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One published event as the broker stores and delivers it."""

    channel: str
    offset: int
    epoch: str
    # The event as the publisher encoded it (UTF-8 JSON object); the broker never parses it.
    payload: bytes


@dataclass(frozen=True, slots=True)
class History:
    """What `Broker.history` found after a position."""

    # Oldest first, with contiguous offsets up to `position`: when recovered, the events
    # after the asked position; when not, every event the history still holds (at most
    # the history size), which a subscriber that lost its position gets after the notice.
    envelopes: list[Envelope]
    # The channel's newest position when the history was read.
    position: Position
    # False when the asked position is older than the retained window, beyond the newest
    # offset or from another epoch: the events in between are gone and the client must
    # refetch its state.
    recovered: bool


BrokerUnavailable = BackendUnavailable
"""What the broker raises when it cannot take a call now; the caller may retry later."""


def check_idempotency_key(key: str | None) -> None:
    """Raise ValueError for a key that does not match IDEMPOTENCY_KEY_RE; None is no key."""
    if key is not None and IDEMPOTENCY_KEY_RE.fullmatch(key) is None:
        raise ValueError("an idempotency key is 1 to 128 visible ASCII characters")


def idempotency_keys_for(batch: Sequence[tuple[str, bytes]], keys: Sequence[str | None] | None) -> Sequence[str | None]:
    """One checked idempotency key (or None) per item of `batch`; see Broker.publish_many."""
    if keys is None:
        return [None] * len(batch)
    if len(keys) != len(batch):
        raise ValueError("one idempotency key (or None) per event")
    for key in keys:
        check_idempotency_key(key)
    return keys


MessageHandler = Callable[[Envelope], None]
"""Called on the event loop for every live event of a subscribed channel; must not block."""

ResubscribedHandler = Callable[[list[str]], None]
"""Called after the broker lost and regained its subscriptions (e.g. Redis reconnect).

Events published in between were not delivered live; the hub catches up from history.
"""


class Broker(abc.ABC):
    """Moves events between publishers and the pods whose clients want them.

    Contract, checked by tests/broker_contract.py against every implementation:
    - `publish` assigns the next offset of the channel, appends the event to the
      channel's bounded history and delivers it to every pod subscribed to the channel,
      atomically: an event is in history if and only if it got an offset.
    - The same atomic step keeps the channel's state (service/broker/state.py): the payload
      of the newest event of each live transaction by `data.id` (`transaction_delete`
      removes it), at most `state_max_items` transactions (the least recently changed are
      dropped first), kept as long as the history. An event whose version is older than
      the stored one's (see state.is_older) is published but leaves the state alone, so
      versions in the state never go backwards. `snapshot` reads the state and the
      position it corresponds to in one atomic read: the events after that position are
      exactly the changes not in it.
    - An event published with an idempotency key is published once per channel and key
      within the idempotency window, whichever pod publishes it: a repeat returns the
      original position with `duplicate` set and appends and delivers nothing. The check
      is atomic with the publish. The keys live in the store with the history: a store
      that lost its data (a new epoch) forgot them too.
    - Once `subscribe(channel)` has returned, every event published on that channel
      afterwards reaches the message handler, in offset order, until `unsubscribe`.
      Live delivery is at most once; gaps (after an outage) are healed from `history`.
    - Interest is a set, not a count: the hub reference-counts local subscriptions and
      calls `subscribe` for a channel's first and `unsubscribe` for its last.
    - When the connection to the shared backend is lost, the broker keeps the wanted
      set, reconnects with capped jittered backoff, resubscribes everything still
      wanted, then calls the resubscribed handler so gaps can be filled from history.
    """

    def __init__(self) -> None:
        self._on_message: MessageHandler = lambda envelope: None
        self._on_resubscribed: ResubscribedHandler = lambda channels: None

    def set_handlers(self, *, on_message: MessageHandler, on_resubscribed: ResubscribedHandler) -> None:
        """Install the hub's callbacks; called once before `start`."""
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed

    @abc.abstractmethod
    async def start(self) -> None:
        """Start delivering. A shared backend that cannot be reached yet does not fail the
        start: the broker stays not ready and keeps trying until it can."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release every connection; idempotent."""

    @abc.abstractmethod
    async def publish(self, channel: str, payload: bytes, *, idempotency_key: str | None = None) -> Position:
        """Append and deliver one event; return its position. Raise BrokerUnavailable fast.

        `idempotency_key` (IDEMPOTENCY_KEY_RE, else ValueError) names the event within its
        channel; None publishes without deduplication."""

    async def publish_many(
        self,
        items: Iterable[tuple[str, bytes]],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        states: Sequence[StateChange | None] | None = None,
    ) -> list[Position]:
        """Publish several events, in order; implementations may pipeline.

        `idempotency_keys` has one entry per item (None for an item without); None: no keys.
        `states` has one entry per item: what it changes in the state, exactly what
        state.state_change(payload) says (a publisher that built the payload knows it without
        parsing it again); None: the broker works it out from the payloads."""
        batch = list(items)
        keys = idempotency_keys_for(batch, idempotency_keys)
        return [
            await self.publish(channel, payload, idempotency_key=key)
            for (channel, payload), key in zip(batch, keys, strict=True)
        ]

    @abc.abstractmethod
    async def snapshot(self, channel: str) -> Snapshot:
        """The channel's state and the position it corresponds to (see the contract above).
        Like `history(channel, None)`, reading a channel that never had events fixes its epoch."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start live delivery for a channel; returns once delivery is in effect."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop live delivery for a channel; unknown channels are ignored."""

    @abc.abstractmethod
    async def history(self, channel: str, since: Position | None) -> History:
        """Events after `since`, or all that are held when `since` cannot be resumed (see
        History); None: no events, only the current position. Reads at most the history size."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while live delivery can be trusted (connected, subscriptions in effect)."""

    def not_ready_reasons(self) -> list[str]:
        """Why live delivery cannot be trusted now (stable snake_case codes); empty when ready."""
        return [] if self.ready else ["broker_not_ready"]

    @property
    @abc.abstractmethod
    def subscribed_channels(self) -> frozenset[str]:
        """Channels whose subscription is in effect right now."""
