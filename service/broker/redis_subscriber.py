"""The Redis broker's PUB/SUB side: one connection, owned by one task, that never stays deaf."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any, Final

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from service import metrics
from service.broker import redis_wire as wire
from service.broker.base import BrokerUnavailable, Envelope, MessageHandler, ResubscribedHandler
from service.broker.canary import Canary
from service.redis_client import cancel_and_wait

log = structlog.get_logger("eva_ws.broker")

# One SUBSCRIBE/UNSUBSCRIBE command carries at most this many channels, so a pod that
# resubscribes thousands of channels after a reconnect sends a few large commands
# instead of one per channel, without building a single multi-megabyte request.
SUBSCRIBE_BATCH_MAX: Final = 500


class Subscriber:
    """Live delivery for a set of channels over one PUB/SUB connection.

    A single owner task does all I/O on the connection: `subscribe` and `unsubscribe`
    only change the wanted set and wake it. The task batches the difference between
    the wanted set and what Redis has into SUBSCRIBE/UNSUBSCRIBE commands, reads with a
    bounded `get_message` timeout, PINGs to detect half-open sockets, and on any
    failure rebuilds the connection with capped, jittered backoff, resubscribes every
    wanted channel and reports them to `on_resubscribed`.
    """

    def __init__(
        self,
        *,
        client: Redis,
        prefix: str,
        pod_id: str,
        on_message: MessageHandler,
        on_resubscribed: ResubscribedHandler,
        ping_interval_s: float,
        pong_timeout_s: float,
        subscribe_timeout_s: float,
        reconnect_min_s: float,
        reconnect_max_s: float,
        canary: Canary | None = None,
        canary_channel: str = "",
    ) -> None:
        """`canary` gets every message of `canary_channel`, a channel this connection
        subscribes to on its own, outside the wanted set: it is never reported to the hub
        nor counted as a subscription."""
        self._client = client
        self._prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._pod_id = pod_id
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._ping_interval_s = ping_interval_s
        self._pong_timeout_s = pong_timeout_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._canary = canary
        self._canary_channel = canary_channel.encode()

        # Written only by the owner task, except `_wanted` and `_waiters`.
        self._wanted: set[str] = set()
        self._server: set[str] = set()  # what Redis will have once every sent command is applied
        self._actual: set[str] = set()  # what Redis confirmed on the current connection
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Wanted channels not confirmed by Redis yet, with when they were first asked for.
        self._unconfirmed_since: dict[str, float] = {}
        self._connected = False
        # Connections lost or failed so far, and when the last one was, so that readiness
        # reporting sees a reconnect even when it was over before anyone looked.
        self._disconnects = 0
        self._disconnected_at = 0.0
        self._up = asyncio.Event()  # set while `_connected`
        self._reached_ready = False  # the current connection had every wanted channel confirmed
        self._ping_sent_at: float | None = None
        self._wake_scope: asyncio.Timeout | None = None
        self._dirty = False  # the wanted set changed since the owner last reconciled
        self._owner: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self, *, timeout_s: float) -> None:
        """Start the owner task; raise BrokerUnavailable if no connection comes up within `timeout_s`."""
        self._owner = asyncio.create_task(self._run(), name="redis-broker-subscriber")
        try:
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        except TimeoutError:
            raise BrokerUnavailable("redis subscriber connection did not come up") from None

    async def close(self) -> None:
        """Stop the owner task and fail pending subscribes; idempotent."""
        self._closed = True
        if self._owner is not None:
            await cancel_and_wait(self._owner)
            self._owner = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("broker closed"))
        self._waiters.clear()
        self._set_connected(False)

    @property
    def disconnects(self) -> tuple[int, float]:
        """Connections lost or failed so far, and when the last one was."""
        return self._disconnects, self._disconnected_at

    def not_ready_reasons(self) -> list[str]:
        """`broker_not_ready` without an answering connection, else `resubscribe_pending`
        while wanted channels are missing in Redis (see `subscriptions_pending`)."""
        if not self.connected:
            return ["broker_not_ready"]
        return ["resubscribe_pending"] if self.subscriptions_pending else []

    @property
    def wanted_count(self) -> int:
        return len(self._wanted)

    @property
    def connected(self) -> bool:
        """A connection is up and its last PING was answered in time."""
        return self._connected and not self._pong_late()

    @property
    def subscriptions_pending(self) -> bool:
        """Wanted channels are missing in Redis: the current connection has not yet
        resubscribed everything, or a new channel waits longer than `subscribe_timeout_s`.

        A channel that a client has just asked for is not pending yet: every subscribe
        takes a round trip, and readiness must not flap with client traffic.
        """
        if not self._reached_ready:
            return True
        horizon = time.monotonic() - self._subscribe_timeout_s
        return any(since < horizon for since in self._unconfirmed_since.values())

    @property
    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._actual & self._wanted)

    async def subscribe(self, channel: str) -> None:
        """Return once Redis confirmed the channel; raise BrokerUnavailable (and forget the
        channel) if it does not within `subscribe_timeout_s`."""
        if self._closed:
            raise BrokerUnavailable("broker closed")
        self._wanted.add(channel)
        metrics.BROKER_SUBSCRIPTIONS_WANTED.set(len(self._wanted))
        if channel in self._actual and channel in self._server:
            return
        self._unconfirmed_since.setdefault(channel, time.monotonic())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        self._wake()
        try:
            async with asyncio.timeout(self._subscribe_timeout_s):
                await waiter
        except TimeoutError:
            self._drop_waiter(channel, waiter)
            if channel not in self._actual and not self._waiters.get(channel):
                self._wanted.discard(channel)
                self._unconfirmed_since.pop(channel, None)
                metrics.BROKER_SUBSCRIPTIONS_WANTED.set(len(self._wanted))
                self._wake()
            raise BrokerUnavailable("subscription not confirmed by redis") from None

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivery at once; a subscribe still waiting for this channel returns."""
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        self._unconfirmed_since.pop(channel, None)
        metrics.BROKER_SUBSCRIPTIONS_WANTED.set(len(self._wanted))
        self._resolve(channel)
        self._wake()

    def _drop_waiter(self, channel: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(channel, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(channel, None)

    def _resolve(self, channel: str) -> None:
        for waiter in self._waiters.pop(channel, []):
            if not waiter.done():
                waiter.set_result(None)

    def _wake(self) -> None:
        self._dirty = True
        # Cuts the owner's current get_message wait short so it applies the change now.
        if self._wake_scope is not None and not self._wake_scope.expired():
            self._wake_scope.reschedule(asyncio.get_running_loop().time())

    def _pong_late(self) -> bool:
        return self._ping_sent_at is not None and time.monotonic() - self._ping_sent_at > self._pong_timeout_s

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        if connected:
            self._up.set()
        else:
            self._up.clear()

    # -- the owner task ------------------------------------------------------------------

    async def _run(self) -> None:
        """Keep one PUB/SUB connection alive forever: connect, serve, back off, repeat."""
        attempt = 0
        connections = 0
        while not self._closed:
            pubsub = self._client.pubsub()
            connected = False
            self._reached_ready = False
            try:
                await pubsub.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                metrics.BROKER_CONNECTS.labels(outcome="ok").inc()
                connections += 1
                log.info("broker_connected", pod_id=self._pod_id, connection=connections)
                connected = True
                await self._serve(pubsub, notify_resubscribed=connections > 1)
            except (RedisError, OSError, TimeoutError, SilentConnection) as exc:
                if not connected:
                    metrics.BROKER_CONNECTS.labels(outcome="failed").inc()
                log.warning("broker_disconnected", pod_id=self._pod_id, error=type(exc).__name__, detail=str(exc))
            except Exception:  # the loop must outlive any bug, or the pod goes deaf for good
                log.exception("broker_subscriber_failed", pod_id=self._pod_id)
            finally:
                self._disconnects += 1
                self._disconnected_at = time.monotonic()
                self._reset_connection_state()
                # aclose() cannot hang on a half-open socket: it does not wait for the peer.
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            # Reset only after a connection that got fully subscribed, so a connection that
            # fails right after connecting (e.g. SUBSCRIBE refused) still backs off.
            attempt = 0 if self._reached_ready else attempt + 1
            await asyncio.sleep(self._backoff_s(attempt))

    def _backoff_s(self, attempt: int) -> float:
        # Equal jitter: never zero (no hot loop), never synchronised across pods.
        cap = min(self._reconnect_max_s, self._reconnect_min_s * (1 << min(attempt, 30)))
        return cap / 2 + random.uniform(0, cap / 2)

    def _reset_connection_state(self) -> None:
        self._server.clear()
        self._actual.clear()
        self._ping_sent_at = None
        metrics.BROKER_SUBSCRIPTIONS_ACTUAL.set(0)
        self._set_connected(False)

    async def _serve(self, pubsub: PubSub, *, notify_resubscribed: bool) -> None:
        ping_token = f"eva-ws-watchdog:{self._pod_id}".encode()
        next_ping = time.monotonic()
        self._set_connected(True)
        pending_notice = notify_resubscribed
        self._dirty = True  # a new connection has no subscriptions yet
        changed = True
        if self._canary is not None:
            await pubsub.subscribe(self._canary_channel)
        while not self._closed:
            if self._dirty:
                self._dirty = False
                await self._reconcile(pubsub)
                changed = True
            now = time.monotonic()
            if self._ping_sent_at is None and now >= next_ping:
                self._ping_sent_at = now
                await pubsub.ping(ping_token)
            if self._pong_late():
                raise SilentConnection(f"no PONG within {self._pong_timeout_s}s")
            # Set comparisons cost O(channels): only after something that can change them,
            # never per delivered event.
            if changed:
                changed = False
                if self._actual == self._server == self._wanted:
                    self._reached_ready = True
                    if pending_notice:
                        pending_notice = False
                        log.info("broker_resubscribed", pod_id=self._pod_id, channels=len(self._actual))
                        self._call_resubscribed(sorted(self._actual))
            if self._dirty:
                continue  # changed while we were sending: reconcile before blocking
            if self._ping_sent_at is not None:
                wait_s = self._ping_sent_at + self._pong_timeout_s - now
            else:
                wait_s = next_ping - now
            message: Mapping[str, Any] | None = None
            try:
                async with asyncio.timeout(None) as scope:
                    self._wake_scope = scope
                    message = await pubsub.get_message(timeout=max(0.001, wait_s))
            except TimeoutError:
                pass  # woken by _wake: a subscription changed
            finally:
                self._wake_scope = None
            if message is None:
                continue
            kind = message["type"]
            if message.get("channel") == self._canary_channel and self._canary is not None:
                if kind == "message":
                    self._canary.received(message["data"])
                elif kind == "subscribe":
                    self._canary.kick()  # a round trip now, instead of one interval later
            elif kind == "message":
                self._deliver(message)
            elif kind == "pong":
                if message["data"] == ping_token:
                    self._ping_sent_at = None
                    next_ping = time.monotonic() + self._ping_interval_s
                    changed = True
            else:
                self._confirm(kind, message)
                changed = True

    async def _reconcile(self, pubsub: PubSub) -> None:
        """Send the difference between the wanted set and what Redis will have, batched."""
        to_subscribe = sorted(self._wanted - self._server)
        to_unsubscribe = sorted(self._server - self._wanted)
        for start in range(0, len(to_unsubscribe), SUBSCRIBE_BATCH_MAX):
            batch = to_unsubscribe[start : start + SUBSCRIBE_BATCH_MAX]
            await pubsub.unsubscribe(*(wire.pubsub_channel(self._prefix, c) for c in batch))
            self._server.difference_update(batch)
        for start in range(0, len(to_subscribe), SUBSCRIBE_BATCH_MAX):
            batch = to_subscribe[start : start + SUBSCRIBE_BATCH_MAX]
            await pubsub.subscribe(*(wire.pubsub_channel(self._prefix, c) for c in batch))
            self._server.update(batch)

    def _channel_of(self, raw: bytes) -> str | None:
        if not raw.startswith(self._prefix_bytes):
            return None
        try:
            return raw[len(self._prefix_bytes) :].decode()
        except UnicodeDecodeError:
            return None

    def _confirm(self, kind: str, message: Mapping[str, Any]) -> None:
        channel = self._channel_of(message["channel"])
        if channel is None:
            return
        if kind == "subscribe":
            self._actual.add(channel)
            self._unconfirmed_since.pop(channel, None)
            if channel in self._wanted and channel in self._server:
                self._resolve(channel)
        elif kind == "unsubscribe":
            self._actual.discard(channel)
        metrics.BROKER_SUBSCRIPTIONS_ACTUAL.set(len(self._actual))

    def _deliver(self, message: Mapping[str, Any]) -> None:
        channel = self._channel_of(message["channel"])
        if channel is None or channel not in self._wanted:
            return  # unsubscribed while the message was on its way
        try:
            event = wire.decode_envelope(message["data"])
        except wire.MalformedEnvelope as exc:
            metrics.BROKER_INVALID_MESSAGES.inc()
            # The channel name is routing data, not payload; the payload is never logged.
            log.warning("broker_invalid_message", channel=channel, reason=str(exc), size=len(message["data"]))
            return
        envelope = Envelope(channel=channel, offset=event.offset, epoch=event.epoch, payload=event.payload)
        try:
            self._on_message(envelope)
        except Exception:  # one failing handler must not stop delivery of the rest
            log.exception("broker_handler_failed", channel=channel, offset=event.offset)

    def _call_resubscribed(self, channels: list[str]) -> None:
        try:
            self._on_resubscribed(channels)
        except Exception:  # same reason as in _handle
            log.exception("broker_resubscribed_handler_failed", channels=len(channels))


class SilentConnection(Exception):
    """The subscriber connection stopped answering: rebuild it."""
