"""A policy close reaches the client whole: what was queued, then the close frame, while the client still sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.auth import mint_token
from service.config import load_settings
from service.protocol import CloseCode
from tests.conftest import SECRET, make_settings, metric_value, token_for
from tests.rawws import OP_CLOSE, OP_PING, OP_TEXT, Frame, RawWebSocket, frame

# Each scenario runs several times: before the lingering close, a reset destroyed the close
# frame often but not on every run.
ATTEMPTS = 5
OVERSIZED_BYTES = 8 * 1024 * 1024


async def _raw(host: str, port: int, token: str) -> RawWebSocket:
    ws = await RawWebSocket.open(host, port, f"/ws/transactions?token={token}")
    assert ws.status == 101, ws.response_head
    return ws


async def _frames_until_close(ws: RawWebSocket) -> tuple[list[Frame], int | None]:
    """Every frame up to the server's close frame, and its code (None: the socket ended without one)."""
    received: list[Frame] = []
    while (next_frame := await ws.read_frame(timeout_s=30)) is not None:
        if next_frame.opcode == OP_CLOSE:
            return received, next_frame.close_code
        received.append(next_frame)
    return received, None


async def _send_all(ws: RawWebSocket, data: bytes) -> None:
    """Write everything before reading anything, as a simple client does; a reset is what the test looks for."""
    with contextlib.suppress(ConnectionError):
        await ws.send(data)


async def test_a_client_that_writes_an_oversized_frame_in_full_reads_the_1009_close(app_client):
    settings = make_settings()
    client = await app_client(settings)
    # A masked frame header declaring 8 MiB, then the 8 MiB (their content does not matter: the
    # server refuses the frame from its header and never unmasks the payload).
    oversized = frame(OP_TEXT, declared_length=OVERSIZED_BYTES) + b"x" * OVERSIZED_BYTES
    before = await _disconnects(client)
    for attempt in range(ATTEMPTS):
        ws = await _raw(client.host, client.port, token_for(settings, sub=f"big{attempt}"))
        await _send_all(ws, oversized)
        _, code = await _frames_until_close(ws)
        assert code == CloseCode.MESSAGE_TOO_BIG, f"attempt {attempt}: no close frame, the socket was reset"
        assert await ws.closed_by_server()
        await ws.aclose()
    # The pod counts (and logs) these closes by the code it sent, not as abnormal.
    after = await _disconnects(client)
    assert after["message_too_big"] - before["message_too_big"] == ATTEMPTS
    assert after["abnormal"] == before["abnormal"]


async def _disconnects(client: Any) -> dict[str, float]:
    """The pod's disconnect counters (the registry is the process's: compare before and after)."""
    metrics = await (await client.get("/metrics")).text()
    return {
        reason: metric_value(metrics, f'eva_ws_disconnects_total{{reason="{reason}"}}')
        for reason in ("message_too_big", "abnormal")
    }


