"""Local fan-out: channel → subscriptions on this pod, broker interest by reference count, gap repair."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import orjson

from service import messages as server_messages
from service import metrics, snapshots
from service.broker.base import Broker, BrokerUnavailable, Envelope, History, Position
from service.broker.state import is_older, version_of
from service.frames import text_frame
from service.log import get_logger
from service.presence_events import channel_of
from service.protocol import (
    TRANSACTION_EVENTS,
    EventType,
    Filters,
)

log = get_logger("eva_ws.hub")

_EVENT_TYPES: Final = frozenset(EventType)
_SENT_COUNTERS: Final = {kind.value: metrics.MESSAGES_SENT.labels(kind.value) for kind in EventType}
# Repairs are read in one go; a lag beyond the history window is reported as a resync.
_REPAIR_RETRY_MAX_S: Final = 5.0
# Bounds the resume catch-up loop; reached only if publishing outpaces history reads forever.
_MAX_CATCH_UP_ROUNDS: Final = 50
_MAX_LOGGED_IDS: Final = 100
# Repair reads in a row that end before an offset already seen live before the offset is
# taken for one that history will never hold.
_MAX_LAGGING_READS: Final = 3
# A replay yields to the event loop after this many events, so other clients wait for at
# most one chunk's work (well under a millisecond), however long the replay.
_REPLAY_CHUNK: Final = 64
# Between chunks that are queued for sending, a pause longer than the default write window
# (8 ms), so a chunk is written before the next one is queued.
_REPLAY_PAUSE_S: Final = 0.01
# Parsed replayed events, shared by every resume that reads the same event: a burst of
# resumes from one point decodes and encodes each event once. Bounded: least recently used out.
_REPLAY_CACHE_SIZE: Final = 4096
# Resumes reading history at once on this pod. A reply of a whole history is parsed in one
# go (a few milliseconds from Redis): a flood of resumes waits here instead of making other
# clients wait behind dozens of such replies in one turn of the event loop.
_CONCURRENT_RESUME_READS: Final = 4
# Newest version fanned out per transaction, per channel, so an older one published later is
# not sent after it (the state store ignores it too). Bounded: least recently changed out,
# after which an old version of such a transaction is delivered again.
_VERSIONS_PER_CHANNEL: Final = 1000
_TRANSACTION_EVENTS: Final = frozenset(kind.value for kind in TRANSACTION_EVENTS)


class Recipient(Protocol):
    """What the hub needs from a connection: a non-blocking send of one encoded frame."""

    def enqueue(self, frame: bytes, conflation_key: str | None = None) -> None: ...


class HubUnavailable(Exception):
    """The broker could not take the subscription in time."""


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    # Where the subscription starts: the events after it follow the acknowledgement.
    position: Position
    # None when the client did not ask to resume.
    recovered: bool | None
    replayed: int
    # Events read from history for this subscribe, those the filters dropped included:
    # what the resume cost, charged to the client's rate budget. With a snapshot, also every
    # transaction of the channel's state.
    read: int = 0
    # The `snapshot` messages to send right after the ack, when the subscribe asked for one.
    snapshot: list[bytes] | None = None


class Subscription:
    """One client subscription: a broker channel plus filters finer than the channel."""

    __slots__ = (
        "closed",
        "enqueue",
        "epoch",
        "filtered",
        "filters",
        "key",
        "last_offset",
        "live",
        "presence",
        "recipient",
        "replay_versions",
        "snapshot",
        "transaction_ids",
        "user_id",
    )

    def __init__(self, recipient: Recipient, key: str, filters: Filters, *, filter_in_pod: bool) -> None:
        self.recipient = recipient
        # Bound once: the fan-out calls it for every event.
        self.enqueue = recipient.enqueue
        self.key = key
        self.filters = filters
        # Only transactions carry filters finer than the channel; user channels are exact.
        self.transaction_ids = filters.transaction_ids if filter_in_pod else None
        self.user_id = filters.user_id if filter_in_pod else None
        self.filtered = self.transaction_ids is not None or self.user_id is not None
        self.epoch = ""
        self.last_offset = 0
        # False while the subscription is being set up or replayed: live events skip it.
        self.live = False
        self.closed = False
        # Whether it also gets presence_join / presence_leave of its customer (set once watching).
        self.presence = False
        # Whether it starts from a snapshot, and gets a fresh one with every resync.
        self.snapshot = False
        # While it is replayed: the newest version of each transaction it was sent (or its
        # snapshot showed), so no older one follows in the replay. None once live.
        self.replay_versions: Versions | None = None

    def matches(self, data: dict[str, Any]) -> bool:
        return self.matches_fields(data.get("id"), data.get("userId"), data.get("updatedBy"))

    def matches_fields(self, txn_id: Any, user_id: Any, updated_by: Any) -> bool:
        """`matches` on the fields the filters read, taken from an event once for all its subscribers."""
        if self.transaction_ids is not None and txn_id not in self.transaction_ids:
            return False
        own = self.user_id
        return own is None or user_id == own or updated_by == own


class Versions:
    """The newest version of each transaction sent so far, in offset order; see _VERSIONS_PER_CHANNEL."""

    __slots__ = ("_newest",)

    def __init__(self) -> None:
        self._newest: OrderedDict[str, str] = OrderedDict()

    def is_current(self, txn_id: str | None, version: str, *, delete: bool = False) -> bool:
        """False for a version older than one sent before; remembers a newer one."""
        if txn_id is None or not version:
            return True
        newest = self._newest
        seen = newest.get(txn_id)
        if seen is not None and is_older(version, seen):
            return False
        if delete:
            # Like the state store: once deleted, any version of the transaction is new again.
            newest.pop(txn_id, None)
            return True
        newest[txn_id] = version
        if seen is not None:
            newest.move_to_end(txn_id)
        elif len(newest) > _VERSIONS_PER_CHANNEL:
            newest.popitem(last=False)  # a new transaction came in last: the least recently changed goes
        return True

    def accepts(self, decoded: _Decoded) -> bool:
        return self.is_current(decoded.txn_id, decoded.version, delete=decoded.kind == EventType.TRANSACTION_DELETE)


@dataclass(slots=True)
class _Decoded:
    envelope: Envelope
    kind: str
    data: dict[str, Any]
    timestamp: str
    correlation_id: Any
    conflation_key: str | None
    # A transaction event's id and version (see broker/state.py), for `_ChannelState.is_current`.
    txn_id: str | None = None
    version: str = ""
    # The wire frame every recipient gets: built once, when the first recipient wants it.
    _frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = text_frame(
                server_messages.event(self.envelope, self.kind, self.data, self.timestamp, self.correlation_id)
            )
        return self._frame


class _SentEvents:
    """Events queued to clients by type, added to `eva_ws_messages_sent_total` once per loop turn.

    Counter.inc takes a lock on every call, and with one or two recipients per event that
    was a twentieth of a pod's ingest CPU; a dict of ints per turn costs a fraction of it.
    A scrape sees every event queued in the loop turns before its own.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}

    def add(self, kind: str, count: int) -> None:
        pending = self._pending
        if not pending:
            asyncio.get_running_loop().call_soon(self.flush)
        pending[kind] = pending.get(kind, 0) + count

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for kind, count in pending.items():
            _SENT_COUNTERS[kind].inc(count)


