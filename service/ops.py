"""Health, readiness and Prometheus metrics endpoints."""

from __future__ import annotations

from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import keys, metrics


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


def _served_app(request: web.Request) -> web.Application:
    # On a separate ops port the handlers run in a small app that points at the real one.
    return request.app.get(OPS_TARGET) or request.app


async def readyz(request: web.Request) -> web.Response:
    """Ready to take connections: not draining and the broker's live delivery can be trusted."""
    app = _served_app(request)
    reasons: list[str] = []
    if app[keys.LIFECYCLE].draining:
        reasons.append("draining")
    broker_reasons = app[keys.BROKER].not_ready_reasons()
    reasons.extend(broker_reasons)
    metrics.BROKER_READY.set(0 if broker_reasons else 1)
    if reasons:
        return web.json_response({"status": "not_ready", "reasons": reasons}, status=503)
    body = {"status": "ready", "pod": app[keys.SETTINGS].pod_id}
    relay = app.get(keys.OUTBOX_RELAY)
    if relay is not None:
        # Reported, not gating: sockets are served while PostgreSQL is down, and rows wait in the outbox.
        body["outbox"] = "relaying" if relay.ready else "unavailable"
    return web.json_response(body)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = generate_latest(metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


OPS_TARGET: Final = web.AppKey("ops_target", web.Application)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)


def create_ops_app(target: web.Application) -> web.Application:
    """The endpoints of an internal ops port (EVA_WS_OPS_PORT), reporting on `target`."""
    ops = web.Application()
    ops[OPS_TARGET] = target
    add_routes(ops)
    return ops
