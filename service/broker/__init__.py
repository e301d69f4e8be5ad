"""Brokers move events between pods; `create_broker` and `create_presence` pick one from the settings."""

from __future__ import annotations

from service.broker.base import Broker
from service.broker.memory import MemoryBroker
from service.config import Settings
from service.limits import ConnectionCounter, LocalConnectionCounter
from service.presence import MemoryPresence, Presence


def create_broker(settings: Settings) -> Broker:
    """The in-process broker without EVA_WS_REDIS_URL, the Redis broker with it (Redis Cluster for redis+cluster://)."""
    if settings.redis_url is None:
        return MemoryBroker(history_size=settings.history_size, history_ttl_s=settings.history_ttl_s)
    if settings.redis_url.startswith("redis+cluster://"):
        from service.broker.redis_cluster import RedisClusterBroker

        return RedisClusterBroker.from_settings(settings)
    from service.broker.redis import RedisBroker

    return RedisBroker.from_settings(settings)


def create_presence(settings: Settings) -> Presence:
    """Presence in this process without EVA_WS_REDIS_URL, in Redis hashes with it (Redis Cluster for redis+cluster://)."""
    if settings.redis_url is None:
        return MemoryPresence()
    if settings.redis_url.startswith("redis+cluster://"):
        from service.presence_redis_cluster import RedisClusterPresence

        return RedisClusterPresence.from_settings(settings, heartbeat_ttl_s=settings.presence_ttl_s)
    from service.presence_redis import RedisPresence

    return RedisPresence.from_settings(settings, heartbeat_ttl_s=settings.presence_ttl_s)


def create_connection_counter(settings: Settings) -> ConnectionCounter:
    """Caps per pod without EVA_WS_REDIS_URL, across every pod sharing the Redis with it."""
    if settings.redis_url is None:
        return LocalConnectionCounter()
    from service.limits_redis import RedisConnectionCounter

    return RedisConnectionCounter.from_settings(settings)
