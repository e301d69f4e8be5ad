"""Request heads within a byte budget (431 beyond it), and nothing of the head kept by an open socket."""

from __future__ import annotations

import base64
import json
import os
import socket
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web

from fleet.process import ServiceProcess
from service.app import create_app
from service.auth import mint_token
from service.config import load_settings
from service.http_protocol import AppRunner
from service.protocol import MAX_TOKEN_LENGTH
from service.server import server_options
from tests.conftest import SECRET, make_settings, token_for

BUDGET: Final = 16_384
# A WebSocket upgrade as Chromium sends it, before any cookie.
BROWSER_HEAD: Final = (
    "GET /ws/transactions?token={token}&customerId=CUST-001&reconnect=0 HTTP/1.1\r\n"
    "Host: app.example.com\r\n"
    "Connection: Upgrade\r\n"
    "Pragma: no-cache\r\n"
    "Cache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36\r\n"
    "Upgrade: websocket\r\n"
    "Origin: https://app.example.com\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\n"
    "Accept-Language: en-US,en;q=0.9,de;q=0.8\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceProcess]:
    # A long handshake timeout: a refusal must come from the budget, not from the slowloris timer.
    process = ServiceProcess(
        tmp_path,
        jwt_secret=SECRET,
        mode="production",
        allowed_origins="https://app.example.com",
        handshake_timeout_s="3600",
        max_request_head_bytes=str(BUDGET),
    ).start()
    try:
        yield process
    finally:
        process.stop()


def _settings(service: ServiceProcess) -> Any:
    return load_settings({k: v for k, v in service.env.items() if k.startswith("EVA_WS_")})


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response: status, headers (lower-case names) and the body its Content-Length announces.

    Reads no byte beyond it, so pipelined responses can be read one after the other.
    """
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"the connection closed before a response: {head!r}"
        head += byte
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    body = b""
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(int(headers["content-length"]) - len(body))
        assert chunk, "the connection closed inside the body"
        body += chunk
    return int(status_line.split(" ")[1]), headers, body


def _connect(service: ServiceProcess) -> socket.socket:
    # The timeout is a fail-safe against a hang, not a measurement.
    return socket.create_connection(("127.0.0.1", service.port), timeout=30)


def _padding(total: int, name: str = "X-Pad") -> str:
    """Header lines of about `total` bytes, each under aiohttp's per-field limit."""
    lines, line = [], f"{name}-000: " + "p" * 1000 + "\r\n"
    for index in range(total // len(line) + 1):
        lines.append(f"{name}-{index:03d}: " + "p" * 1000 + "\r\n")
    return "".join(lines)


def _assert_431(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 431, (status, body)
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "request_header_fields_too_large"


def test_headers_over_the_budget_get_431_as_json(service: ServiceProcess) -> None:
    token = mint_token(_settings(service), sub="alice", customers=["CUST-001"])
    head = BROWSER_HEAD.format(token=token) + _padding(BUDGET) + "\r\n"
    with _connect(service) as sock:
        sock.sendall(head.encode())
        _assert_431(*_read_response(sock))


def test_unfinished_headers_are_refused_as_soon_as_they_pass_the_budget(service: ServiceProcess) -> None:
    # Headers that never end: aiohttp alone would keep reading (up to 128 fields of 8 KiB).
    with _connect(service) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        for line in _padding(BUDGET).encode().splitlines(keepends=True):
            sock.sendall(line)
        _assert_431(*_read_response(sock))
        assert sock.recv(1) == b"", "the connection stays open after 431"


def test_one_header_line_within_the_budget_is_served_and_beyond_it_gets_431(service: ServiceProcess) -> None:
    # The budget is the only bound: aiohttp's own 8,190 bytes per line would answer a plain 400.
    served = f"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Long: {'a' * 10_000}\r\n\r\n"
    with _connect(service) as sock:
        sock.sendall(served.encode())
        assert _read_response(sock)[0] == 200
    refused = f"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Long: {'a' * (BUDGET + 100)}\r\n\r\n"
    with _connect(service) as sock:
        sock.sendall(refused.encode())
        _assert_431(*_read_response(sock))


def test_a_request_line_beyond_the_budget_gets_431(service: ServiceProcess) -> None:
    with _connect(service) as sock:
        sock.sendall(f"GET /healthz?x={'a' * 20_000} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        _assert_431(*_read_response(sock))


def test_a_browser_head_with_a_long_token_and_cookies_is_served(service: ServiceProcess) -> None:
    # A token at the length limit, a browser's headers and 4 KiB of cookies fit in the budget.
    customers = [f"CUST-{index:05d}" for index in range(1000)]
    token = mint_token(_settings(service), sub="alice", customers=customers[:340])
    assert MAX_TOKEN_LENGTH - 300 < len(token) <= MAX_TOKEN_LENGTH, len(token)
    cookie = "Cookie: " + "; ".join(f"c{index}={base64.b64encode(os.urandom(48)).decode()}" for index in range(60))
    head = BROWSER_HEAD.format(token=token) + cookie[:4096] + "\r\n\r\n"
    assert len(head) < BUDGET
    with _connect(service) as sock:
        sock.sendall(head.encode())
        status, headers, _ = _read_response(sock)
    assert status == 101, status
    assert headers["upgrade"].lower() == "websocket"


def test_the_budget_is_per_request_on_a_keep_alive_connection(service: ServiceProcess) -> None:
    padding = _padding(BUDGET // 2)
    publisher = mint_token(_settings(service), sub="backend", customers=[], roles=["publisher"])
    body = b"[" + b" " * (900 * 1024) + b"x"
    with _connect(service) as sock:
        for _ in range(3):
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: a\r\n{padding}\r\n".encode())
            status, _, _ = _read_response(sock)
            assert status == 200
        # A large body in between counts against the body limit, not against the next head.
        publish = (
            f"POST /api/v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {publisher}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(publish.encode() + body)
        status, _, reply = _read_response(sock)
        assert status == 400, reply
        assert json.loads(reply)["error"] == "invalid_json"
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: a\r\n{padding}\r\n".encode())
        status, _, _ = _read_response(sock)
        assert status == 200


async def test_an_open_socket_keeps_nothing_of_the_request_head() -> None:
    settings = make_settings()
    runner = AppRunner(create_app(settings), head_budget_bytes=BUDGET, **server_options(settings))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        token = token_for(settings)
        padding = {"X-Pad": "p" * 8000, "Cookie": "session=" + "c" * 4000}
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{port}/ws/transactions?token={token}", headers=padding) as ws,
        ):
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json())["type"] == "pong"
            assert runner.server is not None
            (protocol,) = runner.server.connections
            request = protocol._current_request
            assert request is not None
            assert request.path == "/ws/transactions"
            assert request.query_string == ""
            assert len(request.headers) == 0
            assert request.raw_headers == ()
            # The message aiohttp's loop holds for the request's whole life, and the HTTP parser.
            assert protocol._task_handler is not None
            loop_coroutine = protocol._task_handler.get_coro()
            assert isinstance(loop_coroutine, types.CoroutineType)
            assert loop_coroutine.cr_frame is not None
            held = loop_coroutine.cr_frame.f_locals["message"]
            assert len(held.headers) == 0
            assert held.raw_headers == ()
            assert protocol._parser is None
    finally:
        await runner.cleanup()


def test_pipelined_requests_each_within_the_budget_are_served(service: ServiceProcess) -> None:
    request = f"GET /healthz HTTP/1.1\r\nHost: a\r\n{_padding(BUDGET * 2 // 3)}\r\n".encode()
    with _connect(service) as sock:
        sock.sendall(request * 3)
        for _ in range(3):
            status, _, _ = _read_response(sock)
            assert status == 200


def test_headers_behind_a_declined_upgrade_are_held_to_the_budget(service: ServiceProcess) -> None:
    # aiohttp keeps what follows an upgrade request's head and, when the handler declines the
    # upgrade (401 here), parses it as the next request: that head must not escape the budget.
    upgrade = (
        "GET /ws/transactions HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    unfinished = "GET /healthz HTTP/1.1\r\nHost: a\r\n" + _padding(BUDGET * 2)
    with _connect(service) as sock:
        sock.sendall((upgrade + unfinished).encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    # The connection ends (rather than waiting for the rest of the head), after a 401 for the
    # upgrade and perhaps a 431 for what followed it.
    assert received == b"" or received.startswith(b"HTTP/1.1 401 "), received[:100]
    assert b" 200 " not in received
