"""HTTP and WebSocket endpoints: /ws/transactions, /api/v1/publish, /api/v1/presence, /dev/token."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from service import keys, metrics
from service.auth import AuthError, Principal, mint_token, query_value, token_from_request
from service.broker.base import BrokerUnavailable
from service.config import Settings
from service.connection import CLOSE_TIMEOUT_S, Connection
from service.http_errors import json_error as _json_error
from service.limits import client_ip
from service.log import get_logger
from service.presence import PresenceEntry
from service.protocol import CloseCode, close_label, is_valid_id, iso_utc
from service.publisher import InvalidEvent, PreparedEvent, prepare_event_object
from service.session import Session
from service.websocket import ServerWebSocketResponse

log = get_logger("eva_ws.handlers")

MAX_PUBLISH_BATCH: Final = 1000
DEV_USER: Final = "demo-user"
DEV_CUSTOMERS: Final = ("CUST-001", "CUST-002", "CUST-003")


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Exact match of scheme://host[:port]; no Origin header means a non-browser client."""
    if origin is None:
        return True
    return "*" in allowed or origin.lower() in allowed


def _stated_origin(request: web.Request) -> str | None:
    """The Origin header, else `?origin=`: a page's fetch to its own origin carries no Origin.

    A page whose socket was refused asks the same URL over plain HTTP, naming its origin, to
    learn why (the dashboard does). Naming an origin can only get a request refused: one
    with neither is allowed anyway, as a non-browser client.
    """
    origin = request.headers.get("Origin")
    return query_value(request, "origin") if origin is None else origin


async def _authenticate(request: web.Request) -> Principal:
    token = token_from_request(request)
    if token is None:
        raise AuthError("missing", "a token is required (?token= or Authorization: Bearer)")
    return await request.app[keys.VERIFIER].verify(token)


def _reject(reason: str, status: int, error: str, message: str) -> web.Response:
    metrics.HANDSHAKES_REJECTED.labels(reason).inc()
    log.info("handshake_rejected", reason=reason, status=status)
    return _json_error(status, error, message)


def _too_many(reason: str, what: str) -> web.Response:
    response = _reject(reason, 429, "too_many_connections", f"too many open connections for this {what}")
    # Clients that honour it back off instead of retrying in a tight loop.
    response.headers["Retry-After"] = "10"
    return response


async def websocket(request: web.Request) -> web.StreamResponse:
    """Authenticate and apply the connection caps, then upgrade; the socket lives until either side closes it."""
    app = request.app
    settings = app[keys.SETTINGS]
    lifecycle = app[keys.LIFECYCLE]
    limits = app[keys.CONNECTION_LIMITS]
    conn_id = secrets.token_hex(16)
    # Kept for the socket's whole life, so only when a cap needs it.
    ip = client_ip(request, settings.client_ip_header) if limits.per_ip else ""
    principal = await _admit(request, conn_id, ip)
    if isinstance(principal, web.Response):
        return principal
    # Read before the upgrade, which drops the query (service/http_protocol.py, set_parser).
    reconnect = query_value(request, "reconnect") or "0"
    # The read loop runs in this coroutine, not in one it awaits: an idle socket keeps its
    # handler's coroutines alive for its whole life, so every extra level costs every socket.
    try:
        upgraded = await _upgrade(request, settings)
        if isinstance(upgraded, web.Response):
            return upgraded
        ws = upgraded
        conn = Connection(
            ws,
            conn_id=conn_id,
            principal=principal,
            send_queue_size=settings.send_queue_size,
            transport=request.transport,
            stream=request.writer,
            flusher=app[keys.FLUSHER],
            deadlines=app[keys.DEADLINES],
            heartbeat_s=settings.heartbeat_s,
        )
        session = Session(
            conn,
            hub=app[keys.HUB],
            verifier=app[keys.VERIFIER],
            settings=settings,
            deadlines=app[keys.DEADLINES],
            reconnecting=reconnect.isdigit() and int(reconnect) > 0,
        )
        lifecycle.connections.add(conn)
        control = app[keys.CONTROL]
        control.attach(session)
        metrics.CONNECTIONS_OPENED.inc()
        metrics.CONNECTIONS_ACTIVE.inc()
        customers = principal.customer_ids
        presence = app[keys.PRESENCE]
        # conn_id and user_id are passed to each line rather than bound to the task's context:
        # a binding costs every idle socket memory for lines that are rare.
        log.info("connection_opened", conn_id=conn_id, user_id=principal.user_id, customers=len(customers))
        try:
            try:
                entry = PresenceEntry(conn_id, principal.user_id, settings.pod_id, time.time())
                await presence.add(customers, entry)
            except BrokerUnavailable as error:
                # The connection works without presence; the heartbeat writes the entry later.
                _presence_unavailable("add", error, conn)
            while True:
                message = await ws.receive()
                conn.heard()
                if message.type is WSMsgType.TEXT:
                    await session.on_text(message.data)
                elif message.type is WSMsgType.BINARY:
                    session.on_binary()
                elif message.type is WSMsgType.PING:
                    await session.on_ping(message.data)
                elif message.type is not WSMsgType.PONG:
                    # CLOSE (answered by aiohttp), CLOSING, CLOSED, or ERROR: a protocol
                    # violation for which aiohttp already sent the close frame.
                    break
        finally:
            control.detach(session)
            await session.close()
            await conn.stop()
            lifecycle.connections.discard(conn)
            try:
                await presence.remove(customers, conn.conn_id)
            except BrokerUnavailable as error:
                # The entry dies with this pod's heartbeat at the latest.
                _presence_unavailable("remove", error, conn)
            code = (
                CloseCode.ABNORMAL
                if conn.heartbeat_missed
                else int(conn.close_code or ws.close_code or CloseCode.ABNORMAL)
            )
            reason = close_label(code, server_initiated=conn.close_code is not None)
            duration_s = time.monotonic() - conn.opened_at
            metrics.CONNECTIONS_ACTIVE.dec()
            metrics.DISCONNECTS.labels(reason).inc()
            metrics.CONNECTION_DURATION.observe(duration_s)
            log.info(
                "connection_closed",
                conn_id=conn_id,
                user_id=principal.user_id,
                code=code,
                reason=reason,
                duration_s=round(duration_s, 3),
            )
        return ws
    finally:
        await limits.release(conn_id, ip=ip, user_id=principal.user_id)


