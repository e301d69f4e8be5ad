"""POST /api/v1/disconnect, /api/v1/revoke and /api/v1/unsubscribe: control commands for tokens with the role `admin`.

Each answers 202 once the command is published on the control channel (every pod applies
it within the broker's delivery latency; see service/control.py), 400 for a body it cannot
take, 401 without a valid token, 403 for a token without the admin role, and 503 when the
broker (or the revocation store) cannot take the command now: retrying is safe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from service import keys, metrics
from service.auth import MAX_JTI_LENGTH, AuthError, Principal, token_from_request
from service.backend_errors import BackendUnavailable
from service.control_commands import Command, Disconnect, Revoke, Unsubscribe, check_reason, command_name, target
from service.http_errors import json_error
from service.log import get_logger
from service.protocol import ProtocolError, is_valid_id, parse_client_message
from service.revocations import Revocation

log = get_logger("eva_ws.control_api")

DEFAULT_DISCONNECT_REASON: Final = "disconnected by an operator"
DEFAULT_UNSUBSCRIBE_REASON: Final = "ended by an operator"


class _Refused(Exception):
    """The request is refused with this JSON error."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.response = json_error(status, error, message)
        self.outcome = error


async def disconnect(request: web.Request) -> web.Response:
    """Close every socket of `userId` on every pod with 4003."""

    def command(body: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
        _only(body, {"userId", "reason"})
        user_id = _user_id(body)
        reason = _reason(body, DEFAULT_DISCONNECT_REASON)
        return Disconnect(user_id, reason), {"userId": user_id, "disconnected": True}

    return await _handle(request, "disconnect", command)


async def revoke(request: web.Request) -> web.Response:
    """Refuse the tokens of `userId` issued before `issuedBefore`, or the token `jti`, on every pod."""
    leeway_s = request.app[keys.SETTINGS].jwt_leeway_s

    def command(body: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
        if "jti" in body:
            _only(body, {"jti"})
            jti = body["jti"]
            if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH:
                raise _Refused(400, "invalid_request", f"jti must be a string of 1 to {MAX_JTI_LENGTH} characters")
            return Revoke(Revocation.of_token(jti, leeway_s=leeway_s)), {"jti": jti, "revoked": True}
        _only(body, {"userId", "issuedBefore"})
        user_id = _user_id(body)
        before = body.get("issuedBefore")
        if not isinstance(before, int) or isinstance(before, bool) or before < 0:
            raise _Refused(400, "invalid_request", "issuedBefore must be a whole number of unix seconds")
        # A time ahead of the clocks would also revoke tokens not issued yet.
        if before > time.time() + leeway_s:
            raise _Refused(400, "invalid_request", "issuedBefore must not be in the future")
        revocation = Revocation.of_user(user_id, before, leeway_s=leeway_s)
        return Revoke(revocation), {"userId": user_id, "issuedBefore": before, "revoked": True}

    return await _handle(request, "revoke", command)


async def unsubscribe(request: web.Request) -> web.Response:
    """End the matching subscriptions of `userId` on every pod; its clients get `unsubscribed` with a reason."""

    def command(body: dict[str, Any]) -> tuple[Command, dict[str, Any]]:
        _only(body, {"userId", "channel", "filters", "reason"})
        user_id = _user_id(body)
        reason = _reason(body, DEFAULT_UNSUBSCRIBE_REASON)
        try:
            # The client protocol's own rules for a channel and its filters.
            message = parse_client_message(
                orjson.dumps(
                    {"type": "unsubscribe", "channel": body.get("channel"), "filters": body.get("filters")}
                ).decode()
            )
        except ProtocolError as error:
            raise _Refused(400, "invalid_request", error.message) from None
        assert message.channel is not None
        answer = {
            "userId": user_id,
            "channel": message.channel.value,
            "filters": message.filters.to_json(),
            "unsubscribed": True,
        }
        return Unsubscribe(user_id, message.channel, message.filters, reason), answer

    return await _handle(request, "unsubscribe", command)


Build = Callable[[dict[str, Any]], tuple[Command, dict[str, Any]]]
"""Turns a request body into the command and the 202 answer; raises _Refused."""


async def _handle(request: web.Request, name: str, build: Build) -> web.Response:
    try:
        admin = await _admin(request)
        body = await _body(request)
        command, answer = build(body)
    except _Refused as refused:
        metrics.CONTROL_REQUESTS.labels(name, refused.outcome).inc()
        return refused.response
    try:
        await request.app[keys.CONTROL].send(command, requested_by=admin.user_id)
    except BackendUnavailable as error:
        metrics.CONTROL_REQUESTS.labels(name, "unavailable").inc()
        log.warning("control_request_failed", command=name, requested_by=admin.user_id, error=str(error))
        return json_error(503, "unavailable", "the broker is unavailable; retry with backoff")
    metrics.CONTROL_REQUESTS.labels(name, "accepted").inc()
    log.info("control_requested", command=command_name(command), requested_by=admin.user_id, target=target(command))
    return web.json_response(answer, status=202)


async def _admin(request: web.Request) -> Principal:
    token = token_from_request(request)
    if token is None:
        raise _Refused(401, "unauthorized", "a token is required (Authorization: Bearer)")
    try:
        principal = await request.app[keys.VERIFIER].verify(token)
    except AuthError as error:
        raise _Refused(401, error.error, error.message) from None
    if not principal.is_admin:
        raise _Refused(403, "forbidden", "the token needs the admin role")
    return principal


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        # The handshake timeout bounds the headers only; a trickled body is bounded here.
        async with asyncio.timeout(request.app[keys.SETTINGS].handshake_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise _Refused(408, "request_timeout", "the request body did not arrive in time") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Refused(400, "invalid_json", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Refused(400, "invalid_request", "body must be a JSON object")
    return body


def _only(body: dict[str, Any], fields: set[str]) -> None:
    unknown = set(body) - fields
    if unknown:
        raise _Refused(400, "invalid_request", f"unknown field {sorted(unknown)[0][:64]!r}")


def _user_id(body: dict[str, Any]) -> str:
    user_id = body.get("userId")
    if not is_valid_id(user_id):
        raise _Refused(400, "invalid_request", "userId is required and must be a valid id")
    return str(user_id)


def _reason(body: dict[str, Any], default: str) -> str:
    try:
        return check_reason(body.get("reason"), default)
    except ValueError as error:
        raise _Refused(400, "invalid_request", str(error)) from None
