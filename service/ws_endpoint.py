"""GET /ws/transactions: one connection's life, in order: admit, upgrade, open, dispatch, close.

Session handles what the client sends (service/session.py), Connection what it is sent and
how it is closed (service/connection.py), ServerWebSocketResponse the frames (service/websocket.py).
"""

from __future__ import annotations

import secrets
import time

from aiohttp import WSMsgType, web

from service import keys, metrics
from service.auth import AuthError, Principal, query_value
from service.backend_errors import BackendUnavailable
from service.config import Settings
from service.connection import CLOSE_TIMEOUT_S, Connection
from service.http_errors import json_error as _json_error
from service.limits import client_ip
from service.log import get_logger
from service.presence import PresenceEntry
from service.protocol import CloseCode, close_label
from service.session import Session
from service.websocket import ServerWebSocketResponse

log = get_logger("eva_ws.ws_endpoint")


async def websocket(request: web.Request) -> web.StreamResponse:
    """Admit (origin, caps, token), upgrade, open, read until either side closes, close."""
    app = request.app
    settings = app[keys.SETTINGS]
    limits = app[keys.CONNECTION_LIMITS]
    conn_id = secrets.token_hex(16)
    # Kept for the socket's whole life, so only when a cap needs it.
    ip = client_ip(request, settings.client_ip_header) if limits.per_ip else ""
    principal = await _admit(request, conn_id, ip)
    if isinstance(principal, web.Response):
        return principal
    # Read before the upgrade, which drops the query (service/http_protocol.py, set_parser).
    reconnect = query_value(request, "reconnect") or "0"
    try:
        ws = await _upgrade(request, settings)
        if isinstance(ws, web.Response):
            return ws
        session = _open(request, ws, conn_id, principal, reconnecting=reconnect.isdigit() and int(reconnect) > 0)
        conn = session.connection
        # Presence lists the socket under the customers of the token it opened with, whatever
        # a refresh brings later: the remove names the same ones as the add.
        customers = principal.customer_ids
        try:
            await _add_presence(app, conn, customers)
            # The read loop runs in this coroutine, not in one it awaits: an idle socket keeps its
            # handler's coroutines alive for its whole life, so every extra level costs every socket.
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
            await _close(app, session, ws, customers)
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
            principal = await app[keys.VERIFIER].verify_request(request)
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


def _open(
    request: web.Request, ws: ServerWebSocketResponse, conn_id: str, principal: Principal, *, reconnecting: bool
) -> Session:
    """Register the upgraded socket (lifecycle, control plane, metrics) and log it; _close undoes it."""
    app = request.app
    settings = app[keys.SETTINGS]
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
        resume_budgets=app[keys.RESUME_BUDGETS],
        reconnecting=reconnecting,
    )
    app[keys.LIFECYCLE].connections.add(conn)
    app[keys.CONTROL].attach(session)
    metrics.CONNECTIONS_OPENED.inc()
    metrics.CONNECTIONS_ACTIVE.inc()
    # conn_id and user_id are passed to each line rather than bound to the task's context:
    # a binding costs every idle socket memory for lines that are rare.
    log.info("connection_opened", conn_id=conn_id, user_id=principal.user_id, customers=len(principal.customer_ids))
    return session


async def _add_presence(app: web.Application, conn: Connection, customers: tuple[str, ...]) -> None:
    try:
        entry = PresenceEntry(conn.conn_id, conn.principal.user_id, app[keys.SETTINGS].pod_id, time.time())
        await app[keys.PRESENCE].add(customers, entry)
    except BackendUnavailable as error:
        # The connection works without presence; the heartbeat writes the entry later.
        _presence_unavailable("add", error, conn)


async def _close(
    app: web.Application, session: Session, ws: ServerWebSocketResponse, customers: tuple[str, ...]
) -> None:
    """Undo _open once the read loop has ended, and record how and why the socket ended."""
    conn = session.connection
    app[keys.CONTROL].detach(session)
    await session.close()
    await conn.stop()
    app[keys.LIFECYCLE].connections.discard(conn)
    try:
        await app[keys.PRESENCE].remove(customers, conn.conn_id)
    except BackendUnavailable as error:
        # The entry dies with this pod's heartbeat at the latest.
        _presence_unavailable("remove", error, conn)
    code = CloseCode.ABNORMAL if conn.heartbeat_missed else int(conn.close_code or ws.close_code or CloseCode.ABNORMAL)
    reason = close_label(code, server_initiated=conn.close_code is not None)
    duration_s = time.monotonic() - conn.opened_at
    metrics.CONNECTIONS_ACTIVE.dec()
    metrics.DISCONNECTS.labels(reason).inc()
    metrics.CONNECTION_DURATION.observe(duration_s)
    log.info(
        "connection_closed",
        conn_id=conn.conn_id,
        user_id=conn.principal.user_id,
        code=code,
        reason=reason,
        duration_s=round(duration_s, 3),
    )


def _presence_unavailable(operation: str, error: BackendUnavailable, conn: Connection) -> None:
    metrics.PRESENCE_UNAVAILABLE.labels(operation).inc()
    log.warning(
        "presence_unavailable",
        conn_id=conn.conn_id,
        user_id=conn.principal.user_id,
        operation=operation,
        error=str(error),
    )


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


def _reject(reason: str, status: int, error: str, message: str) -> web.Response:
    metrics.HANDSHAKES_REJECTED.labels(reason).inc()
    log.info("handshake_rejected", reason=reason, status=status)
    return _json_error(status, error, message)


def _too_many(reason: str, what: str) -> web.Response:
    response = _reject(reason, 429, "too_many_connections", f"too many open connections for this {what}")
    # Clients that honour it back off instead of retrying in a tight loop.
    response.headers["Retry-After"] = "10"
    return response
