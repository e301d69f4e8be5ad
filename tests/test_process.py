"""The real process: CLI, settings errors, SIGTERM drain with 1012, TLS, and logs without tokens."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys

import aiohttp
import jwt
import pytest

from fleet.process import ServiceProcess
from tests.certificates import self_signed
from tests.conftest import SECRET, make_settings, token_for


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EVA_WS_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_token_command_mints_a_token_the_server_accepts():
    result = _cli(
        "token", "--sub", "alice", "--customer", "C1", "--customer", "C2", "--role", "publisher", "--ttl", "60",
        EVA_WS_JWT_SECRET=SECRET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["customerIds"] == ["C1", "C2"]
    assert claims["roles"] == ["publisher"]
    assert claims["exp"] - claims["iat"] == 60


def test_token_command_without_a_secret_explains_what_to_set():
    result = _cli("token", "--sub", "alice", EVA_WS_MODE="development")
    assert result.returncode == 2
    assert "EVA_WS_JWT_SECRET" in result.stderr


def test_serve_refuses_bad_settings_with_exit_code_2():
    result = _cli("serve", EVA_WS_MODE="production")
    assert result.returncode == 2
    assert "configuration error: EVA_WS_JWT_SECRET (or EVA_WS_JWT_KEYS) is required in production" in result.stderr
    logged = json.loads(result.stdout.splitlines()[-1])
    assert (logged["event"], logged["level"]) == ("config_invalid", "error")


async def test_sigterm_drains_readiness_then_closes_sockets_with_1012_and_exits(tmp_path):
    service = ServiceProcess(tmp_path, jwt_secret=SECRET, drain_delay_s="1.5", drain_spread_s="0.5").start()
    token = token_for(make_settings())
    try:
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(f"{service.url}/ws/transactions?token={token}") for _ in range(5)]
            assert service.proc is not None
            service.proc.send_signal(signal.SIGTERM)
            saw_not_ready = False
            for _ in range(100):
                async with session.get(f"{service.url}/readyz") as response:
                    if response.status == 503:
                        saw_not_ready = (await response.json())["reasons"] == ["draining"]
                        break
                await asyncio.sleep(0.02)
            assert saw_not_ready
            codes = []
            for ws in sockets:
                message = await ws.receive(timeout=15)
                assert message.type is aiohttp.WSMsgType.CLOSE
                codes.append(message.data)  # the server's code, as sent in its close frame
            assert codes == [1012] * 5
        assert service.proc.wait(timeout=20) == 0
        events = [json.loads(line)["event"] for line in service.log().splitlines() if line.startswith("{")]
        assert "drain_started" in events
        assert "drain_finished" in events
        assert events[-1] == "server_stopped"
    finally:
        service.stop()


@pytest.fixture
def certificate(tmp_path):
    return self_signed(tmp_path, "localhost")


async def test_wss_with_tls_settings(tmp_path, certificate):
    cert_path, key_path = certificate
    service = ServiceProcess(tmp_path, jwt_secret=SECRET, tls_cert=str(cert_path), tls_key=str(key_path)).start()
    context = ssl.create_default_context(cafile=str(cert_path))
    context.check_hostname = False
    try:
        async with aiohttp.ClientSession() as session:
            token = token_for(make_settings())
            ws = await session.ws_connect(f"wss://127.0.0.1:{service.port}/ws/transactions?token={token}", ssl=context)
            await ws.send_json({"type": "ping", "correlationId": "tls"})
            assert (await ws.receive_json(timeout=5))["correlationId"] == "tls"
            await ws.close()
    finally:
        service.stop()


async def test_logs_are_json_with_connection_ids_and_never_contain_the_token(tmp_path):
    service = ServiceProcess(tmp_path, jwt_secret=SECRET).start()
    token = token_for(make_settings(), sub="alice")
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{service.url}/ws/transactions?token={token}")
            await ws.send_json({"type": "subscribe", "channel": "transactions"})
            await ws.receive(timeout=5)
            await ws.close()
            async with session.get(f"{service.url}/ws/transactions?token={token}x") as response:
                assert response.status == 401
    finally:
        service.stop()
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    assert token not in service.log()
    opened = next(line for line in lines if line["event"] == "connection_opened")
    assert opened["user_id"] == "alice"
    assert opened["conn_id"]
    requests = [line for line in lines if line["event"] == "http_request"]
    assert requests
    assert all("?" not in line["path"] for line in requests)
