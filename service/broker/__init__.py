"""Brokers move events between pods; `create_broker` and `create_presence` pick one from the settings."""

from __future__ import annotations

from service.broker.base import Broker
from service.broker.memory import MemoryBroker
from service.config import Settings
from service.presence import MemoryPresence, Presence


def create_broker(settings: Settings) -> Broker:
    """The in-process broker without EVA_WS_REDIS_URL, the Redis broker with it."""
    if settings.redis_url is None:
        return MemoryBroker(history_size=settings.history_size, history_ttl_s=settings.history_ttl_s)
    from service.broker.redis import RedisBroker

    return RedisBroker.from_settings(settings)


def create_presence(settings: Settings) -> Presence:
    """Presence in this process without EVA_WS_REDIS_URL, in Redis hashes with it."""
    if settings.redis_url is None:
        return MemoryPresence()
    from service.presence_redis import RedisPresence

    return RedisPresence.from_settings(settings)
