"""Every HTTP error as JSON `{"error", "message"}`, including those aiohttp would answer in plain text."""

from __future__ import annotations

from collections.abc import Awaitable
from http import HTTPStatus
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

# The `error` word of the statuses aiohttp itself answers (router, body limit, parser, timeouts).
# Messages never quote the request: aiohttp's texts do, and a request line may carry a token.
_ERRORS: Final = {
    400: ("bad_request", "the request is not valid HTTP"),
    404: ("not_found", "no such resource"),
    405: ("method_not_allowed", "this method is not allowed here; see the Allow header"),
    408: ("request_timeout", "the request did not arrive in time"),
    413: ("payload_too_large", "the request body is too large"),
    431: ("request_header_fields_too_large", "the request line and headers are too large"),
    500: ("internal_error", "the server failed to handle this request"),
    504: ("timeout", "the server did not answer in time"),
}
# The headers of aiohttp's error that still apply to the JSON reply (Allow on 405, for instance).
_BODY_HEADERS: Final = frozenset({"content-type", "content-length", "content-encoding"})


def json_error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


def standard_error(status: int) -> web.Response:
    """The JSON reply for a status aiohttp produces on its own."""
    error, message = _ERRORS.get(status, (HTTPStatus(status).phrase.lower().replace(" ", "_"), "request refused"))
    return json_error(status, error, message)


@web.middleware
def json_errors(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """aiohttp's plain-text HTTP errors (404, 405, 413 …) as JSON; replies handlers built stay as they are.

    A plain function: a WebSocket upgrade gets its handler's coroutine itself, since a frame of
    this one would stay with every open socket for its whole life.
    """
    if hdrs.UPGRADE in request.headers and request.match_info.http_exception is None:
        return handler(request)
    return _json_errors(request, handler)


async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type != "text/plain":
            raise
        response = standard_error(exc.status)
        response.headers.extend((k, v) for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS)
        return response
