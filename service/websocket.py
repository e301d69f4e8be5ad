"""aiohttp's server WebSocket with the RFC 6455 checks it lacks, and a close frame the client gets to read."""

from __future__ import annotations

import asyncio
import functools
import struct
from typing import Final

from aiohttp import web
from aiohttp._websocket import reader_py
from aiohttp._websocket.models import WebSocketError, WSCloseCode, WSMessage, WSMessageTextBytes
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.web_request import BaseRequest

from service.protocol import CloseCode

_OP_CONTINUATION: Final = 0x0
_OP_CLOSE: Final = 0x8
# Fragments per message. Browsers send whole messages; an endless run of (even empty)
# continuation frames would otherwise hold the read loop without ever reaching the size limit.
MAX_FRAGMENTS: Final = 1024
# What a client may still send after the server's close frame before its socket is aborted
# (see LingeringClose): more than the rest of the largest frame a browser could be writing
# when it is refused for its size (EVA_WS_MAX_MESSAGE_BYTES is at most 16 MiB).
LINGER_MAX_BYTES: Final = 16 * 1024 * 1024
_NOT_EOF: Final = (False, b"")


# RFC 6455 §7.4 and the IANA registry: the codes a peer may send below 3000 (1004 is
# reserved; 1005, 1006 and 1015 are for local use only).
_PEER_CODES: Final = frozenset(
    {
        WSCloseCode.OK,
        WSCloseCode.GOING_AWAY,
        WSCloseCode.PROTOCOL_ERROR,
        WSCloseCode.UNSUPPORTED_DATA,
        WSCloseCode.INVALID_TEXT,
        WSCloseCode.POLICY_VIOLATION,
        WSCloseCode.MESSAGE_TOO_BIG,
        WSCloseCode.MANDATORY_EXTENSION,
        WSCloseCode.INTERNAL_ERROR,
        WSCloseCode.SERVICE_RESTART,
        WSCloseCode.TRY_AGAIN_LATER,
        WSCloseCode.BAD_GATEWAY,
    }
)
# Registered (3000-3999) and private (4000-4999) codes: any of them may be sent.
_APPLICATION_CODES: Final = range(3000, 5000)


def close_code_is_valid(code: int) -> bool:
    """RFC 6455 §7.4: a code a peer may send."""
    return code in _PEER_CODES or code in _APPLICATION_CODES


class _ClientFrameReader(reader_py.WebSocketReader):
    """aiohttp's frame reader, plus two rules it leaves out for servers.

    RFC 6455 §5.1: a server MUST close the connection when a client frame is unmasked.
    §7.4: close codes outside the defined ranges (999, 1006, 5000…) are protocol errors;
    aiohttp accepts 1006 and everything from 3000 up. Both close with 1002.
    A message may also have at most MAX_FRAGMENTS fragments (1009 beyond).
    This is the pure-Python reader (the compiled one keeps the mask flag out of reach);
    clients send few small frames, so its cost does not matter for this service.
    """

    _fragments = 0
    # Set once the server has sent its close frame: from then on every byte received counts
    # against the linger's budget, and frames other than the client's close are dropped unread.
    linger: LingeringClose | None = None

    def feed_data(self, data: bytes | bytearray | memoryview) -> tuple[bool, bytes]:
        linger = self.linger
        if linger is not None:
            linger.received(len(data))
        if self._exc is None:
            super().feed_data(data)
        # After a protocol error the frames that follow cannot be told apart: they are dropped.
        # Never "end of stream" to aiohttp's protocol, which would stop passing data on and
        # close the socket under a client still sending: the response decides (see LingeringClose).
        return _NOT_EOF

    def feed_eof(self) -> None:
        if self.linger is not None:
            self.linger.ended()
        super().feed_eof()

    def _handle_frame(self, fin: bool, opcode: int, payload: bytes | bytearray, compressed: int) -> None:
        if self.linger is not None:
            if opcode != _OP_CLOSE:
                return
            self.linger.client_closed()
        if not self._has_mask:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
        if opcode < _OP_CLOSE:
            self._fragments = 0 if fin else self._fragments + 1
            if self._fragments > MAX_FRAGMENTS:
                raise WebSocketError(CloseCode.MESSAGE_TOO_BIG, f"more than {MAX_FRAGMENTS} fragments")
        if opcode == _OP_CLOSE and len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            if not close_code_is_valid(code):
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
        super()._handle_frame(fin, opcode, payload, compressed)


