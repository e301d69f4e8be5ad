"""`eva-ws disconnect`, `eva-ws revoke` and `Publisher.disconnect` / `revoke` against a real pod on a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from fleet.process import ServiceProcess
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.config import ENV_PREFIX, load_settings
from service.protocol import CloseCode
from service.publisher import Publisher
from tests.conftest import SECRET, make_settings, token_for

SETTINGS = make_settings()
ADMIN = token_for(SETTINGS, sub="ops-1", customers=[], roles=["admin"])


@pytest.fixture
def pod(tmp_path: Path, redis_server: RedisServer) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, jwt_secret=SECRET, redis_url=redis_server.url, drain_delay_s="0")
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def cli(*args: str, **env: str) -> tuple[int, str, str]:
    """`python -m service <args>` without blocking the event loop the test's sockets run on."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def handshake_error(session: aiohttp.ClientSession, pod: ServiceProcess, token: str) -> str | None:
    async with session.get(f"{pod.url}/ws/transactions?token={token}") as response:
        error: str | None = (await response.json()).get("error")
        return error


async def test_eva_ws_disconnect_closes_the_users_sockets_with_4003(
    pod: ServiceProcess, session: aiohttp.ClientSession
) -> None:
    ws = await session.ws_connect(f"{pod.url}/ws/transactions?token={token_for(SETTINGS, sub='alice')}")
    code, stdout, stderr = await cli(
        "disconnect", "--user", "alice", "--reason", "bye", "--url", pod.url, "--token", ADMIN
    )
    assert (code, stderr) == (0, "")
    assert json.loads(stdout) == {"userId": "alice", "disconnected": True}
    message = await ws.receive()
    assert (message.data, message.extra) == (CloseCode.DISCONNECTED_BY_SERVER, "bye")


async def test_eva_ws_revoke_by_user_and_by_jti_with_the_url_and_token_from_the_environment(
    pod: ServiceProcess, session: aiohttp.ClientSession
) -> None:
    old, leaked, kept = (token_for(SETTINGS, sub=user) for user in ("alice", "bob", "bob"))
    env = {f"{ENV_PREFIX}URL": pod.url, f"{ENV_PREFIX}ADMIN_TOKEN": ADMIN}
    code, stdout, _ = await cli("revoke", "--user", "alice", "--before", str(int(time.time()) + 1), **env)
    assert code == 0
    assert json.loads(stdout)["revoked"] is True
    jti = jwt.decode(leaked, options={"verify_signature": False})["jti"]
    assert (await cli("revoke", "--jti", jti, **env))[0] == 0
    for token in (old, leaked):

        async def refused(token: str = token) -> bool:
            return await handshake_error(session, pod, token) == "token_revoked"

        await eventually(refused, "the revoked token is still accepted")
    assert await handshake_error(session, pod, kept) == "bad_request"  # accepted: only the upgrade is missing


async def test_eva_ws_revoke_with_a_token_without_the_admin_role_says_why_it_was_refused(pod: ServiceProcess) -> None:
    code, stdout, stderr = await cli(
        "revoke", "--user", "alice", "--before", "now", "--url", pod.url, "--token", token_for(SETTINGS, sub="x")
    )
    assert (code, stdout) == (1, "")
    assert stderr.strip() == "eva-ws: revoke refused with 403 (forbidden: the token needs the admin role)"


@pytest.mark.parametrize(
    "args",
    [
        ("disconnect", "--user", "alice"),
        ("revoke", "--user", "alice", "--url", "http://127.0.0.1:1", "--token", "t"),
        ("revoke", "--jti", "j", "--user", "alice", "--before", "now", "--url", "http://127.0.0.1:1", "--token", "t"),
        ("revoke", "--user", "alice", "--before", "yesterday", "--url", "http://127.0.0.1:1", "--token", "t"),
    ],
)
async def test_incomplete_control_commands_are_usage_errors(args: tuple[str, ...]) -> None:
    code, _, stderr = await cli(*args)
    assert code == 2
    assert "usage: eva-ws" in stderr


async def test_an_unreachable_deployment_is_named(tmp_path: Path) -> None:
    code, _, stderr = await cli("disconnect", "--user", "alice", "--url", "http://127.0.0.1:1", "--token", ADMIN)
    assert code == 1
    assert stderr.startswith("eva-ws: cannot reach http://127.0.0.1:1")


async def test_a_publisher_disconnects_and_revokes_through_the_redis_the_pods_share(
    pod: ServiceProcess, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    alice = token_for(SETTINGS, sub="alice")
    ws = await session.ws_connect(f"{pod.url}/ws/transactions?token={alice}")
    async with Publisher.connect(redis_server.url) as publisher:
        await publisher.disconnect("alice", reason="account closed")
        message = await ws.receive()
        assert (message.data, message.extra) == (CloseCode.DISCONNECTED_BY_SERVER, "account closed")
        await publisher.revoke(user_id="alice", issued_before=int(time.time()) + 1)
        with pytest.raises(ValueError, match="either"):
            await publisher.revoke(user_id="alice", jti="j")

    async def refused() -> bool:
        return await handshake_error(session, pod, alice) == "token_revoked"

    await eventually(refused, "the pod accepts a token the publisher revoked")
    # Kept in Redis: a pod that starts now refuses it too.
    pod.stop()
    pod.start()
    assert await handshake_error(session, pod, alice) == "token_revoked"


def test_the_control_commands_variables_are_not_refused_as_unknown_settings() -> None:
    # A shell that exports them for `eva-ws revoke` can still run `eva-ws serve`.
    env = {f"{ENV_PREFIX}URL": "https://ws.example.com", f"{ENV_PREFIX}ADMIN_TOKEN": ADMIN}
    assert load_settings({f"{ENV_PREFIX}JWT_SECRET": SECRET, **env}).jwt_secret == SECRET
