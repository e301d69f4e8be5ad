"""Pre-built text frames decode as the RFC 6455 frames a client library expects."""

from __future__ import annotations

import pytest

from service.frames import text_frame


def payload_of(frame: bytes) -> bytes:
    """Decode one unmasked server frame (the reference the tests check against)."""
    assert frame[0] == 0x81, "FIN + text opcode"
    length = frame[1]
    assert length & 0x80 == 0, "server frames are not masked"
    if length == 126:
        return frame[4 : 4 + int.from_bytes(frame[2:4], "big")]
    if length == 127:
        return frame[10 : 10 + int.from_bytes(frame[2:10], "big")]
    return frame[2 : 2 + length]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_lengths_at_every_encoding_boundary_round_trip(size):
    payload = bytes(i % 251 for i in range(size))
    frame = text_frame(payload)
    assert payload_of(frame) == payload
    header = {True: 2, False: 4 if size < 65536 else 10}[size < 126]
    assert len(frame) == header + size
