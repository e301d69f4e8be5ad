"""`eva-ws` as a new user meets it: help, version, tokens the server accepts, clear refusals, a prompt Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fleet.ports import free_port
from service.config import ENV_PREFIX, Settings
from service.protocol import CloseCode
from tests.conftest import SECRET, make_settings, token_for, wait_closed

CLI = [sys.executable, "-m", "service"]


def _env(**settings: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return {**clean, **{ENV_PREFIX + k.upper(): v for k, v in settings.items()}}


def _cli(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=_env(**settings), capture_output=True, text=True, timeout=60, check=False)


def _on_a_terminal(*args: str, **settings: str) -> tuple[int, list[str]]:
    """Run the command with stdout and stderr on one pseudo-terminal, as in a shell; its exit code and lines."""
    controller, terminal = pty.openpty()
    with subprocess.Popen([*CLI, *args], env=_env(**settings), stdout=terminal, stderr=terminal) as process:
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not chunk:
                break
            output += chunk
        os.close(controller)
        code = process.wait(timeout=60)
    return code, [line for line in output.decode().splitlines() if line.strip()]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port that a socket of the test is listening on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


# -- help and version ---------------------------------------------------------------


def test_serve_help_lists_the_options_and_main_settings():
    result = _cli("serve", "--help")
    assert result.returncode == 0
    for name in ("--port", "--host", "EVA_WS_PORT", "EVA_WS_REDIS_URL", "EVA_WS_JWT_SECRET", "docs/configuration.md"):
        assert name in result.stdout, name
    # Every variable it names is one the server reads.
    known = {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__}
    named = {word.strip(",.()") for word in result.stdout.split() if word.startswith(ENV_PREFIX)} - {"EVA_WS_*"}
    assert {n.removesuffix("_FILE") for n in named} <= known


def test_version_prints_the_installed_version():
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"eva-ws {metadata.version('eva-ws')}"


# -- token ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--sub", "bad sub!"), "--sub"),
        (("--sub", "alice", "--customer", "CUST 1"), "--customer"),
        (("--sub", "alice", "--role", "superuser"), "--role"),
        (("--sub", "alice", "--ttl", "0"), "--ttl"),
    ],
)
def test_token_refuses_what_the_server_would_refuse_and_names_the_option(args: tuple[str, ...], named: str):
    result = _cli("token", *args, jwt_secret=SECRET)
    assert result.returncode == 2
    assert result.stdout == ""
    assert named in result.stderr


def test_token_applies_the_servers_own_checks_to_the_token_it_mints():
    # Each customer is a valid id; a thousand of them make a token longer than the server reads.
    too_many = [arg for n in range(1000) for arg in ("--customer", f"CUST-{n:04}")]
    result = _cli("token", "--sub", "alice", *too_many, jwt_secret=SECRET)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "eva-ws: the server would refuse this token: token is missing or too long\n"


def test_token_mints_what_the_server_accepts_with_audience_and_issuer():
    result = _cli(
        "token", "--sub", "alice@example.com", "--customer", "CUST-001", "--role", "admin",
        jwt_secret=SECRET, jwt_audience="eva", jwt_issuer="https://idp.example.com",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"], audience="eva")
    assert (claims["sub"], claims["customerId"], claims["roles"]) == ("alice@example.com", "CUST-001", ["admin"])


def test_token_signed_with_a_key_the_server_does_not_verify_with_is_not_printed():
    def pem(key: ed25519.Ed25519PrivateKey, *, public: bool) -> str:
        if public:
            return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
        return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()

    signing, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    settings = {"jwt_algorithms": "EdDSA", "jwt_private_key": pem(signing, public=False)}
    accepted = _cli("token", "--sub", "alice", **settings, jwt_public_key=pem(signing, public=True))
    assert accepted.returncode == 0, accepted.stderr
    refused = _cli("token", "--sub", "alice", **settings, jwt_public_key=pem(other, public=True))
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr == "eva-ws: the server would refuse this token: token signature is invalid\n"


@pytest.mark.parametrize("settings", [{"mode": "development"}, {}])
def test_token_without_a_secret_says_where_scripts_run_keeps_it(settings: dict[str, str]):
    result = _cli("token", "--sub", "alice", **settings)
    assert result.returncode == 2
    assert "EVA_WS_JWT_SECRET" in result.stderr
    assert ".eva-ws-dev.env" in result.stderr


# -- serve: refusals ----------------------------------------------------------------------


def test_a_configuration_error_is_said_once_on_a_terminal():
    code, lines = _on_a_terminal("serve", mode="production")
    assert code == 2
    assert lines == [
        "eva-ws: configuration error: EVA_WS_JWT_SECRET (or EVA_WS_JWT_KEYS) is required in production "
        "(at least 32 bytes)"
    ]


def test_a_port_in_use_is_one_clear_line_on_a_terminal(busy_port: int):
    code, lines = _on_a_terminal("serve", "--host", "127.0.0.1", "--port", str(busy_port), jwt_secret=SECRET)
    assert code == 1
    errors = [line for line in lines if not line.startswith("{")]
    assert errors == [
        f"eva-ws: cannot listen on 127.0.0.1:{busy_port}: Address already in use "
        "(another process has it; choose another port with --port or EVA_WS_PORT)"
    ]
    # The rest is the ordinary log of a start that stopped cleanly.
    assert all(json.loads(line)["level"] == "info" for line in lines if line.startswith("{"))


def test_a_port_in_use_is_a_json_event_for_log_collectors(busy_port: int):
    result = _cli("serve", host="127.0.0.1", port=str(busy_port), jwt_secret=SECRET)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert (events[-1]["event"], events[-1]["level"]) == ("listen_failed", "error")
    assert [e for e in events if e["level"] != "info"] == [events[-1]]


# -- serve: Ctrl-C ---------------------------------------------------------------------------


def _serve_until_started(*args: str, **settings: str) -> tuple[subprocess.Popen[str], list[dict[str, Any]]]:
    process = subprocess.Popen(
        [*CLI, "serve", *args], env=_env(**settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    events = []
    for line in process.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "server_started":
            return process, events
    raise AssertionError(f"the server did not start: {process.stderr.read() if process.stderr else ''}")


def test_ctrl_c_without_connections_skips_the_drain_delay():
    process, events = _serve_until_started(
        host="127.0.0.1", port="0", mode="development", jwt_secret=SECRET, drain_delay_s="30"
    )
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    events += [json.loads(line) for line in stdout.splitlines()]
    drain = next(e for e in events if e["event"] == "drain_started")
    assert (drain["connections"], drain["delay_s"]) == (0, 0.0)
    assert events[-1]["event"] == "server_stopped"


async def test_a_second_ctrl_c_during_the_drain_closes_the_sockets_at_once_with_their_close_frame():
    port = free_port()
    process, _ = _serve_until_started(
        host="127.0.0.1", port=str(port), mode="development", jwt_secret=SECRET, drain_delay_s="30"
    )
    assert process.stdout is not None
    try:
        token = token_for(make_settings(), customers=["C1"])
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{port}/ws/transactions?token={token}") as ws,
        ):
            process.send_signal(signal.SIGINT)
            while json.loads(await asyncio.to_thread(process.stdout.readline))["event"] != "drain_started":
                pass
            process.send_signal(signal.SIGINT)  # impatient: do not wait out the 30 s delay
            assert await wait_closed(ws, timeout_s=20) == CloseCode.SERVICE_RESTART
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
    assert json.loads(stdout.splitlines()[-1])["event"] == "server_stopped"
