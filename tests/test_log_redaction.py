"""No token in any log line, whichever logger writes it: hostile request lines against a real process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from fleet.process import ServiceProcess
from service.auth import mint_token
from service.config import load_settings
from service.log import redact_tokens
from service.protocol import MAX_TOKEN_LENGTH
from tests.conftest import SECRET

ROOT: Final = Path(__file__).resolve().parent.parent

# Request lines and headers that aiohttp's parser refuses, each carrying the token where a client
# would put it; aiohttp's error for each quotes the offending line.
_WS: Final = b"GET /ws/transactions"
_HOST: Final = b"\r\nHost: a\r\n"
HOSTILE_REQUESTS: Final = {
    "control_character_in_query": _WS + b"?token=%(token)s&x=\x01 HTTP/1.1" + _HOST + b"\r\n",
    "raw_utf8_in_query": _WS + b"?token=%(token)s&x=\xc3\xa9 HTTP/1.1" + _HOST + b"\r\n",
    "tab_in_query": _WS + b"?token=%(token)s&x=\t HTTP/1.1" + _HOST + b"\r\n",
    "del_in_query": _WS + b"?token=%(token)s&x=\x7f HTTP/1.1" + _HOST + b"\r\n",
    "http_9_9": _WS + b"?token=%(token)s HTTP/9.9" + _HOST + b"\r\n",
    "bad_byte_after_bearer_token": _WS + b" HTTP/1.1" + _HOST + b"Authorization: Bearer %(token)s\x01\r\n\r\n",
    "bad_byte_before_bearer_token": _WS + b" HTTP/1.1" + _HOST + b"Authorization: Bearer \x01%(token)s\r\n\r\n",
    "url_over_the_line_limit": _WS + b"?token=%(token)s&pad=" + b"a" * 9000 + b" HTTP/1.1" + _HOST + b"\r\n",
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = ServiceProcess(tmp_path_factory.mktemp("log"), jwt_secret=SECRET, mode="production", log_level="debug")
    # Each line reaches the file as it is written: a refusal is logged before its reply is sent.
    process.env["PYTHONUNBUFFERED"] = "1"
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _exchange(port: int, raw: bytes) -> bytes:
    """Send `raw`, read until the server closes; the reply is the server's whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def _token(sub: str) -> str:
    return mint_token(load_settings({"EVA_WS_JWT_SECRET": SECRET}), sub=sub, customers=["C1"])


def _fragments(token: str) -> list[str]:
    """The token, its first 20 characters, and each of its three parts."""
    return [token, token[:20], *token.split(".")]


@pytest.mark.parametrize("case", sorted(HOSTILE_REQUESTS))
def test_hostile_request_lines_log_no_token(service: ServiceProcess, case: str) -> None:
    token = _token("alice")
    reply = _exchange(service.port, HOSTILE_REQUESTS[case] % {b"token": token.encode()})
    log = service.log()
    assert "Error handling request" in log or "http_request_refused" in log, log
    for fragment in _fragments(token):
        assert fragment not in log, f"{case}: {fragment[:12]}… logged"
    for fragment in _fragments(token):
        assert fragment.encode() not in reply, f"{case}: the reply repeats the token"
    assert reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "bad_request"


def test_accepted_tokens_fit_in_the_request_line() -> None:
    # A request line may be as long as the request-head budget, at least 8,192 bytes; a token at
    # the length limit must leave room for the path and the other query parameters.
    assert MAX_TOKEN_LENGTH + len("GET /ws/transactions?token=&customerId=&reconnect=1 HTTP/1.1") + 128 < 8192


# Each logger the process writes through: structlog's own, aiohttp's and asyncio's (stdlib), an
# exception's traceback. Run in a fresh interpreter: logging is configured once per process.
_LOG_EVERYWHERE = """
import logging, sys, structlog
from service.log import configure_logging
token = sys.argv[1]
configure_logging("debug")
structlog.get_logger("eva_ws.test").info("an_event", url="/ws?token=" + token, detail=token[:40])
logging.getLogger("aiohttp.server").error("Error handling request %s", "Bearer " + token)
try:
    raise ValueError("bad " + token)
except ValueError:
    logging.getLogger("asyncio").exception("Task exception was never retrieved")
"""


def test_every_logger_redacts_tokens() -> None:
    token = _token("bob")
    result = subprocess.run(
        [sys.executable, "-c", _LOG_EVERYWHERE, token], capture_output=True, text=True, check=True, cwd=ROOT
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result
    assert all(json.loads(line)["event"] for line in lines)
    assert "ValueError" in lines[2], lines[2]
    for fragment in _fragments(token):
        assert fragment not in result.stdout + result.stderr
    assert "[redacted]" in result.stdout


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("redis://eva-ws-redis-master.production.svc.cluster.local:6379", True),
        ("conn_id 0123456789abcdef0123456789abcdef", True),
        ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIi", False),
        ("Authorization: Bearer not-a-jwt-but-secret", False),
        ("BeArEr not-a-jwt-but-secret", False),
        ("GET /ws?customerId=C1&token=not-a-jwt&reconnect=1", False),
        # A header with a space or a newline after the brace: base64url `ey`/`ew`.
        ("ewogICJhbGciOiAiSFMyNTYiCn0.eyJzdWIiOiJhbGljZSJ9.c2ln", False),
        ("eyAiYWxnIjogIkhTMjU2In0.eyJzdWIiOiJhbGljZSJ9", False),
        ("the eyebrows.are fine", True),
    ],
)
def test_redaction_keeps_ordinary_text(text: str, kept: bool) -> None:
    assert (redact_tokens(text) == text) is kept
