"""The embedded in-process broker: one node, no other server, same contract as Redis."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Final

from service.broker.base import Broker, Envelope, History, Position, check_idempotency_key
from service.broker.state import Snapshot, StateChange, is_older, state_change

# Idempotency keys remembered at most, across channels: a publisher flooding keys cannot grow
# the process without bound. Beyond it the oldest are forgotten before their window ends, and
# a retry of those would be published again.
MAX_IDEMPOTENCY_KEYS: Final = 100_000


@dataclass(slots=True)
class _Stream:
    offset: int = 0
    # Bounded: the oldest events fall out, and a resume from before them is unrecovered.
    events: deque[Envelope] = field(default_factory=deque)
    touched_at: float = field(default_factory=time.monotonic)
    # Transaction id -> (version, payload), least recently changed first; see Broker's contract.
    state: OrderedDict[str, tuple[str, bytes]] = field(default_factory=OrderedDict)


class MemoryBroker(Broker):
    """See Broker. History lives in this process and is lost with it (a new epoch on start).

    Streams idle for longer than `history_ttl_s` are forgotten on the next publish, so
    memory is bounded by the channels active within the TTL times `history_size`.
    Idempotency keys are remembered for `idempotency_window_s`, at most MAX_IDEMPOTENCY_KEYS.
    A channel's state holds at most `state_max_items` transactions.
    """

    def __init__(
        self,
        *,
        history_size: int = 1000,
        history_ttl_s: float = 86_400,
        idempotency_window_s: float = 300,
        state_max_items: int = 10_000,
    ) -> None:
        super().__init__()
        self._history_size = history_size
        self._state_max_items = state_max_items
        self._history_ttl_s = history_ttl_s
        self._idempotency_window_s = idempotency_window_s
        # (channel, key) -> (when it expires, the original position), oldest first: with one
        # window for every key, insertion order is expiry order.
        self._idempotency: dict[tuple[str, str], tuple[float, Position]] = {}
        self._epoch = secrets.token_hex(4)
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._started = False
        self._last_sweep = time.monotonic()

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        self._subscribed.clear()

    async def publish(self, channel: str, payload: bytes, *, idempotency_key: str | None = None) -> Position:
        """See Broker.publish."""
        check_idempotency_key(idempotency_key)
        now = time.monotonic()
        self._sweep(now)
        if idempotency_key is not None:
            self._forget_expired_keys(now)
            seen = self._idempotency.get((channel, idempotency_key))
            if seen is not None:
                return Position(seen[1].offset, seen[1].epoch, duplicate=True)
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(events=deque(maxlen=self._history_size))
        stream.offset += 1
        stream.touched_at = now
        envelope = Envelope(channel=channel, offset=stream.offset, epoch=self._epoch, payload=payload)
        # Into history and state before delivery: anything a subscriber saw can be replayed.
        stream.events.append(envelope)
        change = state_change(payload)
        if change is not None:
            self._apply(stream.state, change, payload)
        if channel in self._subscribed:
            self._on_message(envelope)
        position = Position(stream.offset, self._epoch)
        if idempotency_key is not None:
            self._idempotency[(channel, idempotency_key)] = (now + self._idempotency_window_s, position)
        return position

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def history(self, channel: str, since: Position | None) -> History:
        stream = self._streams.get(channel)
        top = Position(stream.offset if stream else 0, self._epoch)
        if since is None:
            return History(envelopes=[], position=top, recovered=True)
        events = stream.events if stream else deque()
        oldest = events[0].offset if events else top.offset + 1
        first = since.offset + 1
        recovered = since.epoch == self._epoch and oldest <= first <= top.offset + 1
        if not recovered:
            first = oldest  # see Broker.history: everything still held
        # Offsets are contiguous, so the wanted events are found by position, not by a scan.
        return History(envelopes=list(islice(events, first - oldest, None)), position=top, recovered=recovered)

    async def snapshot(self, channel: str) -> Snapshot:
        """See Broker.snapshot."""
        stream = self._streams.get(channel)
        if stream is None:
            return Snapshot(position=Position(0, self._epoch), payloads=[])
        return Snapshot(
            position=Position(stream.offset, self._epoch), payloads=[payload for _, payload in stream.state.values()]
        )

    def _apply(self, state: OrderedDict[str, tuple[str, bytes]], change: StateChange, payload: bytes) -> None:
        stored = state.get(change.id)
        if stored is not None and is_older(change.version, stored[0]):
            return
        if change.delete:
            state.pop(change.id, None)
            return
        state[change.id] = (change.version, payload)
        state.move_to_end(change.id)
        while len(state) > self._state_max_items:
            state.popitem(last=False)

    @property
    def ready(self) -> bool:
        return self._started

    @property
    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._subscribed)

    def _forget_expired_keys(self, now: float) -> None:
        keys = self._idempotency
        while keys:
            oldest = next(iter(keys))
            if keys[oldest][0] > now and len(keys) < MAX_IDEMPOTENCY_KEYS:
                return
            del keys[oldest]

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        stale = [
            name
            for name, s in self._streams.items()
            if now - s.touched_at > self._history_ttl_s and name not in self._subscribed
        ]
        for name in stale:
            del self._streams[name]