async def test_a_client_that_keeps_writing_after_a_subscribe_burst_reads_the_1008_close(app_client):
    settings = make_settings()
    client = await app_client(settings)
    subscribe = frame(OP_TEXT, b'{"type":"subscribe","channel":"transactions","filters":{"customerId":"C1"}}')
    # The burst, then 8 MiB more in messages of 32 KiB, written while the server closes: more
    # than the socket buffers hold, so the client is still writing when the close comes.
    padding = frame(OP_TEXT, b" " * 32 * 1024)
    burst = subscribe * 2000 + padding * (OVERSIZED_BYTES // len(padding))
    for attempt in range(ATTEMPTS):
        ws = await _raw(client.host, client.port, token_for(settings, sub=f"burst{attempt}"))
        await _send_all(ws, burst)
        replies, code = await _frames_until_close(ws)
        assert code == CloseCode.POLICY_VIOLATION, f"attempt {attempt}: no close frame, the socket was reset"
        kinds = [json.loads(reply.payload).get("code", json.loads(reply.payload)["type"]) for reply in replies]
        assert kinds[0] == "subscribed"
        assert kinds.count("rate_limited") == settings.rate_limit_max_violations - 1
        await ws.aclose()


def _ping(index: int) -> bytes:
    return frame(OP_TEXT, json.dumps({"type": "ping", "correlationId": f"p{index}"}).encode())


async def test_replies_queued_before_a_rate_limit_close_arrive_before_the_close_frame(app_client):
    settings = make_settings()
    client = await app_client(settings)
    ws = await _raw(client.host, client.port, token_for(settings))
    sent = 80
    await ws.send(b"".join(_ping(i) for i in range(sent)))
    replies, code = await _frames_until_close(ws)
    assert code == CloseCode.POLICY_VIOLATION
    messages = [json.loads(reply.payload) for reply in replies]
    pongs = [m["correlationId"] for m in messages if m["type"] == "pong"]
    errors = [m["code"] for m in messages if m["type"] == "error"]
    # The burst is answered, in order; then each refused message but the last gets its
    # `rate_limited`; the one that reaches the limit gets the close. Nothing is answered after it.
    assert len(pongs) >= settings.rate_limit_burst
    assert pongs == sorted(pongs, key=lambda cid: int(cid[1:]))
    assert errors == ["rate_limited"] * (settings.rate_limit_max_violations - 1)
    assert len(messages) == len(pongs) + len(errors) < sent
    assert await ws.closed_by_server()
    await ws.aclose()


async def test_ping_frames_answered_before_a_rate_limit_close_arrive_before_the_close_frame(app_client):
    settings = make_settings(rate_limit_burst="10", rate_limit_max_violations="5")
    client = await app_client(settings)
    ws = await _raw(client.host, client.port, token_for(settings))
    await ws.send(b"".join(frame(OP_PING, b"%d" % i) for i in range(40)))
    replies, code = await _frames_until_close(ws)
    assert code == CloseCode.POLICY_VIOLATION
    assert [r.payload for r in replies if r.opcode != OP_TEXT][:10] == [b"%d" % i for i in range(10)]
    assert sum(r.opcode == OP_TEXT for r in replies) == 4  # the rate_limited errors
    await ws.aclose()


# -- the log of a real server ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, Any, Path]]:
    """`python -m service serve` with the default limits, its stdout in a file."""
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")},
        "EVA_WS_MODE": "production",
        "EVA_WS_HOST": "127.0.0.1",
        "EVA_WS_PORT": str(port),
        "EVA_WS_JWT_SECRET": SECRET,
        "EVA_WS_DEMO_PUBLISHER": "false",
        "EVA_WS_ALLOWED_ORIGINS": "https://app.example.com",
        "EVA_WS_DRAIN_DELAY_S": "0",
        "EVA_WS_DRAIN_SPREAD_S": "0",
    }
    log_path = tmp_path / "stdout.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        settings = load_settings({k: v for k, v in env.items() if k.startswith("EVA_WS_")})
        yield port, settings, log_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _events(log_path: Path, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


async def test_a_rate_limit_close_is_logged_once_per_connection(server):
    port, settings, log_path = server
    users = ("flood-a", "flood-b")
    for user in users:
        ws = await _raw("127.0.0.1", port, mint_token(settings, sub=user, customers=["C1"], ttl_s=600))
        # Far more than the limit allows, in one write: everything after the limit is read at once.
        await ws.send(b"".join(_ping(i) for i in range(2000)))
        _, code = await _frames_until_close(ws)
        assert code == CloseCode.POLICY_VIOLATION
        await ws.aclose()

    deadline = time.monotonic() + 20
    while len(_events(log_path, "connection_closed")) < len(users):
        assert time.monotonic() < deadline, log_path.read_text()[-4000:]
        await asyncio.sleep(0.05)
    closes = _events(log_path, "rate_limit_close")
    assert sorted(line["user_id"] for line in closes) == sorted(users), f"{len(closes)} rate_limit_close lines"