class _ChannelState:
    __slots__ = (
        "catch_up",
        "epoch",
        "key",
        "last_offset",
        "max_seen",
        "presence_watchers",
        "repair",
        "setup",
        "subs",
        "versions",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        self.subs: list[Subscription] = []
        self.epoch = ""
        self.last_offset = 0
        # Highest offset seen live while not in order; the repair reads up to it from history.
        self.max_seen = 0
        self.setup: asyncio.Future[None] | None = None
        self.repair: asyncio.Task[None] | None = None
        # Set after a broker reconnect: read history once even without a visible gap.
        self.catch_up = False
        # Subscriptions with presence; the pod listens to the customer's announcements while any.
        self.presence_watchers = 0
        # The newest version of each transaction sent live on this channel.
        self.versions = Versions()

    @property
    def in_sync(self) -> bool:
        return self.setup is not None and self.setup.done() and self.repair is None


class Hub:
    """Delivers broker events to local subscriptions, exactly once and in offset order.

    Live events arrive in order; any gap, epoch change or broker reconnect is healed
    from the broker's history. A subscriber whose position is lost (history too short,
    or reset) is told so, with a `resync` message or `recovered: false` on its ack, at
    the position just before the oldest event history still holds; those events follow.
    """

    def __init__(self, broker: Broker, *, subscribe_timeout_s: float = 5.0) -> None:
        self._broker = broker
        self._subscribe_timeout_s = subscribe_timeout_s
        self._channels: dict[str, _ChannelState] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._resume_reads = asyncio.Semaphore(_CONCURRENT_RESUME_READS)
        # The snapshot read in flight per channel: everyone who asks meanwhile shares it.
        self._snapshot_reads: dict[str, asyncio.Future[snapshots.DecodedSnapshot]] = {}
        # Keyed by the whole envelope's identity (payload too): an offset reused after a
        # failover to a replica that missed writes cannot serve another event's frame.
        self._replay_cache: OrderedDict[tuple[str, str, int, bytes], _Decoded | None] = OrderedDict()
        # Broker channels between pods (not client streams): their payloads go to a handler as they are.
        self._pod_channels: dict[str, Callable[[bytes], None]] = {}
        # Called when such a channel's subscription was lost and regained: its live payloads in between are gone.
        self._pod_channel_regained: dict[str, Callable[[], None]] = {}
        self._sent = _SentEvents()
        broker.set_handlers(on_message=self.on_message, on_resubscribed=self.on_resubscribed)

    @property
    def channels(self) -> frozenset[str]:
        """Channels with at least one local subscription: what this pod wants from the broker."""
        return frozenset(self._channels)

    def subscriber_counts(self) -> dict[str, int]:
        """Local subscriptions per channel, for operators."""
        return {key: len(state.subs) for key, state in self._channels.items()}

    def subscriptions(self) -> list[Subscription]:
        """Every local subscription, for operators: O(subscriptions on this pod)."""
        return [sub for state in self._channels.values() for sub in state.subs]

    async def _watch_presence(self, state: _ChannelState) -> None:
        state.presence_watchers += 1
        if state.presence_watchers > 1:
            return
        key = state.key
        try:
            await self.listen(channel_of(key.partition(":")[2]), lambda payload: self._on_presence(key, payload))
        except BaseException:
            state.presence_watchers -= 1
            raise

    async def _unwatch_presence(self, state: _ChannelState) -> None:
        state.presence_watchers -= 1
        if not state.presence_watchers:
            await self.unlisten(channel_of(state.key.partition(":")[2]))

    def _on_presence(self, key: str, payload: bytes) -> None:
        state = self._channels.get(key)
        if state is None:
            return
        frame = text_frame(payload)  # announced as its subscribers get it: one frame for all
        for sub in state.subs:
            if sub.presence and sub.live:
                sub.recipient.enqueue(frame)

    def listens(self, key: str) -> bool:
        """Whether a pod-to-pod channel is delivered here (see `listen`)."""
        return key in self._pod_channels

    async def unlisten(self, key: str) -> None:
        """Stop delivering a pod-to-pod channel (see `listen`); unknown keys are ignored."""
        if self._pod_channels.pop(key, None) is None:
            return
        self._pod_channel_regained.pop(key, None)
        with contextlib.suppress(BrokerUnavailable):
            # The broker keeps its own wanted set and drops the channel on reconnect anyway.
            await self._broker.unsubscribe(key)

    async def listen(
        self, key: str, handler: Callable[[bytes], None], *, on_regained: Callable[[], None] | None = None
    ) -> None:
        """Deliver every live payload of a pod-to-pod channel to `handler`: no history, no repair.

        Raises BrokerUnavailable if the broker cannot take the subscription now; once taken,
        the broker keeps it across reconnects, and calls `on_regained` (if any) after each.
        """
        self._pod_channels[key] = handler
        if on_regained is not None:
            self._pod_channel_regained[key] = on_regained
        try:
            await self._broker.subscribe(key)
        except BaseException:
            del self._pod_channels[key]
            self._pod_channel_regained.pop(key, None)
            raise

    async def subscribe(
        self,
        recipient: Recipient,
        key: str,
        filters: Filters,
        *,
        since: Position | None,
        on_ready: Callable[[Subscription, SubscribeResult], None],
        presence: bool = False,
        snapshot: bool = False,
    ) -> Subscription:
        """Join a channel; `on_ready` runs (to send the ack) before any replayed event is queued.

        `presence` (a customer's transactions only): also deliver presence_join / presence_leave
        (service/presence_events.py), from the ack on. `snapshot`: start from the channel's
        state (SubscribeResult.snapshot) instead of the current position, or of `since` when
        that cannot be resumed; the events after the snapshot's position follow.
        """
        state = self._channels.get(key)
        if state is None:
            state = self._channels[key] = _ChannelState(key)
            metrics.HUB_CHANNELS.set(len(self._channels))
        # The channel's own key: the subscribers of a channel share one string.
        key = state.key
        sub = Subscription(recipient, key, filters, filter_in_pod=key.startswith("transactions:"))
        sub.snapshot = snapshot
        state.subs.append(sub)
        metrics.HUB_SUBSCRIPTIONS.inc()
        try:
            if state.setup is None or (state.setup.done() and state.setup.exception() is not None):
                state.setup = asyncio.ensure_future(self._open_channel(key, state))
            if state.setup.done():
                state.setup.result()  # the channel is open already: no timer, no shield
            else:
                await asyncio.wait_for(asyncio.shield(state.setup), self._subscribe_timeout_s)
            if presence:
                await asyncio.wait_for(self._watch_presence(state), self._subscribe_timeout_s)
                sub.presence = True
            result = await self._join(state, sub, since)
        except (BrokerUnavailable, TimeoutError) as exc:
            await self.unsubscribe(sub)
            raise HubUnavailable(str(exc) or "broker did not confirm the subscription in time") from None
        except BaseException:
            await self.unsubscribe(sub)
            raise
        on_ready(sub, result)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        if sub.closed:
            return
        sub.closed = True
        state = self._channels.get(sub.key)
        if state is None:
            return
        state.subs.remove(sub)
        metrics.HUB_SUBSCRIPTIONS.dec()
        if sub.presence:
            await self._unwatch_presence(state)
        if not state.subs:
            del self._channels[sub.key]
            metrics.HUB_CHANNELS.set(len(self._channels))
            for pending in (state.setup, state.repair):
                if pending is not None and not pending.done():
                    pending.cancel()
            with contextlib.suppress(BrokerUnavailable):
                # The broker keeps its own wanted set and drops the channel on reconnect anyway.
                await self._broker.unsubscribe(sub.key)

    async def close(self) -> None:
        self._sent.flush()
        for task in list(self._tasks):
            task.cancel()
        for state in self._channels.values():
            for pending in (state.setup, state.repair):
                if pending is not None:
                    pending.cancel()
        self._channels.clear()

    # -- broker callbacks ------------------------------------------------------------

    def on_message(self, envelope: Envelope) -> None:
        state = self._channels.get(envelope.channel)
        if state is None:
            handler = self._pod_channels.get(envelope.channel)
            if handler is not None:
                handler(envelope.payload)
            return
        if not state.in_sync:
            # Setting up or repairing: history will hold this event; just remember how far to read.
            if state.epoch and envelope.epoch != state.epoch:
                state.catch_up = True  # its offset says nothing about this epoch's stream
            else:
                state.max_seen = max(state.max_seen, envelope.offset)
            return
        if envelope.epoch != state.epoch:
            # History was reset (e.g. Redis restarted empty): the repair resyncs subscribers.
            state.catch_up = True
            self._start_repair(envelope.channel, state)
            return
        if envelope.offset > state.last_offset + 1:
            state.max_seen = max(state.max_seen, envelope.offset)
            self._start_repair(envelope.channel, state)
            return
        if envelope.offset <= state.last_offset:
            return  # already delivered (e.g. during a repair)
        self._fan_out(state, envelope, live=True)

    def on_resubscribed(self, channels: list[str]) -> None:
        for key in channels:
            regained = self._pod_channel_regained.get(key)
            if regained is not None:
                regained()
            state = self._channels.get(key)
            if state is not None and state.setup is not None and state.setup.done():
                state.catch_up = True
                self._start_repair(key, state)

    # -- internals -------------------------------------------------------------------

    async def _open_channel(self, key: str, state: _ChannelState) -> None:
        await self._broker.subscribe(key)
        # Subscribe first, then read the position: nothing published after it can be missed.
        top = (await self._broker.history(key, None)).position
        state.epoch, state.last_offset = top.epoch, top.offset
        if state.max_seen > state.last_offset:
            self._start_repair(key, state)

    async def _join(self, state: _ChannelState, sub: Subscription, since: Position | None) -> SubscribeResult:
        if since is None and sub.snapshot:
            return await self._join_from_snapshot(state, sub, recovered=None, read=0)
        if since is None:
            sub.epoch, sub.last_offset, sub.live = state.epoch, state.last_offset, True
            return SubscribeResult(Position(state.last_offset, state.epoch), None, 0)

        async with self._resume_reads:
            history = await self._broker.history(sub.key, since)
            if sub.snapshot and not history.recovered:
                metrics.RESUMES.labels("unrecovered").inc()
                return await self._join_from_snapshot(state, sub, recovered=False, read=len(history.envelopes))
            # Lost or not, the subscription starts where the replay starts: right after `since`,
            # or before the oldest event history still holds.
            start = since if history.recovered else _replay_start(history)
            sub.epoch, sub.last_offset = start.epoch, start.offset
            replay = await self._replay_frames(sub, history.envelopes)
        metrics.RESUMES.labels("recovered" if history.recovered else "unrecovered").inc()
        result = SubscribeResult(start, history.recovered, len(replay), read=len(history.envelopes))
        # The ack must precede the replayed events, so they are queued by `_finish_resume`.
        task = asyncio.ensure_future(self._finish_resume(state, sub, replay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return result

    async def read_snapshot(self, key: str) -> snapshots.DecodedSnapshot:
        """The channel's state and its position; one broker read serves everyone who asks meanwhile.

        Raises BrokerUnavailable."""
        reading = self._snapshot_reads.get(key)
        if reading is None:
            reading = self._snapshot_reads[key] = asyncio.ensure_future(self._read_snapshot(key))
            reading.add_done_callback(lambda _: self._snapshot_reads.pop(key, None))
        # Shielded: one asker giving up (a closed socket) must not cancel the read for the others.
        return await asyncio.shield(reading)

    async def _read_snapshot(self, key: str) -> snapshots.DecodedSnapshot:
        return snapshots.decode(await self._broker.snapshot(key))

    async def _join_from_snapshot(
        self, state: _ChannelState, sub: Subscription, *, recovered: bool | None, read: int
    ) -> SubscribeResult:
        snapshot = await self.read_snapshot(sub.key)
        _start_from(sub, snapshot)
        messages = snapshots.messages(sub.key, snapshot.position, snapshots.matching(snapshot, sub.matches))
        # The ack and these messages come first: the catch-up after the snapshot's position is queued after them.
        self._spawn(self._finish_resume(state, sub, []))
        read += len(snapshot.transactions)
        return SubscribeResult(snapshot.position, recovered, 0, read=read, snapshot=messages)

    async def _resnapshot(self, sub: Subscription) -> None:
        """A snapshot subscriber lost its position: a resync at a fresh snapshot, the snapshot, then what follows."""
        delay_s = 0.1
        while not sub.closed:
            try:
                snapshot = await self.read_snapshot(sub.key)
                break
            except BrokerUnavailable:
                await asyncio.sleep(random.uniform(0, delay_s))
                delay_s = min(delay_s * 2, _REPAIR_RETRY_MAX_S)
        else:
            return
        state = self._channels.get(sub.key)
        if state is None or sub.closed:
            return
        self._send_resync(sub, snapshot.position)
        _start_from(sub, snapshot)
        messages = snapshots.messages(sub.key, snapshot.position, snapshots.matching(snapshot, sub.matches))
        for message in messages:
            sub.recipient.enqueue(text_frame(message))
        metrics.MESSAGES_SENT.labels("snapshot").inc(len(messages))
        await self._finish_resume(state, sub, [])

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_resume(self, state: _ChannelState, sub: Subscription, replay: list[_Decoded]) -> None:
        await asyncio.sleep(0)  # let the caller queue the ack first
        await self._enqueue_replay(sub, replay)
        for _ in range(_MAX_CATCH_UP_ROUNDS):
            if sub.closed:
                return
            if sub.epoch == state.epoch and sub.last_offset >= state.last_offset:
                sub.live = True  # no await between the check and going live: no gap
                sub.replay_versions = None
                return
            try:
                history = await self._broker.history(sub.key, Position(sub.last_offset, sub.epoch))
            except BrokerUnavailable:
                await asyncio.sleep(random.uniform(0.1, 1.0))
                continue
            if not history.recovered:
                self._resync(sub, _replay_start(history))
                if sub.snapshot:
                    return  # a fresh snapshot follows; see _resync
            await self._enqueue_replay(sub, await self._replay_frames(sub, history.envelopes))
            if history.position.epoch != state.epoch and not sub.closed:
                # The channel has not seen the new epoch yet: its repair moves it there and
                # sends this subscriber only what follows what it just got.
                state.catch_up = True
                self._start_repair(sub.key, state)
                sub.live = True
                sub.replay_versions = None
                return
        if not sub.closed:
            self._resync(sub, Position(state.last_offset, state.epoch))
            sub.live = not sub.snapshot

    async def _replay_frames(self, sub: Subscription, envelopes: list[Envelope]) -> list[_Decoded]:
        """The events after the subscription's position that its filters let through, not yet encoded."""
        frames: list[_Decoded] = []
        for index, envelope in enumerate(envelopes):
            if index and not index % _REPLAY_CHUNK:
                await asyncio.sleep(0)
            if envelope.offset <= sub.last_offset:
                continue
            sub.last_offset = envelope.offset
            decoded = self._decode_replayed(envelope)
            if sub.replay_versions is None:
                sub.replay_versions = Versions()
            if decoded is None or not sub.replay_versions.accepts(decoded):
                continue
            if sub.matches(decoded.data):
                frames.append(decoded)
        return frames

    async def _enqueue_replay(self, sub: Subscription, replay: list[_Decoded]) -> None:
        for index, decoded in enumerate(replay):
            if index and not index % _REPLAY_CHUNK:
                # Room for the write window to send what is queued: a replay longer than the
                # send queue must not close its own client as a slow consumer.
                await asyncio.sleep(_REPLAY_PAUSE_S)
                if sub.closed:
                    return
            sub.recipient.enqueue(decoded.frame, decoded.conflation_key)
        metrics.EVENTS_REPLAYED.inc(len(replay))

    def _decode_replayed(self, envelope: Envelope) -> _Decoded | None:
        cache = self._replay_cache
        key = (envelope.channel, envelope.epoch, envelope.offset, envelope.payload)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        decoded = cache[key] = _decode(envelope)
        if len(cache) > _REPLAY_CACHE_SIZE:
            cache.popitem(last=False)
        return decoded

    def _fan_out(self, state: _ChannelState, envelope: Envelope, *, live: bool) -> _Decoded | None:
        state.last_offset = envelope.offset
        decoded = _decode(envelope, measure_lag=live)
        if decoded is None:
            return None
        if not state.versions.accepts(decoded):
            return None  # older than a version this channel sent: superseded, like a conflated update
        # The hot loop: per recipient a few attribute reads and one non-blocking enqueue.
        offset, key = envelope.offset, decoded.conflation_key
        frame = b""  # encoded for the first recipient the filters let through
        # What the filters read, taken from the event for the first filtered subscriber.
        fields: tuple[Any, Any, Any] | None = None
        sent = 0
        for sub in state.subs:
            if sub.live and offset > sub.last_offset:
                sub.last_offset = offset
                if sub.filtered:
                    if fields is None:
                        data = decoded.data
                        fields = (data.get("id"), data.get("userId"), data.get("updatedBy"))
                    if not sub.matches_fields(*fields):
                        continue
                if not frame:
                    frame = decoded.frame
                sub.enqueue(frame, key)
                sent += 1
        if sent:
            self._sent.add(decoded.kind, sent)
            if not live:
                metrics.EVENTS_REPLAYED.inc(sent)
        return decoded

    def _start_repair(self, key: str, state: _ChannelState) -> None:
        if state.repair is None:
            state.repair = asyncio.ensure_future(self._repair(key, state))

    async def _repair(self, key: str, state: _ChannelState) -> None:
        delay_s = 0.1
        lagging_reads = 0
        try:
            while state.catch_up or state.max_seen > state.last_offset:
                state.catch_up = False
                try:
                    history = await self._broker.history(key, Position(state.last_offset, state.epoch))
                except BrokerUnavailable:
                    state.catch_up = True
                    await asyncio.sleep(random.uniform(0, delay_s))
                    delay_s = min(delay_s * 2, _REPAIR_RETRY_MAX_S)
                    continue
                if not history.recovered:
                    # The subscribers restart before the oldest event history still holds,
                    # and those events follow the resync like any repaired ones.
                    start = _replay_start(history)
                    log.warning(
                        "channel_resync",
                        channel=key,
                        lost_after=state.last_offset,
                        epoch=start.epoch,
                        replay_from=start.offset,
                    )
                    state.epoch, state.last_offset = start.epoch, start.offset
                    state.max_seen = min(state.max_seen, history.position.offset)
                    for sub in state.subs:
                        # A subscriber that resumed into this epoch already is not lost.
                        if sub.live and (sub.epoch != start.epoch or sub.last_offset < start.offset):
                            self._resync(sub, start)
                replayed: list[str] = []
                for index, envelope in enumerate(history.envelopes):
                    if index and not index % _REPLAY_CHUNK:
                        await asyncio.sleep(_REPLAY_PAUSE_S)  # see _enqueue_replay
                    if envelope.offset > state.last_offset:
                        decoded = self._fan_out(state, envelope, live=False)
                        if decoded is not None:
                            replayed.append(str(decoded.correlation_id))
                if replayed:
                    # Which events reached clients late, so they can be traced across pods.
                    log.info(
                        "channel_repaired",
                        channel=key,
                        up_to=state.last_offset,
                        count=len(replayed),
                        correlation_ids=replayed[:_MAX_LOGGED_IDS],
                    )
                if state.max_seen <= history.position.offset:
                    lagging_reads = 0
                elif (lagging_reads := lagging_reads + 1) >= _MAX_LAGGING_READS:
                    # Live offsets that history never holds (a publisher out of step): give up on them.
                    state.max_seen = history.position.offset
                # Otherwise a live event came after this read was sent: the loop reads again.
        finally:
            state.repair = None

    def _resync(self, sub: Subscription, position: Position) -> None:
        """Tell a subscriber its position is lost; it restarts at `position`, or, if it asked for
        snapshots, at a fresh snapshot (sent with the resync, the events after it follow)."""
        metrics.RESUMES.labels("unrecovered").inc()
        if sub.snapshot:
            sub.live = False  # until the snapshot is sent and caught up with
            self._spawn(self._resnapshot(sub))
            return
        self._send_resync(sub, position)

    def _send_resync(self, sub: Subscription, position: Position) -> None:
        sub.epoch, sub.last_offset = position.epoch, position.offset
        sub.recipient.enqueue(text_frame(server_messages.resync(sub.key, position)))


def _start_from(sub: Subscription, snapshot: snapshots.DecodedSnapshot) -> None:
    """The subscription continues after the snapshot: no older version than it shows may follow it."""
    sub.epoch, sub.last_offset = snapshot.position.epoch, snapshot.position.offset
    sub.replay_versions = versions = Versions()
    for transaction in snapshot.transactions:
        versions.is_current(transaction.data.get("id"), version_of(transaction.data))


def _replay_start(history: History) -> Position:
    """Where a lost subscriber restarts: just before the oldest event history still holds."""
    if history.envelopes:
        first = history.envelopes[0]
        return Position(first.offset - 1, first.epoch)
    return history.position


def _decode(envelope: Envelope, *, measure_lag: bool = False) -> _Decoded | None:
    """Parse a published event once per pod; the frame every recipient gets is built on first use."""
    try:
        event = orjson.loads(envelope.payload)
        kind, data = event["type"], event["data"]
        timestamp, correlation_id = event["timestamp"], event["correlationId"]
        if kind not in _EVENT_TYPES or not isinstance(data, dict) or not isinstance(timestamp, str):
            raise ValueError(kind)
        if measure_lag:
            published = datetime.fromisoformat(timestamp).timestamp()
            metrics.DELIVERY_LAG.observe(max(0.0, time.time() - published))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        metrics.BROKER_INVALID_MESSAGES.inc()
        log.warning("invalid_event_dropped", channel=envelope.channel, offset=envelope.offset)
        return None
    txn_id = data.get("id")
    # The channel's length first, so no channel and id can read as another pair (ids may
    # hold "|" and ":"); repr tells 5 from "5". An update without an id supersedes nothing.
    conflation_key = (
        f"{len(envelope.channel)}:{envelope.channel}{txn_id!r}"
        if kind == EventType.TRANSACTION_UPDATE and txn_id is not None
        else None
    )
    return _Decoded(
        envelope=envelope,
        kind=kind,
        data=data,
        timestamp=timestamp,
        correlation_id=correlation_id,
        conflation_key=conflation_key,
        txn_id=txn_id if kind in _TRANSACTION_EVENTS and isinstance(txn_id, str) else None,
        version=version_of(data) if kind in _TRANSACTION_EVENTS else "",
    )