class _ListDataQueue(reader_py.WebSocketDataQueue):
    """aiohttp's queue of received messages, kept in a list instead of a deque.

    An empty deque costs about 600 bytes, and an idle socket's queue is empty nearly all
    the time; when it is not, it holds what one socket read produced, bounded by the
    queue's byte limit (aiohttp pauses reading above it), so taking from the front of a
    short list costs nothing that matters.
    """

    def __init__(self, protocol: BaseProtocol, limit: int, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(protocol, limit, loop=loop)
        buffer: list[tuple[WSMessage | WSMessageTextBytes, int]] = []
        self._buffer = buffer  # type: ignore[assignment]  # only truth-tested and used via the two below
        self._put_buffer = buffer.append
        self._get_buffer = functools.partial(buffer.pop, 0)


class LingeringClose:
    """After the server's close frame, read and drop what the client still sends, so it reads that frame.

    A socket closed while bytes from the client are unread or still arriving answers them with
    a TCP reset, and a reset makes the client's side discard what it has not read yet: the
    close frame is lost and the client sees an abnormal close (1006) instead of, say, 1008 or
    1009. So the socket stays open until the client's close frame or its end of stream. Once
    aiohttp's side of the handshake is over (at once after a protocol error, when the frames
    that follow can no longer be told apart), the server also ends its own direction: a FIN
    after the close frame tells a client that waits for the server to close the TCP connection
    (RFC 6455 §7.1.1) that it may close. Bounded: after `max_bytes` more from the client, or
    `timeout_s` after the close frame, the socket is aborted.
    """

    __slots__ = ("_left_bytes", "_timer", "_transport", "done")

    def __init__(self, transport: asyncio.Transport, *, max_bytes: int, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._transport = transport
        self._left_bytes = max_bytes
        # Resolved once the socket may be closed without a reset destroying the close frame.
        self.done: asyncio.Future[None] = loop.create_future()
        # Also bounds a graceful close that waits for a client that no longer reads.
        self._timer = loop.call_later(timeout_s, self._abort)

    def received(self, size: int) -> None:
        self._left_bytes -= size
        if self._left_bytes < 0:
            self._abort()

    def client_closed(self) -> None:
        """The client's close frame: it sends nothing after it."""
        self._finish()

    def ended(self) -> None:
        """The connection is gone: the client's end of stream, or a close or an abort."""
        self._timer.cancel()
        self._finish()

    def close_transport(self) -> None:
        """Called where aiohttp would close the socket."""
        if self.done.done():
            self._transport.close()
        elif self._transport.can_write_eof():  # TLS cannot half-close: it just keeps reading
            self._transport.write_eof()

    def _abort(self) -> None:
        self._transport.abort()
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class ServerWebSocketResponse(web.WebSocketResponse):
    """A WebSocketResponse whose frames go through _ClientFrameReader, and whose close lingers.

    Replaces WebSocketResponse._post_start (aiohttp 3.13/3.14) to install the reader before
    any byte that followed the handshake is parsed; tests/test_rfc6455.py fails if a new
    aiohttp release changes this.

    A close that the server starts (a policy close, a protocol error, a drain) is a
    LingeringClose: the socket ends at most `timeout` seconds after the close frame.
    aiohttp closes the socket once `write_eof` returns, after the handler; so it returns
    only once the linger is over.
    """

    # None until the server starts a close: most sockets never get one.
    _linger: LingeringClose | None = None

    async def close(self, *, code: int = CloseCode.NORMAL, message: bytes = b"", drain: bool = True) -> bool:
        parser, request = self._parser, self._req
        transport = None if request is None else request.transport
        # Not in answer to the client's close frame (`_closing`): that client sends nothing more.
        if not (self._closed or self._closing) and isinstance(parser, _ClientFrameReader) and transport is not None:
            self._linger = parser.linger = LingeringClose(
                transport,
                max_bytes=LINGER_MAX_BYTES,
                timeout_s=self._timeout,
            )
        return await super().close(code=code, message=message, drain=drain)

    def _close_transport(self) -> None:
        if self._linger is None:
            super()._close_transport()
        else:
            self._linger.close_transport()

    def _set_code_close_transport(self, code: int) -> None:
        # After a protocol error aiohttp records 1006 (no close frame read from the client,
        # which cannot be read any more); the code the server sent says why the socket ended.
        if code == CloseCode.ABNORMAL and isinstance(self._exception, WebSocketError):
            code = self._exception.code
        super()._set_code_close_transport(code)  # type: ignore[arg-type]  # aiohttp passes the client's int too

    async def write_eof(self) -> None:  # type: ignore[override]  # as aiohttp's own
        await super().write_eof()
        if self._linger is not None:
            await self._linger.done

    def _post_start(self, request: BaseRequest, protocol: str | None, writer: WebSocketWriter) -> None:
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        loop = self._loop
        assert loop is not None
        self._reader = _ListDataQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
        self._parser = _ClientFrameReader(
            self._reader, self._max_msg_size, compress=bool(self._compress), decode_text=True
        )
        callback = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(self._parser, data_received_cb=callback)
        request.protocol.keep_alive(False)
