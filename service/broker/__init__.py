"""Brokers move events between pods; `create_broker` picks one from the settings (see service/backends.py)."""

from __future__ import annotations

from service.broker.base import Broker
from service.broker.memory import MemoryBroker
from service.config import Settings


def create_broker(settings: Settings) -> Broker:
    """The in-process broker without EVA_WS_REDIS_URL, the Redis broker with it (one Redis or a Cluster)."""
    if settings.redis_url is None:
        return MemoryBroker(
            history_size=settings.history_size,
            history_ttl_s=settings.history_ttl_s,
            idempotency_window_s=settings.idempotency_window_s,
            state_max_items=settings.state_max_items,
        )
    from service.broker.redis import RedisBroker

    return RedisBroker.from_settings(settings)
