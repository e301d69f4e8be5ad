"""Every piece of application state, as typed `web.AppKey`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from service.auth import TokenVerifier
from service.broker.base import Broker
from service.config import Settings
from service.connection import Connection, Flusher
from service.connections_query import ConnectionsQuery
from service.control import ControlPlane
from service.deadlines import Deadlines
from service.hub import Hub
from service.jwks import JwksClient
from service.limits import ConnectionLimits
from service.outbox_relay import OutboxRelay
from service.presence import Presence
from service.publisher import Publisher
from service.resume_budget import ResumeBudgets


@dataclass(slots=True)
class Lifecycle:
    """Whether the pod takes new work; flipped once on SIGTERM."""

    draining: bool = False
    connections: set[Connection] = field(default_factory=set)


SETTINGS: Final = web.AppKey("settings", Settings)
VERIFIER: Final = web.AppKey("verifier", TokenVerifier)
BROKER: Final = web.AppKey("broker", Broker)
HUB: Final = web.AppKey("hub", Hub)
PUBLISHER: Final = web.AppKey("publisher", Publisher)
PRESENCE: Final = web.AppKey("presence", Presence)
CONTROL: Final = web.AppKey("control", ControlPlane)
LIFECYCLE: Final = web.AppKey("lifecycle", Lifecycle)
FLUSHER: Final = web.AppKey("flusher", Flusher)
DEADLINES: Final = web.AppKey("deadlines", Deadlines)
RESUME_BUDGETS: Final = web.AppKey("resume_budgets", ResumeBudgets)
CONNECTION_LIMITS: Final = web.AppKey("connection_limits", ConnectionLimits)
CONNECTIONS_QUERY: Final = web.AppKey("connections_query", ConnectionsQuery)
# Present only when EVA_WS_JWKS_URL is set.
JWKS: Final = web.AppKey("jwks", JwksClient)
# Present only when EVA_WS_OUTBOX_DSN is set.
OUTBOX_RELAY: Final = web.AppKey("outbox_relay", OutboxRelay)
