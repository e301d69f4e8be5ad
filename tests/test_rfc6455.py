"""RFC 6455 conformance of /ws/transactions, byte by byte over a raw socket (the Autobahn groups 1-7, 10, 12)."""

from __future__ import annotations

import json

import pytest

from service.websocket import close_code_is_valid
from tests.conftest import make_settings, token_for
from tests.rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWebSocket,
    close_frame,
    frame,
)

PING_JSON = b'{"type":"ping","correlationId":"c1"}'


@pytest.fixture
async def raw(app_client):
    """Open a raw, upgraded socket with a valid token."""
    settings = make_settings()
    client = await app_client(settings)
    opened: list[RawWebSocket] = []

    async def open_socket(**headers: str) -> RawWebSocket:
        ws = await RawWebSocket.open(
            client.host, client.port, f"/ws/transactions?token={token_for(settings)}", headers=headers
        )
        assert ws.status == 101, ws.response_head
        opened.append(ws)
        return ws

    yield open_socket
    for ws in opened:
        await ws.aclose()


async def _assert_closed_with(ws: RawWebSocket, code: int) -> None:
    assert await ws.read_close_code() == code
    assert await ws.closed_by_server()


async def _assert_pong_json(ws: RawWebSocket) -> None:
    reply = await ws.read_frame()
    assert reply is not None
    assert reply.opcode == OP_TEXT
    assert json.loads(reply.payload)["type"] == "pong"


async def test_masked_text_frame_gets_a_reply(raw):
    ws = await raw()
    await ws.send(frame(OP_TEXT, PING_JSON))
    await _assert_pong_json(ws)


async def test_unmasked_client_frame_is_closed_with_1002(raw):
    ws = await raw()
    await ws.send(frame(OP_TEXT, PING_JSON, masked=False))
    await _assert_closed_with(ws, 1002)


async def test_unmasked_control_frame_is_closed_with_1002(raw):
    ws = await raw()
    await ws.send(frame(OP_PING, b"x", masked=False))
    await _assert_closed_with(ws, 1002)


@pytest.mark.parametrize("rsv", [0b100, 0b010, 0b001, 0b111])
async def test_reserved_bits_are_closed_with_1002(raw, rsv):
    ws = await raw()
    await ws.send(frame(OP_TEXT, PING_JSON, rsv=rsv))
    await _assert_closed_with(ws, 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
async def test_reserved_opcodes_are_closed_with_1002(raw, opcode):
    ws = await raw()
    await ws.send(frame(opcode, b"hello"))
    await _assert_closed_with(ws, 1002)


async def test_control_frame_above_125_bytes_is_closed_with_1002(raw):
    ws = await raw()
    await ws.send(frame(OP_PING, b"x" * 126))
    await _assert_closed_with(ws, 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
async def test_fragmented_control_frame_is_closed_with_1002(raw, opcode):
    ws = await raw()
    await ws.send(frame(opcode, b"ab", fin=False))
    await _assert_closed_with(ws, 1002)


async def test_client_ping_gets_a_pong_echoing_its_payload(raw):
    ws = await raw()
    for payload in (b"", b"hello", bytes(range(125))):
        await ws.send(frame(OP_PING, payload))
        reply = await ws.read_frame()
        assert reply is not None
        assert (reply.opcode, reply.payload) == (OP_PONG, payload)


async def test_unsolicited_pong_is_ignored(raw):
    ws = await raw()
    await ws.send(frame(OP_PONG, b"unsolicited"))
    await ws.send(frame(OP_TEXT, PING_JSON))
    await _assert_pong_json(ws)


async def test_fragmented_message_with_a_ping_in_between_is_reassembled(raw):
    ws = await raw()
    await ws.send(frame(OP_TEXT, PING_JSON[:10], fin=False))
    await ws.send(frame(OP_PING, b"mid"))
    await ws.send(frame(OP_CONT, PING_JSON[10:20], fin=False))
    await ws.send(frame(OP_CONT, PING_JSON[20:]))
    pong = await ws.read_frame()
    assert pong is not None
    assert (pong.opcode, pong.payload) == (OP_PONG, b"mid")
    await _assert_pong_json(ws)


async def test_continuation_without_a_started_message_is_closed_with_1002(raw):
    ws = await raw()
    await ws.send(frame(OP_CONT, PING_JSON))
    await _assert_closed_with(ws, 1002)


async def test_new_data_frame_inside_a_fragmented_message_is_closed_with_1002(raw):
    ws = await raw()
    await ws.send(frame(OP_TEXT, PING_JSON[:10], fin=False))
    await ws.send(frame(OP_TEXT, PING_JSON))
    await _assert_closed_with(ws, 1002)


async def test_invalid_utf8_text_frame_is_closed_with_1007(raw):
    ws = await raw()
    await ws.send(frame(OP_TEXT, b'{"type":"ping","correlationId":"\xff\xfe"}'))
    await _assert_closed_with(ws, 1007)


async def test_invalid_utf8_split_across_fragments_is_closed_with_1007(raw):
    ws = await raw()
    # "κ" is CE BA: the first fragment ends inside the character, the second breaks it.
    await ws.send(frame(OP_TEXT, b'{"type":"ping","correlationId":"\xce', fin=False))
    await ws.send(frame(OP_CONT, b'\x41"}'))
    await _assert_closed_with(ws, 1007)


async def test_valid_utf8_split_inside_a_character_is_accepted(raw):
    ws = await raw()
    text = '{"type":"ping","correlationId":"κόσμε"}'.encode()
    cut = text.index(b"\xce") + 1
    await ws.send(frame(OP_TEXT, text[:cut], fin=False))
    await ws.send(frame(OP_CONT, text[cut:]))
    reply = await ws.read_frame()
    assert reply is not None
    assert json.loads(reply.payload)["correlationId"] == "κόσμε"


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
async def test_invalid_close_code_is_answered_with_1002(raw, code):
    ws = await raw()
    await ws.send(close_frame(code))
    await _assert_closed_with(ws, 1002)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4001, 4999])
