"""What operators can inspect: GET /api/v1/channels, /api/v1/connections and the OpenAPI document."""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Final

import orjson
from aiohttp import web

from service import keys
from service.auth import AuthError, Principal, token_from_request
from service.broker.base import BrokerUnavailable
from service.connections_query import ConnectionsQuery, Query, QueryUnavailable
from service.http_errors import json_error
from service.log import get_logger
from service.protocol import channel_of_key, is_valid_id, iso_utc

log = get_logger("eva_ws.inspect_api")

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000


def add_routes(app: web.Application) -> list[web.AbstractRoute]:
    """Register the endpoints (after the broker and hub are set); returns the routes that take CORS."""
    app[keys.CONNECTIONS_QUERY] = ConnectionsQuery(
        broker=app[keys.BROKER],
        hub=app[keys.HUB],
        connections=app[keys.LIFECYCLE].connections,
        pod_id=app[keys.SETTINGS].pod_id,
    )
    return [
        app.router.add_get("/api/v1/openapi.json", openapi),
        app.router.add_get("/api/v1/channels", channels),
        app.router.add_get("/api/v1/connections", connections),
    ]


@functools.cache
def _openapi_document() -> bytes:
    return (resources.files("service") / "openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json: the HTTP API as OpenAPI 3.1 (docs/openapi.json); public, like the source."""
    return web.Response(body=_openapi_document(), content_type="application/json")


async def _admin(request: web.Request) -> Principal | web.Response:
    """The verified admin, or the 401 or 403 to answer."""
    token = token_from_request(request)
    if token is None:
        return json_error(401, "unauthorized", "a token is required (Authorization: Bearer)")
    try:
        principal = await request.app[keys.VERIFIER].verify(token)
    except AuthError as error:
        return json_error(401, error.error, error.message)
    if not principal.is_admin:
        return json_error(403, "forbidden", "the token needs the admin role")
    return principal


async def channels(request: web.Request) -> web.Response:
    """GET /api/v1/channels: this pod's channels with at least one subscriber, and how many each has."""
    principal = await _admin(request)
    if isinstance(principal, web.Response):
        return principal
    counts = request.app[keys.HUB].subscriber_counts()
    listed = [
        {"channel": channel_of_key(key).value, "subscription": key, "subscribers": count}
        for key, count in sorted(counts.items())
    ]
    log.info("channels_inspected", user_id=principal.user_id, channels=len(listed))
    return web.json_response(
        {
            "podId": request.app[keys.SETTINGS].pod_id,
            "count": len(listed),
            "subscribers": sum(counts.values()),
            "channels": listed,
        }
    )


async def connections(request: web.Request) -> web.Response:
    """GET /api/v1/connections?userId= or ?customerId=: the matching sockets of every pod, a page at a time."""
    principal = await _admin(request)
    if isinstance(principal, web.Response):
        return principal
    params = request.query
    user_id, customer_id = params.get("userId"), params.get("customerId")
    if (user_id is None) == (customer_id is None):
        return json_error(400, "invalid_query", "give exactly one of userId and customerId")
    if not is_valid_id(user_id if customer_id is None else customer_id):
        return json_error(400, "invalid_query", "not a valid user or customer id")
    limit_text = params.get("limit", str(DEFAULT_PAGE_SIZE))
    if not limit_text.isdigit() or not 0 < int(limit_text) <= MAX_PAGE_SIZE:
        return json_error(400, "invalid_query", f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
    try:
        after = _parse_cursor(params.get("cursor"))
    except ValueError:
        return json_error(400, "invalid_cursor", "cursor is not one this API returned")
    query = Query(user_id=user_id, customer_id=customer_id)
    expected: list[str] = []
    if customer_id is not None:
        # Without presence every pod is still asked; the answer waits for those it cannot name.
        with contextlib.suppress(BrokerUnavailable):
            expected = [entry.pod_id for entry in await request.app[keys.PRESENCE].list(customer_id)]
    try:
        sockets, pods = await request.app[keys.CONNECTIONS_QUERY].ask(query, expected_pods=expected)
    except QueryUnavailable as error:
        log.warning("connections_unavailable", error=str(error))
        return json_error(503, "unavailable", "the pods cannot be asked right now; retry")
    sockets.sort(key=_order)
    if after is not None:
        sockets = [s for s in sockets if _order(s) > after]
    limit = int(limit_text)
    page, more = sockets[:limit], len(sockets) > limit
    log.info("connections_inspected", user_id=principal.user_id, found=len(sockets), pods=len(pods))
    return web.json_response(
        {
            **query.json(),
            "pods": pods,
            "connections": [{**s, "connectedAt": iso_utc(s["connectedAt"])} for s in page],
            "nextCursor": _cursor(_order(page[-1])) if more else None,
        }
    )


def _order(socket: dict[str, Any]) -> tuple[float, str]:
    return (float(socket["connectedAt"]), str(socket["connId"]))


def _cursor(position: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


def _parse_cursor(text: str | None) -> tuple[float, str] | None:
    """The position after which the page starts; None for the first page; ValueError if unreadable."""
    if text is None:
        return None
    try:
        at, conn_id = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, orjson.JSONDecodeError, TypeError):
        raise ValueError("unreadable cursor") from None
    if not isinstance(at, int | float) or isinstance(at, bool) or not isinstance(conn_id, str):
        raise ValueError("unreadable cursor")
    return (float(at), conn_id)


async def connections_query_ctx(app: web.Application) -> AsyncIterator[None]:
    """Answer other pods' queries while the app runs; after the broker has started."""
    async with app[keys.CONNECTIONS_QUERY].running():
        yield
