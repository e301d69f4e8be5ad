"""One Redis node's PUB/SUB connection, owned by one task: classic on one Redis, sharded on a Redis Cluster master."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from redis.crc import key_slot
from redis.exceptions import RedisError

from service import metrics, redis_keys
from service.broker import redis_wire as wire
from service.broker.base import Envelope
from service.broker.redis_pubsub_connection import Endpoint, PubSubConnection, encode_command
from service.redis_client import Address, cancel_and_wait

log = structlog.get_logger("eva_ws.broker")

# One SUBSCRIBE/UNSUBSCRIBE command carries at most this many channels, so a pod that
# resubscribes thousands of channels after a reconnect sends a few large commands
# instead of one per channel, without building a single multi-megabyte request.
SUBSCRIBE_BATCH_MAX: Final = 500


class SilentConnection(Exception):
    """The connection stopped answering PINGs: rebuild it."""


@dataclass(frozen=True, slots=True)
class PubSubKind:
    """The PUB/SUB flavour of a topology: its commands and the kinds of its replies."""

    sharded: bool
    # The commands' names are also the kinds of their confirmations.
    message: bytes
    subscribed: bytes
    unsubscribed: bytes
    # Log events of the connection's life (the names operators know for each topology).
    connected_event: str
    disconnected_event: str


CLASSIC: Final = PubSubKind(False, b"message", b"subscribe", b"unsubscribe", "broker_connected", "broker_disconnected")
"""One Redis: SUBSCRIBE/PUBLISH on `pubsub_channel` names."""

SHARDED: Final = PubSubKind(
    True, b"smessage", b"ssubscribe", b"sunsubscribe", "broker_shard_connected", "broker_shard_disconnected"
)
"""Redis Cluster: SSUBSCRIBE/SPUBLISH on `shard_channel` names, served by the master of their slot."""


class ShardLink:
    """Live delivery for the channels one node serves (a cluster master's slots, or all of one Redis).

    The Subscriber decides which channels belong here (`assign`, `drop`); the link's owner
    task does all I/O: (S)SUBSCRIBE/(S)UNSUBSCRIBE of the difference in batches (on a
    cluster one command per slot, as Redis refuses shard channels of several slots in
    one), PINGs to detect a silent node, and reconnects with capped, jittered backoff. It
    reports confirmations, losses and the need for a fresh slot map through callbacks.
    """

    def __init__(
        self,
        *,
        address: Address,
        endpoint: Endpoint,
        kind: PubSubKind,
        prefix: str,
        pod_id: str,
        on_envelope: Callable[[Envelope], None],
        on_confirmed: Callable[[ShardLink, str], None],
        on_recovered: Callable[[list[str]], None],
        on_topology_doubt: Callable[[], None],
        ping_interval_s: float,
        pong_timeout_s: float,
        subscribe_timeout_s: float,
        reconnect_min_s: float,
        reconnect_max_s: float,
        canary_channel: str = "",
        on_canary: Callable[[bytes], None] = lambda data: None,
    ) -> None:
        """`endpoint`: how to connect to the node at `address`. `on_canary` gets every message
        of `canary_channel` (a channel assigned like any other), undecoded: the canary is not
        an event."""
        self.address = address
        self._endpoint = endpoint
        self._kind = kind
        self._name = redis_keys.shard_channel if kind.sharded else redis_keys.pubsub_channel
        self._prefix = prefix
        self._pod_id = pod_id
        self._on_envelope = on_envelope
        self._on_confirmed = on_confirmed
        self._on_recovered = on_recovered
        self._on_topology_doubt = on_topology_doubt
        self._ping_interval_s = ping_interval_s
        self._pong_timeout_s = pong_timeout_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._canary_channel = canary_channel
        self._on_canary = on_canary

        # What this link should deliver, changed by the coordinator through assign and drop.
        self.wanted: set[str] = set()
        self._notice: set[str] = set()  # confirm these, then report them as resubscribed
        self._displaced: set[str] = set()  # the node dropped them (slot moved): wait for a new slot map
        self._by_name: dict[bytes, str] = {}  # shard channel name -> broker channel
        # What the node has, written only by the owner task.
        self._server: set[str] = set()  # what the node will have once every sent command is applied
        self._unsubscribing: dict[str, int] = {}  # SUNSUBSCRIBEs sent and not yet confirmed, per channel
        self.actual: set[str] = set()  # what the node confirmed on the current connection
        # Assigned channels not confirmed yet, with when they were assigned.
        self._unconfirmed_since: dict[str, float] = {}
        # The current connection had every assigned channel confirmed at least once.
        self._reached = False
        self.connected = False
        # Connections lost so far and when the last one was: readiness reporting sees a
        # reconnect even when it was over before anyone looked.
        self.disconnects = 0
        self.disconnected_at = 0.0
        self._ping_sent_at: float | None = None
        self._next_ping = 0.0
        self._ping_token = f"eva-ws-watchdog:{pod_id}".encode()
        # Set when the owner task has work: the assignment changed (_dirty), a reply arrived
        # (_changed), or the connection was lost. Events are delivered without it.
        self._attention = asyncio.Event()
        self._dirty = False
        self._changed = False
        self._owner: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        host, port = self.address
        self._owner = asyncio.create_task(self._run(), name=f"redis-shard-link-{host}:{port}")

    async def close(self) -> None:
        """Stop the owner task and release the connection; idempotent."""
        self._closed = True
        if self._owner is not None:
            await cancel_and_wait(self._owner)
            self._owner = None
        self.connected = False

    @property
    def answering(self) -> bool:
        """Connected, and the last PING answered in time."""
        return self.connected and not self._pong_late()

    @property
    def pending(self) -> bool:
        """Assigned channels are missing on the node: the current connection has not yet
        subscribed everything, a channel's slot moved away, or a new channel waits longer
        than `subscribe_timeout_s`.

        A channel that a client has just asked for is not pending yet: every subscribe
        takes a round trip, and readiness must not flap with client traffic.
        """
        if not self._reached or self._displaced:
            return True
        horizon = time.monotonic() - self._subscribe_timeout_s
        return any(since < horizon for since in self._unconfirmed_since.values())

    @property
    def _complete(self) -> bool:
        return self.wanted <= self.actual and self.wanted <= self._server

    def assign(self, channel: str, *, notice: bool) -> None:
        """Make this link deliver `channel`; with `notice`, report it as resubscribed once confirmed."""
        self.wanted.add(channel)
        self._displaced.discard(channel)
        if not self.confirmed(channel):
            self._unconfirmed_since.setdefault(channel, time.monotonic())
        self._by_name[self._name(self._prefix, channel).encode()] = channel
        if notice:
            self._notice.add(channel)
        self._wake()

    def confirmed(self, channel: str) -> bool:
        """The node confirmed the channel on the current connection and no SUNSUBSCRIBE is on its way."""
        return self.connected and channel in self.actual and channel in self._server

    @property
    def has_displaced(self) -> bool:
        return bool(self._displaced)

    def displaced(self, channel: str) -> bool:
        """The node gave the channel's slot away and this link waits to be told where it went."""
        return channel in self._displaced

    def drop(self, channel: str) -> None:
        self.wanted.discard(channel)
        self._notice.discard(channel)
        self._displaced.discard(channel)
        self._unconfirmed_since.pop(channel, None)
        if channel not in self._server and channel not in self._unsubscribing:
            self._by_name.pop(self._name(self._prefix, channel).encode(), None)
        self._wake()

    def _wake(self) -> None:
        self._dirty = True
        # Cuts the owner's current wait short so it applies the change now.
        self._attention.set()

    def _pong_late(self) -> bool:
        return self._ping_sent_at is not None and time.monotonic() - self._ping_sent_at > self._pong_timeout_s

    # -- the owner task ------------------------------------------------------------------

    async def _run(self) -> None:
        """Keep one connection to this master alive until closed: connect, serve, back off, repeat."""
        attempt = 0
        connections = 0
        while not self._closed:
            connection = PubSubConnection(
                self._endpoint,
                message_kind=self._kind.message,
                on_message=self._deliver,
                on_reply=self._on_reply,
                on_lost=self._attention.set,
            )
            connected = False
            reached = False
            try:
                await connection.open()
                metrics.BROKER_CONNECTS.labels(outcome="ok").inc()
                connections += 1
                connected = True
                log.info(self._kind.connected_event, pod_id=self._pod_id, node=_node(self.address))
                if connections > 1:
                    self._notice |= self.wanted
                await self._serve(connection)
            except (RedisError, OSError, TimeoutError, SilentConnection) as exc:
                if not connected:
                    metrics.BROKER_CONNECTS.labels(outcome="failed").inc()
                log.warning(
                    self._kind.disconnected_event,
                    pod_id=self._pod_id,
                    node=_node(self.address),
                    error=type(exc).__name__,
                    detail=str(exc),
                )
            except Exception:  # the loop must outlive any bug, or the pod goes deaf for good
                log.exception("broker_shard_link_failed", pod_id=self._pod_id, node=_node(self.address))
            finally:
                if connected:
                    self.disconnects += 1
                    self.disconnected_at = time.monotonic()
                reached = self._reached
                self.connected = False
                self._reached = False
                self._server.clear()
                self._unsubscribing.clear()
                self.actual.clear()
                self._ping_sent_at = None
                # Cannot hang on a half-open socket: it does not wait for the peer.
                connection.close()
            # A failover or a resharding often shows up first as a lost connection or a refusal.
            self._on_topology_doubt()
            # Reset only after a connection that got fully subscribed, so a connection that
            # fails right after connecting (e.g. SUBSCRIBE refused) still backs off.
            attempt = 0 if reached else attempt + 1
            await asyncio.sleep(self._backoff_s(attempt))

    def _backoff_s(self, attempt: int) -> float:
        # Equal jitter: never zero (no hot loop), never synchronised across pods.
        cap = min(self._reconnect_max_s, self._reconnect_min_s * (1 << min(attempt, 30)))
        return cap / 2 + random.uniform(0, cap / 2)

    async def _serve(self, connection: PubSubConnection) -> None:
        """Serve one connection until it fails.

        Events and replies are handled as they are read (`_deliver`, `_on_reply`); this task
        sends what the assignment and the watchdog need and waits for work in between.
        """
        self._next_ping = time.monotonic()
        self.connected = True
        self._dirty = True  # a new connection has no subscriptions yet
        self._changed = True
        while not self._closed:
            connection.raise_if_lost()
            if self._dirty:
                self._dirty = False
                await self._reconcile(connection)
                self._changed = True
            now = time.monotonic()
            if self._ping_sent_at is None and now >= self._next_ping:
                self._ping_sent_at = now
                connection.send(encode_command(b"PING", self._ping_token))
                await connection.drain()
            if self._pong_late():
                raise SilentConnection(f"no PONG within {self._pong_timeout_s}s")
            # Set comparisons cost O(channels): only after something that can change them,
            # never per delivered event.
            if self._changed:
                self._changed = False
                self._reached = self._reached or self._complete
                self._report_recovered()
            if self._dirty:
                continue  # changed while we were sending: reconcile before blocking
            wait_s = (
                self._ping_sent_at + self._pong_timeout_s if self._ping_sent_at is not None else self._next_ping
            ) - now
            self._attention.clear()
            if self._dirty or self._changed or connection.failure is not None:
                continue
            try:
                async with asyncio.timeout(max(0.001, wait_s)):
                    await self._attention.wait()
            except TimeoutError:
                pass  # time for the next PING, or for its PONG to be late

    def _on_reply(self, reply: Any) -> None:
        """A reply other than an event, as it is read: a (S)SUBSCRIBE or (S)UNSUBSCRIBE confirmation, a PONG."""
        if type(reply) is bytes:
            pong: Any = reply  # PING outside subscribed mode answers with its argument alone
        elif type(reply) is list and len(reply) >= 2:
            if reply[0] != b"pong":
                self._confirm(reply[0], reply[1])
                self._changed = True
                self._attention.set()
                return
            pong = reply[1]
        else:
            return  # nothing this link asked for
        if pong == self._ping_token:
            self._ping_sent_at = None
            self._next_ping = time.monotonic() + self._ping_interval_s
            self._changed = True
            self._attention.set()

    async def _reconcile(self, connection: PubSubConnection) -> None:
        """Send the difference between the assigned channels and what the node will have, batched."""
        to_unsubscribe = self._server - self.wanted
        to_subscribe = self.wanted - self._server - self._displaced
        kind = self._kind
        # The state is updated before the write: the confirmations may be read as soon as
        # this task yields.
        for channels in self._batches(to_unsubscribe):
            self._server.difference_update(channels)
            # Not live from now on: a SUBSCRIBE sent next is confirmed only after the node applied it.
            self.actual.difference_update(channels)
            for channel in channels:
                self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
            connection.send(encode_command(kind.unsubscribed, *(self._name(self._prefix, c) for c in channels)))
        for channels in self._batches(to_subscribe):
            self._server.update(channels)
            connection.send(encode_command(kind.subscribed, *(self._name(self._prefix, c) for c in channels)))
        await connection.drain()

    def _batches(self, channels: set[str]) -> list[list[str]]:
        """Channels in batches of SUBSCRIBE_BATCH_MAX; on a cluster, each batch of one hash slot
        (one SSUBSCRIBE may only name channels of one slot)."""
        groups: defaultdict[int, list[str]] = defaultdict(list)
        for channel in sorted(channels):
            slot = key_slot(self._name(self._prefix, channel).encode()) if self._kind.sharded else 0
            groups[slot].append(channel)
        return [
            group[start : start + SUBSCRIBE_BATCH_MAX]
            for group in groups.values()
            for start in range(0, len(group), SUBSCRIBE_BATCH_MAX)
        ]

    def _confirm(self, kind: bytes, name: bytes | None) -> None:
        channel = self._by_name.get(name) if name is not None else None
        if channel is None:
            return
        if kind == self._kind.subscribed:
            if channel in self._unsubscribing:
                return  # of a SUBSCRIBE sent before an UNSUBSCRIBE the node has yet to apply
            self.actual.add(channel)
            self._unconfirmed_since.pop(channel, None)
            if channel in self.wanted and channel in self._server:
                self._on_confirmed(self, channel)
        elif kind == self._kind.unsubscribed:
            self.actual.discard(channel)
            pending = self._unsubscribing.get(channel, 0)
            if pending > 1:
                self._unsubscribing[channel] = pending - 1
            elif pending == 1:
                del self._unsubscribing[channel]  # the confirmation of our own SUNSUBSCRIBE
            elif channel in self._server and channel in self.wanted:
                # Not asked for: the node gave the slot away. Wait for the new owner.
                self._server.discard(channel)
                self._displaced.add(channel)
                self._notice.add(channel)
                log.info("broker_shard_channel_moved", pod_id=self._pod_id, node=_node(self.address), channel=channel)
                self._on_topology_doubt()
            if channel not in self.wanted and channel not in self._unsubscribing and name is not None:
                self._by_name.pop(name, None)

    def _report_recovered(self) -> None:
        if not self._notice or not self._notice <= self.actual:
            return
        channels = sorted(self._notice)
        self._notice.clear()
        self._on_recovered(channels)

    def _deliver(self, name: bytes, data: bytes) -> None:
        """An event of channel `name`, as it is read."""
        channel = self._by_name.get(name)
        if channel is None or channel not in self.wanted:
            return  # unsubscribed or moved while the message was on its way
        if channel == self._canary_channel:
            self._on_canary(data)
            return
        try:
            envelope = wire.decode_envelope_of(channel, data)
        except wire.MalformedEnvelope as exc:
            metrics.BROKER_INVALID_MESSAGES.inc()
            # The channel name is routing data, not payload; the payload is never logged.
            log.warning("broker_invalid_message", channel=channel, reason=str(exc), size=len(data))
            return
        self._on_envelope(envelope)


def _node(address: Address) -> str:
    return f"{address[0]}:{address[1]}"