async def _admit(request: web.Request, conn_id: str, ip: str) -> Principal | web.Response:
    """The verified user, with the socket's slots under the caps taken; or a refusal."""
    app = request.app
    settings = app[keys.SETTINGS]
    if app[keys.LIFECYCLE].draining:
        return _reject("draining", 503, "draining", "this pod is shutting down; reconnect")
    if not origin_allowed(_stated_origin(request), settings.allowed_origins):
        return _reject("origin", 403, "forbidden_origin", "this Origin is not allowed")
    limits = app[keys.CONNECTION_LIMITS]
    # Before the token check: a flood from one address is refused without spending CPU on signatures.
    if not await limits.acquire_ip(conn_id, ip):
        return _too_many("ip_connection_limit", "address")
    admitted = False
    try:
        try:
            principal = await _authenticate(request)
        except AuthError as error:
            return _reject(f"token_{error.reason}", 401, error.error, error.message)
        if not await limits.acquire_user(conn_id, principal.user_id):
            return _too_many("user_connection_limit", "user")
        admitted = True
        return principal
    finally:
        if not admitted:
            await limits.release(conn_id, ip=ip, user_id=None)


async def _upgrade(request: web.Request, settings: Settings) -> ServerWebSocketResponse | web.Response:
    """The WebSocket handshake, or a refusal of a request that is not a version 13 upgrade."""
    ws = ServerWebSocketResponse(
        # The heartbeat runs on the pod's one timer (see Connection), not on two per socket.
        heartbeat=None,
        max_msg_size=settings.max_message_bytes,
        # Compression costs ~256 KiB per socket, forbids sharing one frame across clients
        # and opens the door to decompression bombs: never negotiated.
        compress=False,
        # Control frames from the client go through the read loop, so pings count against
        # the rate limit instead of being answered without limit.
        autoping=False,
        timeout=CLOSE_TIMEOUT_S,
    )
    if request.headers.get("Sec-WebSocket-Version", "").strip() != "13":
        if not ws.can_prepare(request).ok:
            return _not_websocket()
        # aiohttp also speaks the hybi-08 draft; RFC 6455 §4.4 answers 426 with the version we speak.
        response = _reject("websocket_version", 426, "upgrade_required", "only WebSocket version 13 is supported")
        response.headers["Sec-WebSocket-Version"] = "13"
        return response
    try:
        # Checks the rest of the upgrade request before it writes anything.
        await ws.prepare(request)
    except web.HTTPBadRequest:
        return _not_websocket()
    # The 101 response is on the wire: its headers would otherwise stay with the socket
    # for its whole life.
    ws.headers.clear()
    return ws


def _not_websocket() -> web.Response:
    return _reject("not_websocket", 400, "bad_request", "expected a WebSocket upgrade request")


def _presence_unavailable(operation: str, error: BrokerUnavailable, conn: Connection | None = None) -> None:
    metrics.PRESENCE_UNAVAILABLE.labels(operation).inc()
    if conn is None:
        log.warning("presence_unavailable", operation=operation, error=str(error))
    else:
        log.warning(
            "presence_unavailable",
            conn_id=conn.conn_id,
            user_id=conn.principal.user_id,
            operation=operation,
            error=str(error),
        )


async def publish(request: web.Request) -> web.Response:
    """POST /api/v1/publish: one event object, or {"events": [...]}; role `publisher`."""
    try:
        principal = await _authenticate(request)
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
    try:
        events = [_prepare(item, index) for index, item in enumerate(items)]
    except InvalidEvent as error:
        metrics.PUBLISHED.labels("invalid").inc()
        return _json_error(400, "invalid_event", str(error))
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
    return web.json_response(results[0] if single else {"events": results}, status=202)


def _prepare(item: Any, index: int) -> PreparedEvent:
    try:
        return prepare_event_object(item)
    except InvalidEvent as error:
        raise InvalidEvent(f"{'' if index == 0 else f'events[{index}]: '}{error}") from None


async def presence(request: web.Request) -> web.Response:
    """GET /api/v1/presence/{customerId}: who is online for a customer, and on which pod."""
    try:
        principal = await _authenticate(request)
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
        _presence_unavailable("list", error)
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
