"""A byte-level WebSocket client for conformance and abuse tests: it sends exactly the frames it is told to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from dataclasses import dataclass

KEY = "dGhlIHNhbXBsZSBub25jZQ=="

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    declared_length: int | None = None,
) -> bytes:
    """One frame; `declared_length` lies about the payload size."""
    length = len(payload) if declared_length is None else declared_length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason)


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


def upgrade_request(path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> bytes:
    base = {
        "Host": "localhost",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    for name, value in (headers or {}).items():
        base.pop(name, None)
        if value is not None:
            base[name] = value
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in base.items()), "", ""]
    return "\r\n".join(lines).encode()


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response_head: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.response_head = response_head

    @property
    def status(self) -> int:
        return int(self.response_head.split(b" ", 2)[1])

    def header(self, name: str) -> str | None:
        for line in self.response_head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    @classmethod
    async def open(
        cls, host: str, port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
    ) -> RawWebSocket:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(upgrade_request(path, method=method, headers=headers))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return cls(reader, writer, head)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout_s: float = 10.0) -> Frame | None:
        """The next frame, or None at EOF."""
        try:
            async with asyncio.timeout(timeout_s):
                first, second = await self.reader.readexactly(2)
                length = second & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None
        return Frame(bool(first & 0x80), first & 0x0F, payload)

    async def read_close_code(self, timeout_s: float = 10.0) -> int | None:
        """Skip data and pings until the server's close frame; its code, or None if the socket just ended."""
        while True:
            received = await self.read_frame(timeout_s)
            if received is None:
                return None
            if received.opcode == OP_CLOSE:
                return received.close_code

    async def closed_by_server(self, timeout_s: float = 10.0) -> bool:
        """True once the server has ended the TCP connection (EOF), whatever it sent before."""
        try:
            async with asyncio.timeout(timeout_s):
                while await self.reader.read(65536):
                    pass
        except ConnectionResetError:
            pass
        return True

    async def aclose(self) -> None:
        # Abort: a graceful close would wait for a server that stopped reading to drain our buffer.
        self.writer.transport.abort()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
