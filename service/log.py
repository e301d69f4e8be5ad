"""structlog JSON logging for the whole process, and an access log that never records a query string."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Keys whose values never reach a log line, whoever passes them.
_SECRET_KEYS: Final = frozenset({"token", "authorization", "secret", "password", "jwt", "payload"})


# Token-shaped text anywhere in a rendered line, whoever wrote it: aiohttp quotes the request
# line or a header in its parser errors, an exception may carry a URL. A JWT header is JSON, so
# its base64url starts `eyJ` (`{"`), or `ey`/`ew` when a space or newline follows the brace: from
# `eyJ` anything is redacted (aiohttp quotes the first 100 bytes, a token cut short is a secret
# too), from `ey`/`ew` two dotted segments. Possessive repeats: no backtracking through long ids.
_B64: Final = "[A-Za-z0-9_-]"
_JWT_SHAPED: Final = re.compile(
    rf"eyJ{_B64}{{4,}}+(?:\.{_B64}*+){{0,2}}|e[wy]{_B64}{{8,}}+\.{_B64}{{8,}}+(?:\.{_B64}*+)?"
)
# Whatever follows `Bearer ` or `token=` up to a separator: a token spoilt by a bad byte is still one.
_AFTER_KEYWORD: Final = re.compile(r"(?i)(bearer\s+|token=)[^\s&'\"\\]+")
REDACTED: Final = "[redacted]"


def _drop_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _SECRET_KEYS.intersection(event):
        event[key] = REDACTED
    return event


def redact_tokens(text: str) -> str:
    """`text` with everything token-shaped replaced; the last step before any line is written."""
    text = _JWT_SHAPED.sub(REDACTED, text)
    # Most lines have neither word: the substring tests cost far less than the search.
    lowered = text.lower()
    if "bearer" in lowered or "token=" in lowered:
        text = _AFTER_KEYWORD.sub(rf"\1{REDACTED}", text)
    return text


def _redact_line(_logger: Any, _method: str, line: Any) -> str:
    # After the renderer: `line` is the JSON text (typed as an event dict by structlog).
    return redact_tokens(line)


def configure_logging(level: str = "info", *, pod_id: str | None = None) -> None:
    """Send structlog and stdlib logging to stdout as one JSON object per line."""
    numeric = _LEVELS[level]

    def add_pod_id(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("pod_id", pod_id)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_pod_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
            _redact_line,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        # Without it every call on a module's logger builds a new bound logger first (~2 µs,
        # even for a filtered-out level). The process configures logging once, before any use.
        cache_logger_on_first_use=True,
    )
    # Libraries (aiohttp, asyncio, redis) log through stdlib; render them the same way.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
                _redact_line,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


_access_log: Final = get_logger("eva_ws.access")


class AccessLogger(AbstractAccessLogger):
    """One `http_request` line per request with the path only: `?token=` must never be logged."""

    # aiohttp makes one per TCP connection: no instance dict.
    __slots__ = ()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        _access_log.info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(time * 1000, 3),
            remote=request.remote,
        )

    @property
    def enabled(self) -> bool:
        return True
