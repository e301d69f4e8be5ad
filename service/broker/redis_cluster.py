"""The Redis Cluster broker: the Redis broker's scripts on the channel's slot, live delivery by sharded PUB/SUB."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from service import metrics
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
from service.broker.redis_cluster_subscriber import ClusterSubscriber
from service.config import Settings
from service.redis_client import cancel_and_wait, client_name_part, client_options
from service.redis_cluster_client import CLUSTER_ERRORS, Address, cluster_client, eval_script, parse_cluster_url

log = structlog.get_logger("eva_ws.broker")


class RedisClusterBroker(Broker):
    """Broker over Redis Cluster (7.0+): see Broker for the contract, docs/redis-wire-format.md for the format.

    A channel's meta hash, history stream and shard channel share one hash tag, hence one
    slot, so the publish script runs on the slot's master and SPUBLISHes there. Publishing
    and history go through redis-py's RedisCluster (it follows MOVED and ASK); live events
    arrive on one sharded PUB/SUB connection per master, managed by ClusterSubscriber.
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
        topology_refresh_s: float = 5.0,
        canary_interval_s: float = 1.0,
        canary_max_lag_s: float = 5.0,
    ) -> None:
        """Same settings and tunables as RedisBroker; `max_connections` is per master here.

        `topology_refresh_s`: how often the slot map is re-read when nothing suggests it
        changed (a lost connection or a moved slot re-reads it at once).
        """
        super().__init__()
        seeds, credentials = parse_cluster_url(url)  # the subscriber's connections need them too
        self._prefix = prefix
        self._history_size = history_size
        self._history_ttl_s = history_ttl_s
        self._idempotency_window_s = idempotency_window_s
        self._timeout_s = connect_timeout_s + command_timeout_s
        name = client_name_part(pod_id)
        options = client_options(
            url,
            connect_timeout_s=connect_timeout_s,
            command_timeout_s=command_timeout_s,
            keepalive_idle_s=keepalive_idle_s,
            client_name=f"eva-ws:{name}:cmd",
        )
        self._client = cluster_client(url, max_connections=max_connections, options=options)
        sub_options = dict(options, client_name=f"eva-ws:{name}:sub", **credentials)

        def link_client(address: Address) -> Redis:
            return Redis.from_pool(ConnectionPool(host=address[0], port=address[1], **sub_options))

        # The canary is a shard channel like the others, on the master of its own slot.
        self._canary_part = CANARY_CHANNEL_PART + client_name_part(new_instance(pod_id))
        self._canary = Canary(publish=self._publish_canary, interval_s=canary_interval_s, max_lag_s=canary_max_lag_s)
        self._subscriber = ClusterSubscriber(
            seeds=seeds,
            link_client=link_client,
            prefix=prefix,
            pod_id=pod_id,
            # Late-bound: the hub installs its handlers with set_handlers after construction.
            on_message=lambda envelope: self._on_message(envelope),
            on_resubscribed=lambda channels: self._on_resubscribed(channels),
            ping_interval_s=ping_interval_s,
            pong_timeout_s=pong_timeout_s,
            subscribe_timeout_s=subscribe_timeout_s,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            topology_refresh_s=topology_refresh_s,
            on_slot_map_changed=self._slot_map_changed,
            canary=self._canary,
            canary_channel=self._canary_part,
        )
        self._readiness_log = ReadinessLog(
            pod_id=pod_id,
            reasons=self.not_ready_reasons,
            disconnects=lambda: self._subscriber.disconnects,
            canary_lag_s=lambda: self._canary.lag_s,
            channels=lambda: self._subscriber.wanted_count,
        )
        self._refreshing: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, **tunables: Any) -> RedisClusterBroker:
        """The broker a pod runs with these settings; `tunables` are the timing options above."""
        if settings.redis_url is None:
            raise ValueError("RedisClusterBroker needs EVA_WS_REDIS_URL")
        return cls(
            url=settings.redis_url,
            prefix=settings.redis_prefix,
            history_size=settings.history_size,
            history_ttl_s=settings.history_ttl_s,
            pod_id=settings.pod_id,
            idempotency_window_s=settings.idempotency_window_s,
            **{
                "reconnect_max_s": settings.redis_reconnect_max_s,
                "canary_interval_s": settings.broker_canary_interval_s,
                "canary_max_lag_s": settings.broker_canary_max_lag_s,
                **tunables,
            },
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """See Broker.start and RedisBroker.start: a cluster that cannot be reached keeps the
        pod not ready while the subscriber keeps asking its nodes for the slot map."""
        self._canary.start()
        try:
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
        """The subscriber saw a new slot map: make the command client read it too.

        Without this, the first command for a failed-over slot goes to the dead master,
        fails, and only then makes redis-py re-read the map.
        """
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(
                self._refresh_command_slots(), name="redis-cluster-command-slots"
            )

    async def _refresh_command_slots(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.nodes_manager.initialize()
        except CLUSTER_ERRORS as exc:
            # redis-py re-reads the map by itself after the next failed command.
            log.info("broker_command_slot_map_stale", error=type(exc).__name__)

    async def _publish_canary(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                channel = wire.shard_channel(self._prefix, self._canary_part)
                await self._client.execute_command("SPUBLISH", channel, data)
        except CLUSTER_ERRORS as exc:
            raise BrokerUnavailable(f"canary not sent: {type(exc).__name__}") from exc

    # -- publishing and history -----------------------------------------------------------

    async def publish(self, channel: str, payload: bytes, *, idempotency_key: str | None = None) -> Position:
        """See Broker.publish. On BrokerUnavailable after a timeout the event may have been
        published: a retry with the same idempotency key is answered with its position."""
        check_idempotency_key(idempotency_key)
        keys, args = wire.publish_keys_and_args(
            self._prefix,
            channel,
            payload,
            pubsub=wire.shard_channel(self._prefix, channel),
            history_size=self._history_size,
            history_ttl_s=self._history_ttl_s,
            idempotency_key=idempotency_key,
            idempotency_window_s=self._idempotency_window_s,
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await eval_script(self._client, wire.CLUSTER_PUBLISH_SCRIPT, keys, args)
        except CLUSTER_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from exc
        metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
        return wire.decode_published(reply)

    async def publish_many(
        self, items: Iterable[tuple[str, bytes]], *, idempotency_keys: Sequence[str | None] | None = None
    ) -> list[Position]:
        """See Broker.publish_many: channels in parallel (each on its own slot), one channel's events in order."""
        batch = list(items)
        keys_of_events = idempotency_keys_for(batch, idempotency_keys)
        by_channel: dict[str, list[int]] = {}
        for index, (channel, _) in enumerate(batch):
            by_channel.setdefault(channel, []).append(index)
        positions: list[Position | None] = [None] * len(batch)

        async def publish_channel(indexes: list[int]) -> None:
            for index in indexes:
                channel, payload = batch[index]
                positions[index] = await self.publish(channel, payload, idempotency_key=keys_of_events[index])

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
        """See Broker.history; the same script and rules as RedisBroker.history."""
        keys = [wire.meta_key(self._prefix, channel), wire.stream_key(self._prefix, channel)]
        asked_epoch = since.epoch if since is not None else ""
        first = str(since.offset + 1) if since is not None else ""
        args: list[Any] = [wire.new_epoch(), self._history_ttl_s, asked_epoch, first, self._history_size]
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    reply = await eval_script(self._client, wire.HISTORY_SCRIPT, keys, args)
                except RedisConnectionError:
                    # Safe to repeat, unlike a publish: its only write creates a missing epoch.
                    # A lost connection makes redis-py re-read the slot map, so a failed-over
                    # master costs one attempt, not a failed resume.
                    reply = await eval_script(self._client, wire.HISTORY_SCRIPT, keys, args)
        except CLUSTER_ERRORS as exc:
            raise BrokerUnavailable(f"history failed: {type(exc).__name__}") from exc
        return wire.decode_history(channel, since, reply)

    # -- subscriptions: see ClusterSubscriber ----------------------------------------------

    def not_ready_reasons(self) -> list[str]:
        """See Broker.not_ready_reasons: `broker_not_ready` (no slot map, a wanted channel not
        confirmed on its master, a link not answering), `broker_canary_lag` (no canary came
        back within `canary_max_lag_s`)."""
        if self._closed or not self._subscriber.ready:
            return ["broker_not_ready"]
        return ["broker_canary_lag"] if self._canary.lagging else []

    @property
    def ready(self) -> bool:
        """See Broker.ready: every wanted channel confirmed on the master of its slot, every link answering,
        the canary on time."""
        return not self.not_ready_reasons()

    @property
    def subscribed_channels(self) -> frozenset[str]:
        return self._subscriber.subscribed_channels

    def channels_by_node(self) -> dict[Address, frozenset[str]]:
        """Which master delivers which of this pod's channels."""
        return self._subscriber.links()

    async def subscribe(self, channel: str) -> None:
        """See Broker.subscribe; raises BrokerUnavailable if the slot's master does not confirm in time."""
        await self._subscriber.subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        """See Broker.unsubscribe."""
        await self._subscriber.unsubscribe(channel)
