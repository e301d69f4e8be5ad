"""HTTP endpoints: /api/v1/publish, /api/v1/presence, /dev/token (the WebSocket is in ws_endpoint.py)."""

from __future__ import annotations

import asyncio
from typing import Final

import orjson
from aiohttp import web

from service import keys, metrics
from service.auth import AuthError, mint_token
from service.broker.base import BrokerUnavailable
from service.http_errors import json_error as _json_error
from service.log import get_logger
from service.protocol import is_valid_id, iso_utc
from service.publisher import InvalidEvent, PreparedEvent, prepare_event_object

log = get_logger("eva_ws.handlers")

MAX_PUBLISH_BATCH: Final = 1000
DEV_USER: Final = "demo-user"
DEV_CUSTOMERS: Final = ("CUST-001", "CUST-002", "CUST-003")


async def publish(request: web.Request) -> web.Response:
    """POST /api/v1/publish: one event object, or {"events": [...]}; role `publisher`."""
    try:
        principal = await request.app[keys.VERIFIER].verify_request(request)
    except AuthError as error:
        return _json_error(401, error.error, error.message)
    if not principal.is_publisher:
        return _json_error(403, "forbidden", "the token needs the publisher role")
    try:
        # The handshake timeout bounds the headers only; a trickled body is bounded here.
        async with asyncio.timeout(request.app[keys.SETTINGS].handshake_timeout_s):
            raw = await request.read()
    except TimeoutError:
        return _json_error(408, "request_timeout", "the request body did not arrive in time")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _json_error(400, "invalid_json", "body is not valid JSON")
    single = isinstance(body, dict) and "events" not in body
    items = [body] if single else body.get("events") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 0 < len(items) <= MAX_PUBLISH_BATCH:
        return _json_error(400, "invalid_event", f"send an event object or {{'events': [1..{MAX_PUBLISH_BATCH}]}}")
    events: list[PreparedEvent] = []
    try:
        for item in items:
            events.append(prepare_event_object(item))
    except InvalidEvent as error:
        metrics.PUBLISHED.labels("invalid").inc()
        # The refused event is the one after those prepared.
        where = f"events[{len(events)}]: " if events else ""
        return _json_error(400, "invalid_event", f"{where}{error}")
    try:
        published = await request.app[keys.PUBLISHER].publish_prepared(events)
    except BrokerUnavailable as error:
        log.warning("publish_failed", error=str(error))
        return _json_error(503, "unavailable", "the broker is unavailable; retry with backoff")
    results = [
        {
            "correlationId": p.correlation_id,
            "subscription": p.subscription,
            "offset": p.position.offset,
            "epoch": p.position.epoch,
            "duplicate": p.position.duplicate,
        }
        for p in published
    ]
    # orjson: the standard library's encoder cost more per event than the rest of the answer.
    body = orjson.dumps(results[0] if single else {"events": results})
    return web.Response(body=body, status=202, content_type="application/json")


async def presence(request: web.Request) -> web.Response:
    """GET /api/v1/presence/{customerId}: who is online for a customer, and on which pod."""
    try:
        principal = await request.app[keys.VERIFIER].verify_request(request)
    except AuthError as error:
        return _json_error(401, error.error, error.message)
    customer_id = request.match_info["customer_id"]
    if not is_valid_id(customer_id):
        return _json_error(400, "invalid_customer", "not a valid customer id")
    # Backends that publish for every customer may see who is online for any of them.
    if not (principal.is_publisher or principal.can_see_customer(customer_id)):
        return _json_error(403, "forbidden", "not allowed to see this customer")
    try:
        entries = await request.app[keys.PRESENCE].list(customer_id)
    except BrokerUnavailable as error:
        metrics.PRESENCE_UNAVAILABLE.labels("list").inc()
        log.warning("presence_unavailable", operation="list", error=str(error))
        return _json_error(503, "unavailable", "presence is unavailable; retry")
    return web.json_response(
        {
            "customerId": customer_id,
            "count": len(entries),
            "connections": [
                {"connId": e.conn_id, "userId": e.user_id, "podId": e.pod_id, "connectedAt": iso_utc(e.connected_at)}
                for e in entries
            ],
        }
    )


async def dev_token(request: web.Request) -> web.Response:
    """Development mode only: a short-lived token for the demo page."""
    customer = request.query.get("customer", DEV_CUSTOMERS[0])
    if customer not in DEV_CUSTOMERS:
        return _json_error(400, "invalid_customer", f"demo customers are {', '.join(DEV_CUSTOMERS)}")
    token = mint_token(request.app[keys.SETTINGS], sub=DEV_USER, customers=list(DEV_CUSTOMERS), ttl_s=3600)
    return web.json_response({"token": token, "userId": DEV_USER, "customerIds": list(DEV_CUSTOMERS)})
