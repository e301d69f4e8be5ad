"""aiohttp's HTTP/1.1 connection: a byte budget per request head, JSON errors, no head kept after an upgrade."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy

from service.http_errors import standard_error
from service.log import get_logger

log = get_logger("eva_ws.http")

HEAD_TOO_LARGE: Final = 431


class RequestHeadTooLarge(HttpProcessingError):
    code = HEAD_TOO_LARGE
    message = "Request Header Fields Too Large"


class BoundedRequestHandler(RequestHandler):
    """One connection: aiohttp's, with a byte budget for each request head.

    aiohttp bounds a head only field by field (128 headers of up to 8,190 bytes each, about
    2 MB per connection, kept for a WebSocket's whole life). Here the bytes that arrive while
    a head is being read are counted before the parser sees them: it is given at most the
    budget, and a head that has not ended within it gets 431. A head is read from the
    connection's start and again once the previous request's body is complete; in a
    pipelined read that ends one body and starts the next head, that head's first bytes are
    not counted (aiohttp's per-field limits still hold them). At an upgrade, what only the
    head needed is dropped (see set_parser). Error replies are JSON that quotes nothing of
    the request. Relies on RequestHandler internals of aiohttp 3.13/3.14, which
    tests/test_headers.py and tests/test_log_redaction.py exercise.
    """

    # aiohttp's handler has slots: without these each connection would carry a dict.
    __slots__ = ("_head_budget_bytes", "_head_bytes", "_head_refused", "_last_headers", "_last_payload")

    def __init__(self, manager: web.Server, *, head_budget_bytes: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_budget_bytes = head_budget_bytes
        self._head_bytes = 0
        self._head_refused = False
        # The body of the request parsed last; None before the first request.
        self._last_payload: StreamReader | None = None
        # The headers of the request parsed last, emptied at an upgrade.
        self._last_headers: CIMultiDict[str] | None = None

    def data_received(self, data: bytes) -> None:
        if self._head_refused:
            return
        if (
            self._upgraded
            and self._payload_parser is None
            and len(self._message_tail) + len(data) > self._head_budget_bytes
        ):
            # An upgrade is pending: aiohttp keeps what follows its head and, if the upgrade is
            # declined, parses it as the next request without it passing through here. A client
            # sends nothing before the 101, so more than a head's budget is an abuse.
            self._head_refused = True
            self.force_close()
            return
        if self._upgraded or self._payload_parser is not None or not self._reading_head():
            self._feed(data)
            return
        room = self._head_budget_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            self._feed(data)
            return
        # The head must end within the budget: the parser never sees a byte of it beyond.
        if not self._feed(data[:room]):
            self._refuse_head()
            return
        # The rest is the body, or the next request.
        self.data_received(data[room:])

    def _reading_head(self) -> bool:
        last = self._last_payload
        return last is None or last.is_eof()

    def _feed(self, data: bytes) -> bool:
        """Parse `data` as aiohttp does; True when it completed a request head."""
        requests_before = self._request_count
        super().data_received(data)
        if self._request_count == requests_before or not self._messages:
            return False
        messages = self._messages
        for index in range(len(messages) - (self._request_count - requests_before), len(messages)):
            message, payload = messages[index]
            if not isinstance(message, _ErrInfo):
                messages[index] = (self._own_headers(message), payload)
        self._last_payload = messages[-1][1]
        self._head_bytes = 0
        return True

    def _own_headers(self, message: RawRequestMessage) -> RawRequestMessage:
        """The message with headers this connection can empty later, and without their raw bytes.

        aiohttp's loop keeps the parsed message for as long as the request runs, which for a
        WebSocket is its whole life; its headers cannot be emptied and `raw_headers` repeats
        them as bytes. Nothing in the service reads `request.raw_headers`.
        """
        headers: CIMultiDict[str] = CIMultiDict(message.headers)
        self._last_headers = headers
        return message._replace(headers=CIMultiDictProxy(headers), raw_headers=())

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        """The upgrade: frames go to `parser`, and what only the request head needed is dropped.

        A WebSocket's request lives as long as the socket (its handler, its response and
        aiohttp's loop hold it); only the method, the path and the peer address are read later,
        by the access log. The headers, the query (the token) and the HTTP parser, which keeps
        the last head it parsed, all go.
        """
        super().set_parser(parser, data_received_cb)
        if self._last_headers is not None:
            self._last_headers.clear()
            self._last_headers = None
        self._parser = None
        request = self._current_request
        if request is not None:
            url = request.rel_url.with_query(None)
            request._message = request._message._replace(path=url.raw_path, url=url)
            request._rel_url = url
            request._cache.clear()

    def _refuse_head(self) -> None:
        self._head_refused = True
        error = RequestHeadTooLarge()
        self._messages.append((_ErrInfo(status=HEAD_TOO_LARGE, exc=error, message=error.message), EMPTY_PAYLOAD))
        self._request_count += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON reply that closes the connection; aiohttp's text would quote the request line."""
        if status == 500:
            # A defect in a handler: the traceback is worth having (log.py redacts tokens in it).
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            log.info(
                "http_request_refused",
                status=status,
                error=type(exc).__name__ if exc is not None else None,
                remote=request.remote,
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; no error reply can follow")
        response = standard_error(status)
        response.force_close()
        return response


class BoundedServer(web.Server):
    """aiohttp's Server whose connections are BoundedRequestHandlers."""

    def __init__(self, *args: Any, head_budget_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_budget_bytes = head_budget_bytes

    def __call__(self) -> RequestHandler:
        return BoundedRequestHandler(self, loop=self._loop, head_budget_bytes=self._head_budget_bytes, **self._kwargs)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner serving through BoundedServer."""

    __slots__ = ("_head_budget_bytes",)

    def __init__(self, app: web.Application, *, head_budget_bytes: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_budget_bytes = head_budget_bytes

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return BoundedServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            head_budget_bytes=self._head_budget_bytes,
            **server._kwargs,
        )