async def test_valid_close_code_gets_a_normal_close(raw, code):
    ws = await raw()
    await ws.send(close_frame(code, b"bye"))
    await _assert_closed_with(ws, 1000)


async def test_close_without_a_code_gets_a_normal_close(raw):
    ws = await raw()
    await ws.send(frame(OP_CLOSE, b""))
    await _assert_closed_with(ws, 1000)


async def test_close_with_a_one_byte_payload_is_closed_with_1002(raw):
    ws = await raw()
    await ws.send(frame(OP_CLOSE, b"\x03"))
    await _assert_closed_with(ws, 1002)


async def test_close_reason_with_invalid_utf8_is_closed_with_1007(raw):
    ws = await raw()
    await ws.send(close_frame(1000, b"\xff"))
    await _assert_closed_with(ws, 1007)


async def test_binary_frame_gets_an_error_reply_not_a_close(raw):
    ws = await raw()
    await ws.send(frame(OP_BINARY, b"\x00\x01"))
    reply = await ws.read_frame()
    assert reply is not None
    assert json.loads(reply.payload)["code"] == "binary_not_supported"


async def test_permessage_deflate_offer_is_not_negotiated(raw):
    ws = await raw(**{"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"})
    assert ws.header("Sec-WebSocket-Extensions") is None
    # Without the extension a compressed (RSV1) frame is a protocol error, not an inflate.
    await ws.send(frame(OP_TEXT, b"\xf2\x48\xcd\xc9\xc9\x07\x00", rsv=0b100))
    await _assert_closed_with(ws, 1002)


async def test_server_frames_are_unmasked(raw):
    ws = await raw()
    await ws.send(frame(OP_TEXT, PING_JSON))
    first, second = await ws.reader.readexactly(2)
    assert first == 0x80 | OP_TEXT
    assert second & 0x80 == 0


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("POST", {}),
        ("PUT", {}),
        ("GET", {"Sec-WebSocket-Key": None}),
        ("GET", {"Sec-WebSocket-Key": "c2hvcnQ="}),
        ("GET", {"Sec-WebSocket-Version": "8"}),
        ("GET", {"Sec-WebSocket-Version": None}),
        ("GET", {"Upgrade": "h2c"}),
        ("GET", {"Connection": "keep-alive"}),
    ],
)
async def test_bad_handshake_gets_4xx_and_no_101(app_client, method, headers):
    settings = make_settings()
    client = await app_client(settings)
    ws = await RawWebSocket.open(
        client.host, client.port, f"/ws/transactions?token={token_for(settings)}", method=method, headers=headers
    )
    try:
        assert 400 <= ws.status < 500, ws.response_head
        assert ws.header("Upgrade") is None
    finally:
        await ws.aclose()


async def test_unsupported_version_gets_426_naming_version_13(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await RawWebSocket.open(
        client.host,
        client.port,
        f"/ws/transactions?token={token_for(settings)}",
        headers={"Sec-WebSocket-Version": "8"},
    )
    try:
        assert ws.status == 426
        assert ws.header("Sec-WebSocket-Version") == "13"
    finally:
        await ws.aclose()


def test_close_code_ranges_follow_rfc6455():
    valid = [code for code in range(0, 6000) if close_code_is_valid(code)]
    assert valid == [1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)]
