"""Settings to backends: in-process ones without EVA_WS_REDIS_URL, Redis ones (one Redis or a Cluster) with it."""

from __future__ import annotations

from service.broker import create_broker
from service.config import Settings
from service.limits import ConnectionCounter, LocalConnectionCounter
from service.presence import MemoryPresence, Presence
from service.revocations import MemoryRevocationStore, RevocationStore

__all__ = ["create_broker", "create_connection_counter", "create_presence", "create_revocation_store"]


def create_presence(settings: Settings) -> Presence:
    """Presence in this process without EVA_WS_REDIS_URL, in Redis hashes with it (any topology)."""
    if settings.redis_url is None:
        return MemoryPresence()
    from service.presence_redis import RedisPresence

    return RedisPresence.from_settings(settings, heartbeat_ttl_s=settings.presence_ttl_s)


def create_connection_counter(settings: Settings) -> ConnectionCounter:
    """Caps per pod without EVA_WS_REDIS_URL, across every pod sharing the Redis with it."""
    if settings.redis_url is None:
        return LocalConnectionCounter()
    from service.limits_redis import RedisConnectionCounter

    return RedisConnectionCounter.from_settings(settings)


def create_revocation_store(settings: Settings) -> RevocationStore:
    """Revocations in this process without EVA_WS_REDIS_URL, in Redis with it (any topology)."""
    if settings.redis_url is None:
        return MemoryRevocationStore()
    from service.revocations_redis import RedisRevocationStore

    return RedisRevocationStore.from_settings(settings)
