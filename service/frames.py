"""WebSocket text frames built once and written as bytes to every recipient (RFC 6455 §5.2)."""

from __future__ import annotations

import struct
from typing import Final

_FIN_TEXT: Final = 0x81
_SHORT: Final = struct.Struct("!BB")
_MEDIUM: Final = struct.Struct("!BBH")
_LONG: Final = struct.Struct("!BBQ")
# An empty server-to-client PING (RFC 6455 §5.5.2): FIN + opcode 0x9, no mask, no payload.
PING: Final = b"\x89\x00"


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented, uncompressed server-to-client text frame.

    The fan-out encodes an event once and writes these same bytes to every subscriber,
    instead of letting the WebSocket library frame (and copy) it once per connection.
    Compression is off on every connection, so no per-connection state is involved.
    """
    length = len(payload)
    if length < 126:
        header = _SHORT.pack(_FIN_TEXT, length)
    elif length < 65536:
        header = _MEDIUM.pack(_FIN_TEXT, 126, length)
    else:
        header = _LONG.pack(_FIN_TEXT, 127, length)
    return header + payload
