"""structlog JSON logging for the whole process, and an access log that never records a query string."""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Keys whose values never reach a log line, whoever passes them.
_SECRET_KEYS: Final = frozenset({"token", "authorization", "secret", "password", "jwt", "payload"})


def _drop_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in _SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


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
                structlog.processors.JSONRenderer(),
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
