"""The Redis broker, on one Redis or a Redis Cluster: one Lua script per publish, a per-channel stream as history."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from service import metrics, redis_keys
from service.broker import redis_publish_batch
from service.broker import redis_wire as wire
from service.broker.base import (
    Broker,
    BrokerUnavailable,
    History,
    Position,
    check_idempotency_key,
    idempotency_keys_for,
)
from service.broker.canary import CANARY_CHANNEL_PART, Canary, new_instance
from service.broker.readiness import ReadinessLog
from service.broker.redis_shard_link import CLASSIC, SHARDED
from service.broker.redis_subscriber import Subscriber
from service.broker.state import Snapshot, StateChange, state_change
from service.config import Settings
from service.redis_client import (
    REDIS_ERRORS,
    SLOT_CALLS_IN_FLIGHT,
    Topology,
    cancel_and_wait,
    client_name_part,
    client_options,
    eval_script,
)

log = structlog.get_logger("eva_ws.broker")


class RedisBroker(Broker):
    """Broker over Redis: see Broker for the contract and docs/redis-wire-format.md for the format.

    `url` names one Redis or a Redis Cluster 7.0+ (`redis+cluster://`). Publishing and
    history use a pool of command connections (on a cluster, redis-py's RedisCluster, which
    follows MOVED and ASK). Live events arrive on PUB/SUB connections managed by a
    Subscriber: one to one Redis; on a cluster, sharded PUB/SUB with one per master. A
    channel's meta hash, history stream and (on a cluster) shard channel share one hash
    tag, hence one slot, so the publish script runs on the slot's master and SPUBLISHes there.
    """

    def __init__(
        self,
        *,
        url: str,
        prefix: str,
        history_size: int,
        history_ttl_s: int,
        pod_id: str,
        idempotency_window_s: int = 300,
        state_max_items: int = 10_000,
        connect_timeout_s: float = 1.0,
        command_timeout_s: float = 1.0,
        keepalive_idle_s: int = 10,
        ping_interval_s: float = 1.0,
        # Generous: a pod whose loop is busy with a connect storm answers late, and a false
        # "half-open" verdict would drop every subscription just when clients need them.
        pong_timeout_s: float = 10.0,
        subscribe_timeout_s: float = 5.0,
        reconnect_min_s: float = 0.05,
        reconnect_max_s: float = 5.0,
        max_connections: int = 32,
        canary_interval_s: float = 1.0,
        canary_max_lag_s: float = 5.0,
        topology_refresh_s: float = 5.0,
    ) -> None:
        """`url`, `prefix`, `history_size`, `history_ttl_s`, `pod_id`, `idempotency_window_s` and
        `state_max_items` are the EVA_WS_* settings.

        Tunables:
        - `connect_timeout_s`, `command_timeout_s`: bound every TCP connect and every command;
          `publish` and `history` give up after their sum and raise BrokerUnavailable.
        - `keepalive_idle_s`: TCP keepalive idle time (probes every third of it, 3 probes).
        - `ping_interval_s`: how often the subscriber connection is PINGed.
        - `pong_timeout_s`: how long a PING may stay unanswered before the connection is
          treated as half-open, reported not ready, and rebuilt.
        - `subscribe_timeout_s`: how long `subscribe` waits for Redis to confirm.
        - `max_connections`: connections for publish and history (per master on a cluster);
          more concurrent calls wait for a free one, within the same time bound.
        - `reconnect_min_s`, `reconnect_max_s`: reconnect backoff, doubled per failed attempt
          from min up to max, jittered, reset after a connection that got fully subscribed.
        - `canary_interval_s`: how often the pod publishes a canary to its private channel.
        - `canary_max_lag_s`: the pod is not ready while no canary sent within this many
          seconds came back on its subscriber connection.
        - `topology_refresh_s` (cluster): how often the slot map is re-read when nothing
          suggests it changed (a lost connection or a moved slot re-reads it at once).
        """
        super().__init__()
        topology = Topology.from_url(url)
        self._sharded = topology.sharded
        # Sharded PUB/SUB on a cluster: the channel carries the keys' hash tag (see redis_wire).
        self._channel_name = redis_keys.shard_channel if self._sharded else redis_keys.pubsub_channel
        self._publish_script = wire.CLUSTER_PUBLISH_SCRIPT if self._sharded else wire.PUBLISH_SCRIPT
        self._prefix = prefix
        self._history_size = history_size
        self._history_ttl_s = history_ttl_s
        self._idempotency_window_s = idempotency_window_s
        self._state_max_items = state_max_items
        self._timeout_s = connect_timeout_s + command_timeout_s
        options = client_options(
            url,
            connect_timeout_s=connect_timeout_s,
            command_timeout_s=command_timeout_s,
            keepalive_idle_s=keepalive_idle_s,
            client_name=f"eva-ws:{client_name_part(pod_id)}:cmd",
        )
        self._client = topology.command_client(max_connections=max_connections, wait_s=self._timeout_s, options=options)
        # One Redis publishes a batch with publish_batch.lua (see redis_publish_batch).
        self._limits = redis_publish_batch.Limits(
            history_size=history_size,
            history_ttl_s=history_ttl_s,
            idempotency_window_s=idempotency_window_s,
            state_max_items=state_max_items,
        )
        self._names = redis_publish_batch.ChannelNames(prefix, self._channel_name)
        # The client of one Redis, None on a cluster; asked once, since isinstance against
        # redis-py's client classes goes through a Protocol check.
        self._one_redis = None if isinstance(self._client, RedisCluster) else self._client
        # A pod-private channel, like the broker channels (pubsub_channel or shard_channel).
        canary_part = CANARY_CHANNEL_PART + client_name_part(new_instance(pod_id))
        self._canary_channel = self._channel_name(prefix, canary_part)
        self._canary = Canary(publish=self._publish_canary, interval_s=canary_interval_s, max_lag_s=canary_max_lag_s)

        sub_options = dict(options, client_name=f"eva-ws:{client_name_part(pod_id)}:sub")
        timing: dict[str, Any] = {
            "prefix": prefix,
            "pod_id": pod_id,
            # Late-bound: the hub installs its handlers with set_handlers after construction.
            "on_message": lambda envelope: self._on_message(envelope),
            "on_resubscribed": lambda channels: self._on_resubscribed(channels),
            "ping_interval_s": ping_interval_s,
            "pong_timeout_s": pong_timeout_s,
            "subscribe_timeout_s": subscribe_timeout_s,
            "reconnect_min_s": reconnect_min_s,
            "reconnect_max_s": reconnect_max_s,
            "canary": self._canary,
        }
        self._subscriber = Subscriber(
            seeds=list(topology.seeds),
            link_client=lambda address: topology.node_client(address, sub_options),
            kind=SHARDED if self._sharded else CLASSIC,
            topology_refresh_s=topology_refresh_s,
            on_slot_map_changed=self._slot_map_changed,
            canary_channel=canary_part,
            **timing,
        )
        self._refreshing: asyncio.Task[None] | None = None
        self._readiness_log = ReadinessLog(
            pod_id=pod_id,
            reasons=self.not_ready_reasons,
            disconnects=lambda: self._subscriber.disconnects,
            canary_lag_s=lambda: self._canary.lag_s,
            channels=lambda: self._subscriber.wanted_count,
        )
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, **tunables: Any) -> RedisBroker:
        """The broker a pod runs with these settings; `tunables` are the timing options above."""
        if settings.redis_url is None:
            raise ValueError("RedisBroker needs EVA_WS_REDIS_URL")
        options: dict[str, Any] = {
            "reconnect_max_s": settings.redis_reconnect_max_s,
            "canary_interval_s": settings.broker_canary_interval_s,
            "canary_max_lag_s": settings.broker_canary_max_lag_s,
        }
        options.update(tunables)
        return cls(
            url=settings.redis_url,
            prefix=settings.redis_prefix,
            history_size=settings.history_size,
            history_ttl_s=settings.history_ttl_s,
            pod_id=settings.pod_id,
            idempotency_window_s=settings.idempotency_window_s,
            state_max_items=settings.state_max_items,
            **options,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """See Broker.start. Waits a bounded time for live delivery to be proven by a canary
        round trip; a Redis that is down keeps the pod not ready, and the subscriber keeps
        reconnecting in the background until Redis appears."""
        self._canary.start()
        try:
            # Bounded by one connect + command timeout each, so a pod without Redis starts
            # (not ready) within seconds and its probes can report why.
            await self._subscriber.start(timeout_s=self._timeout_s)
            async with asyncio.timeout(self._timeout_s):
                await self._canary.round_trip()
        except (BrokerUnavailable, TimeoutError):
            self._readiness_log.deaf_at_start()
        self._readiness_log.start()

    async def close(self) -> None:
        """See Broker.close."""
        if self._closed:
            return
        self._closed = True
        await self._readiness_log.close()
        await self._canary.close()
        await self._subscriber.close()
        if self._refreshing is not None:
            await cancel_and_wait(self._refreshing)
        await self._client.aclose()

    def _slot_map_changed(self) -> None:
        """The cluster subscriber saw a new slot map: make the command client read it too.

        Without this, the first command for a failed-over slot goes to the dead master,
        fails, and only then makes redis-py re-read the map.
        """
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(
                self._refresh_command_slots(), name="redis-cluster-command-slots"
            )

    async def _refresh_command_slots(self) -> None:
        assert isinstance(self._client, RedisCluster)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.nodes_manager.initialize()
        except REDIS_ERRORS as exc:
            # redis-py re-reads the map by itself after the next failed command.
            log.info("broker_command_slot_map_stale", error=type(exc).__name__)

    # -- readiness -------------------------------------------------------------------------

    def not_ready_reasons(self) -> list[str]:
        """See Broker.not_ready_reasons: `broker_not_ready` (no answering subscriber
        connection; on a cluster also no slot map or a wanted channel not confirmed on its
        master), `resubscribe_pending` (one Redis lacks wanted channels), `broker_canary_lag`
        (no canary came back within `canary_max_lag_s`)."""
        if self._closed:
            return ["broker_not_ready"]
        reasons = self._subscriber.not_ready_reasons()
        if reasons == ["broker_not_ready"]:
            return reasons
        if self._canary.lagging:
            reasons.append("broker_canary_lag")
        return reasons

    async def _publish_canary(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.execute_command(
                    "SPUBLISH" if self._sharded else "PUBLISH", self._canary_channel, data
                )
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"canary not sent: {type(exc).__name__}") from exc

    # -- publishing and history -----------------------------------------------------------

    def live_message(self, channel: str, payload: bytes) -> tuple[str, bytes]:
        """The Redis PUB/SUB channel and message that deliver `payload` on a pod channel (one
        the Hub `listen`s to) without offset or history, for a caller's own script to PUBLISH."""
        return self._channel_name(self._prefix, channel), wire.encode_live(payload)

    def _script_args(
        self, channel: str, payload: bytes, idempotency_key: str | None, state: StateChange | None
    ) -> tuple[list[str], list[Any]]:
        return wire.publish_keys_and_args(
            self._prefix,
            channel,
            payload,
            pubsub=self._channel_name(self._prefix, channel),
            history_size=self._history_size,
            history_ttl_s=self._history_ttl_s,
            idempotency_key=idempotency_key,
            idempotency_window_s=self._idempotency_window_s,
            state=state,
            state_max_items=self._state_max_items,
        )

    async def publish(self, channel: str, payload: bytes, *, idempotency_key: str | None = None) -> Position:
        """See Broker.publish. On BrokerUnavailable after a timeout the event may have been
        published: a retry with the same idempotency key is answered with its position."""
        check_idempotency_key(idempotency_key)
        # Parsed here, not in the script: the script stays cheap and payload-agnostic.
        return await self._publish_one(channel, payload, idempotency_key, state_change(payload))

    async def _publish_one(
        self, channel: str, payload: bytes, idempotency_key: str | None, state: StateChange | None
    ) -> Position:
        keys, args = self._script_args(channel, payload, idempotency_key, state)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await eval_script(self._client, self._publish_script, keys, args)
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from exc
        metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
        return wire.decode_published(reply)

    async def publish_many(
        self,
        items: Iterable[tuple[str, bytes]],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        states: Sequence[StateChange | None] | None = None,
    ) -> list[Position]:
        """See Broker.publish_many. One Redis: one round trip of batch script calls (see
        redis_publish_batch). A cluster: channels in parallel (each on its own slot), one
        channel's events in order."""
        batch = items if isinstance(items, list) else list(items)
        if not batch:
            return []
        keys_of_events = idempotency_keys_for(batch, idempotency_keys)
        if states is None:
            states = [state_change(payload) for _, payload in batch]
        elif len(states) != len(batch):
            raise ValueError("one state change (or None) per event")
        if len(batch) == 1:
            # publish.lua, the script other publishers call too.
            [(channel, payload)] = batch
            return [await self._publish_one(channel, payload, keys_of_events[0], states[0])]
        if self._one_redis is None:
            return await self._publish_per_channel(batch, keys_of_events, states)
        started = time.perf_counter()
        calls = redis_publish_batch.chunks(batch, keys_of_events, states, names=self._names, limits=self._limits)
        try:
            async with asyncio.timeout(self._timeout_s):
                positions = await redis_publish_batch.publish(self._one_redis, calls)
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from exc
        metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
        return positions

    async def _publish_per_channel(
        self,
        batch: list[tuple[str, bytes]],
        keys_of_events: Sequence[str | None],
        states: Sequence[StateChange | None],
    ) -> list[Position]:
        by_channel: dict[str, list[int]] = {}
        for index, (channel, _) in enumerate(batch):
            by_channel.setdefault(channel, []).append(index)
        positions: list[Position | None] = [None] * len(batch)
        in_flight = asyncio.Semaphore(SLOT_CALLS_IN_FLIGHT)

        async def publish_channel(indexes: list[int]) -> None:
            # A few channels at a time: redis-py's cluster client fails a command that finds
            # its node's connection pool exhausted instead of waiting for a connection.
            async with in_flight:
                for index in indexes:
                    channel, payload = batch[index]
                    positions[index] = await self._publish_one(channel, payload, keys_of_events[index], states[index])

        # Not a TaskGroup: one unavailable master must not cancel the other channels' publishes
        # half-way (their outcome would be unknown), and the caller expects BrokerUnavailable.
        results = await asyncio.gather(
            *(publish_channel(indexes) for indexes in by_channel.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [p for p in positions if p is not None]

    async def history(self, channel: str, since: Position | None) -> History:
        """See Broker.history. Reading a channel that never had events fixes its epoch, so a
        position handed out now stays resumable once events arrive."""
        keys = [redis_keys.meta_key(self._prefix, channel), redis_keys.stream_key(self._prefix, channel)]
        asked_epoch = since.epoch if since is not None else ""
        first = str(since.offset + 1) if since is not None else ""
        args: list[Any] = [wire.new_epoch(), self._history_ttl_s, asked_epoch, first, self._history_size]
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    reply = await eval_script(self._client, wire.HISTORY_SCRIPT, keys, args)
                except RedisConnectionError:
                    # Safe to repeat, unlike a publish: its only write creates a missing epoch.
                    # On a cluster a lost connection makes redis-py re-read the slot map, so a
                    # failed-over master costs one attempt, not a failed resume.
                    reply = await eval_script(self._client, wire.HISTORY_SCRIPT, keys, args)
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"history failed: {type(exc).__name__}") from exc
        return wire.decode_history(channel, since, reply)

    async def snapshot(self, channel: str) -> Snapshot:
        """See Broker.snapshot: one script reads the position and the state together."""
        keys, args = wire.snapshot_keys_and_args(self._prefix, channel, history_ttl_s=self._history_ttl_s)
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    reply = await eval_script(self._client, wire.SNAPSHOT_SCRIPT, keys, args)
                except RedisConnectionError:
                    # Safe to repeat, like a history read (see history).
                    reply = await eval_script(self._client, wire.SNAPSHOT_SCRIPT, keys, args)
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"snapshot failed: {type(exc).__name__}") from exc
        return wire.decode_snapshot(reply)

    # -- subscriptions: see Subscriber ------------------------------------------------------

    @property
    def ready(self) -> bool:
        """See Broker.ready: connected, PINGs answered, wanted channels in effect, canary on time."""
        return not self.not_ready_reasons()

    @property
    def subscribed_channels(self) -> frozenset[str]:
        return self._subscriber.subscribed_channels

    async def subscribe(self, channel: str) -> None:
        """See Broker.subscribe. Raises BrokerUnavailable (and forgets the channel) if Redis (the
        slot's master) does not confirm within `subscribe_timeout_s`."""
        await self._subscriber.subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        """See Broker.unsubscribe; a subscribe still waiting for this channel returns at once."""
        await self._subscriber.unsubscribe(channel)
