"""aiohttp's server WebSocket with the RFC 6455 checks it lacks: masked client frames and valid close codes."""

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

_OP_CONTINUATION: Final = 0x0
_OP_CLOSE: Final = 0x8
# Fragments per message. Browsers send whole messages; an endless run of (even empty)
# continuation frames would otherwise hold the read loop without ever reaching the size limit.
MAX_FRAGMENTS: Final = 1024


def close_code_is_valid(code: int) -> bool:
    """RFC 6455 §7.4: codes a peer may send. 1005, 1006 and 1015 are reserved for local use."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


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

    def _handle_frame(self, fin: bool, opcode: int, payload: bytes | bytearray, compressed: int) -> None:
        if not self._has_mask:
            raise WebSocketError(WSCloseCode.PROTOCOL_ERROR, "client frames must be masked")
        if opcode < _OP_CLOSE:
            self._fragments = 0 if fin else self._fragments + 1
            if self._fragments > MAX_FRAGMENTS:
                raise WebSocketError(WSCloseCode.MESSAGE_TOO_BIG, f"more than {MAX_FRAGMENTS} fragments")
        if opcode == _OP_CLOSE and len(payload) >= 2:
            (code,) = struct.unpack("!H", payload[:2])
            if not close_code_is_valid(code):
                raise WebSocketError(WSCloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
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


class ServerWebSocketResponse(web.WebSocketResponse):
    """A WebSocketResponse whose frames go through _ClientFrameReader.

    Replaces WebSocketResponse._post_start (aiohttp 3.13/3.14) to install the reader before
    any byte that followed the handshake is parsed; tests/test_rfc6455.py fails if a new
    aiohttp release changes this.
    """

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
