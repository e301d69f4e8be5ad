"""Builds the aiohttp application: routes, state and the life of every resource."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from importlib import resources
from typing import Final

import aiohttp_cors
from aiohttp import hdrs, web

from service import (
    control_api,
    handlers,
    http_errors,
    inspect_api,
    keys,
    loop_health,
    ops,
    transactions_api,
    ws_endpoint,
)
from service.auth import TokenVerifier
from service.backends import create_broker, create_connection_counter, create_presence, create_revocation_store
from service.broker.base import Broker
from service.config import Settings
from service.connection import Flusher
from service.control import ControlPlane
from service.deadlines import Deadlines
from service.demo import demo_publisher_ctx
from service.hub import Hub
from service.jwks import JwksClient
from service.limits import ConnectionCounter, ConnectionLimits
from service.log import get_logger
from service.outbox_relay import OutboxRelay
from service.presence import Presence
from service.presence_events import AnnouncingPresence
from service.protocol import CloseCode
from service.publisher import Publisher
from service.rebalance import rebalance_ctx
from service.resume_budget import ResumeBudgets
from service.revocations import RevocationStore, RevokedTokens

log = get_logger("eva_ws.app")

# HTTP bodies (publish batches) above this get 413 before they are read.
MAX_REQUEST_BYTES: Final = 1024 * 1024
STATIC_DIR: Final = resources.files("service") / "static"


def create_app(
    settings: Settings,
    *,
    broker: Broker | None = None,
    presence: Presence | None = None,
    connection_counter: ConnectionCounter | None = None,
    revocation_store: RevocationStore | None = None,
) -> web.Application:
    """The whole service; `broker`, `presence`, `connection_counter` and `revocation_store` default to what
    the settings select."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[http_errors.json_errors])
    app[keys.SETTINGS] = settings
    jwks = None
    if settings.jwks_url is not None:
        jwks = app[keys.JWKS] = JwksClient(
            settings.jwks_url, cooldown_s=settings.jwks_cooldown_s, max_age_s=settings.jwks_max_age_s
        )
        app.cleanup_ctx.append(_jwks_ctx)
    revoked = RevokedTokens()
    app[keys.VERIFIER] = TokenVerifier(settings, jwks=jwks, revoked=revoked)
    app[keys.CONNECTION_LIMITS] = ConnectionLimits(
        connection_counter or create_connection_counter(settings),
        per_user=settings.max_connections_per_user,
        per_ip=settings.max_connections_per_ip,
    )
    app[keys.LIFECYCLE] = keys.Lifecycle()
    app[keys.FLUSHER] = Flusher(window_s=settings.write_window_ms / 1000)
    app[keys.DEADLINES] = Deadlines()
    app[keys.RESUME_BUDGETS] = ResumeBudgets(
        events_per_s=settings.resume_events_per_user_s, burst=settings.resume_events_per_user_burst
    )
    app[keys.BROKER] = broker or create_broker(settings)
    app[keys.HUB] = Hub(app[keys.BROKER])
    # Announces each socket's opens and closes to the subscribers that asked (presence_join / presence_leave).
    app[keys.PRESENCE] = AnnouncingPresence(
        presence or create_presence(settings), app[keys.BROKER], watched_here=app[keys.HUB].listens
    )
    app[keys.CONTROL] = ControlPlane(
        app[keys.BROKER], app[keys.HUB], store=revocation_store or create_revocation_store(settings), revoked=revoked
    )
    app[keys.PUBLISHER] = Publisher(app[keys.BROKER])

    app.router.add_get("/ws/transactions", ws_endpoint.websocket)
    api = [
        app.router.add_post("/api/v1/publish", handlers.publish),
        app.router.add_get("/api/v1/presence/{customer_id}", handlers.presence),
        app.router.add_get("/api/v1/transactions/{customer_id}", transactions_api.transactions),
        app.router.add_post("/api/v1/disconnect", control_api.disconnect),
        app.router.add_post("/api/v1/revoke", control_api.revoke),
        app.router.add_post("/api/v1/unsubscribe", control_api.unsubscribe),
        *inspect_api.add_routes(app),
    ]
    if not settings.ops_port:
        ops.add_routes(app)
    if settings.mode == "development":
        app.router.add_get("/dev/token", handlers.dev_token)
    app.router.add_get("/", _index)
    # Pages of other allowed origins may import the client from here (CORS below).
    static = app.router.add_static("/static", str(STATIC_DIR))

    origins = settings.effective_cors_origins
    if origins:
        cors = aiohttp_cors.setup(
            app,
            defaults={
                origin: aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
                    allow_headers=("Authorization", "Content-Type"), max_age=600
                )
                for origin in origins
            },
        )
        for route in api:
            cors.add(route)
        cors.add(static)
        app.on_response_prepare.append(_vary_static_on_origin)

    app.cleanup_ctx.append(_loop_health_ctx)
    app.cleanup_ctx.append(_deadlines_ctx)
    app.cleanup_ctx.append(_broker_ctx)
    app.cleanup_ctx.append(_control_ctx)
    app.cleanup_ctx.append(_outbox_relay_ctx)
    app.cleanup_ctx.append(inspect_api.connections_query_ctx)
    app.cleanup_ctx.append(demo_publisher_ctx)
    app.cleanup_ctx.append(rebalance_ctx)
    app.on_shutdown.append(_close_remaining_sockets)
    return app


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(str(STATIC_DIR / "index.html"))


async def _vary_static_on_origin(request: web.Request, response: web.StreamResponse) -> None:
    # With CORS the answer depends on Origin: a shared cache must not hand one origin's to another.
    if request.path.startswith("/static/"):
        response.headers.add(hdrs.VARY, "Origin")


async def _jwks_ctx(app: web.Application) -> AsyncIterator[None]:
    jwks = app[keys.JWKS]
    # A failed first fetch is logged and retried on demand: the pod still starts.
    await jwks.start()
    yield
    await jwks.close()


async def _loop_health_ctx(app: web.Application) -> AsyncIterator[None]:
    async with loop_health.watching():
        yield


async def _deadlines_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    app[keys.DEADLINES].close()


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    broker, presence, hub = app[keys.BROKER], app[keys.PRESENCE], app[keys.HUB]
    await broker.start()
    await presence.start()
    log.info("broker_started", kind=type(broker).__name__)
    yield
    await hub.close()
    await presence.close()
    await broker.close()
    await app[keys.CONNECTION_LIMITS].counter.close()


async def _control_ctx(app: web.Application) -> AsyncIterator[None]:
    control = app[keys.CONTROL]
    await control.start()
    yield
    await control.close()


async def _outbox_relay_ctx(app: web.Application) -> AsyncIterator[None]:
    # With EVA_WS_OUTBOX_DSN, every pod relays the outbox's committed rows through its broker.
    settings = app[keys.SETTINGS]
    if settings.outbox_dsn is None:
        yield
        return
    relay = app[keys.OUTBOX_RELAY] = OutboxRelay.from_settings(settings, app[keys.PUBLISHER])
    relay.start()
    yield
    await relay.close()


async def _close_remaining_sockets(app: web.Application) -> None:
    # Normally the drain has closed them already with 1012; this covers a direct stop.
    connections = list(app[keys.LIFECYCLE].connections)
    await asyncio.gather(*(c.close(CloseCode.GOING_AWAY, "server shutdown") for c in connections))
