"""No token, secret or full payload in any log line of a real `eva-ws serve` process at debug level."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import jwt
import pytest

from fleet.ports import free_port
from service.auth import mint_token
from service.config import load_settings

SECRET = "log-secret-" + "S3cr3tMarker" * 4
PAYLOAD_MARKER = "PayloadMarker-7f3a9c"
BAD_PAYLOAD_MARKER = "BadPayloadMarker-41d2"


@pytest.fixture
def server(tmp_path: Path):
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "EVA_WS_MODE": "production",
        "EVA_WS_HOST": "127.0.0.1",
        "EVA_WS_PORT": str(port),
        "EVA_WS_JWT_SECRET": SECRET,
        "EVA_WS_LOG_LEVEL": "debug",
        "EVA_WS_DEMO_PUBLISHER": "false",
        "EVA_WS_ALLOWED_ORIGINS": "https://app.example.com",
        "EVA_WS_DRAIN_DELAY_S": "0",
        "EVA_WS_DRAIN_SPREAD_S": "0",
        "EVA_WS_MAX_CONNECTIONS_PER_USER": "3",
        "EVA_WS_RATE_LIMIT_BURST": "5",
        "EVA_WS_RATE_LIMIT_PER_S": "1",
        "EVA_WS_RATE_LIMIT_MAX_VIOLATIONS": "3",
    }
    log_path = tmp_path / "stdout.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
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
            yield f"http://127.0.0.1:{port}", load_settings({k: v for k, v in env.items() if k != "PATH"}), log_path
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _traffic(base: str, settings) -> list[str]:
    """Representative traffic; returns every secret string that must never be logged."""
    now = int(time.time())
    good = mint_token(settings, sub="alice", customers=["C1"])
    refresh = mint_token(settings, sub="alice", customers=["C1"], ttl_s=7200)
    publisher = mint_token(settings, sub="backend", customers=[], roles=["publisher"])
    expired = jwt.encode({"sub": "alice", "iat": now - 7200, "exp": now - 3600}, SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "alice", "iat": now, "exp": now + 60}, "wrong-" + "k" * 40, algorithm="HS256")
    garbage = "GarbageTokenMarker.abc.def"
    none_alg = jwt.encode({"sub": "alice", "iat": now, "exp": now + 60}, "", algorithm="none")
    secrets = [SECRET, good, refresh, publisher, expired, forged, garbage, none_alg, PAYLOAD_MARKER, BAD_PAYLOAD_MARKER]
    # Signatures and bodies on their own, in case a token is ever logged in pieces.
    secrets += [part for token in (good, refresh, publisher, expired, forged) for part in token.split(".")[1:]]

    upgrade = {"Sec-WebSocket-Version": "13"}
    async with aiohttp.ClientSession(base) as http:
        for bad in (expired, forged, garbage, none_alg):
            async with http.get(f"/ws/transactions?token={bad}", headers={"Upgrade": "websocket", **upgrade}) as r:
                assert r.status == 401
            async with http.get("/ws/transactions", headers={"Authorization": f"Bearer {bad}"}) as r:
                assert r.status == 401
        ws = await http.ws_connect(f"/ws/transactions?token={good}&customerId=C1")
        await ws.send_json({"type": "subscribe", "channel": "transactions", "filters": {"customerId": "C1"}})
        assert (await ws.receive_json(timeout=10))["type"] == "subscribed"
        headers = {"Authorization": f"Bearer {publisher}"}
        event = {"type": "transaction_new", "data": {"id": "T1", "customerId": "C1", "note": PAYLOAD_MARKER}}
        async with http.post("/api/v1/publish", json=event, headers=headers) as r:
            assert r.status == 202
        assert (await ws.receive_json(timeout=10))["data"]["note"] == PAYLOAD_MARKER
        bad_event = {"type": "transaction_new", "data": {"id": "T*", "note": BAD_PAYLOAD_MARKER}}
        async with http.post("/api/v1/publish", json=bad_event, headers=headers) as r:
            assert r.status == 400
        async with http.post("/api/v1/publish", data=f"{{{BAD_PAYLOAD_MARKER}", headers=headers) as r:
            assert r.status == 400
        await ws.send_json({"type": "refresh", "token": refresh})
        assert (await ws.receive_json(timeout=10))["type"] == "refreshed"
        await ws.send_json({"type": "refresh", "token": forged})
        assert (await ws.receive_json(timeout=10))["code"] == "invalid_token"
        await ws.send_str(f"{{{BAD_PAYLOAD_MARKER}")
        assert (await ws.receive_json(timeout=10))["code"] == "invalid_json"
        # Over the per-user cap, then a rate-limit close: both log a line.
        extra = [await http.ws_connect(f"/ws/transactions?token={good}") for _ in range(2)]
        async with http.get(f"/ws/transactions?token={good}", headers={"Upgrade": "websocket", **upgrade}) as r:
            assert r.status == 429
        for _ in range(20):
            await ws.send_json({"type": "ping"})
        while not ws.closed:
            await ws.receive(timeout=10)
        for each in extra:
            await each.close()
        async with http.get(f"/api/v1/presence/C1?token={good}") as r:
            assert r.status == 200
    return secrets


async def test_no_secret_token_or_payload_reaches_the_logs(server):
    base, settings, log_path = server
    secrets = await _traffic(base, settings)
    await asyncio.sleep(0.5)  # let the server write its last lines
    lines = log_path.read_text().splitlines()
    events = {json.loads(line).get("event") for line in lines if line.startswith("{")}
    # The capture saw the traffic; otherwise the assertion below would prove nothing.
    for expected in (
        "connection_opened",
        "handshake_rejected",
        "http_request",
        "rate_limit_close",
        "connection_closed",
    ):
        assert expected in events, sorted(e for e in events if e)
    for secret in secrets:
        leaked = [line for line in lines if secret in line]
        assert not leaked, f"{secret[:12]}... appears in the log: {leaked[0][:300]}"
