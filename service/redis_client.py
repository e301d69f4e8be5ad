"""How every part of a pod connects to Redis: redis-py options pinned explicitly, and task shutdown."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

from redis._parsers import _AsyncHiredisParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def _keepalive_options(idle_s: int) -> dict[int, int]:
    # Explicit, because redis-py changed these defaults between 7.x and 8.0.
    options: dict[int, int] = {}
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", max(1, idle_s // 3)), ("TCP_KEEPCNT", 3)):
        constant = getattr(socket, name, None)
        if constant is not None:
            options[constant] = value
    return options


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait until it has really stopped."""
    # Cancel until it sticks: on Python 3.11 asyncio.wait_for (redis-py sends with it)
    # can swallow a cancellation that races with the send completing.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)


def client_name_part(text: str) -> str:
    """`text` made safe for CLIENT SETNAME, which refuses spaces and newlines."""
    return re.sub(r"[^0-9A-Za-z._:/-]", "_", text)[:64]


def client_options(
    url: str, *, connect_timeout_s: float, command_timeout_s: float, keepalive_idle_s: int, client_name: str
) -> dict[str, Any]:
    """redis-py options pinned explicitly: timeouts, keepalive, RESP2, no hidden retries."""
    options: dict[str, Any] = {
        "socket_timeout": command_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        # No retries inside redis-py: a retried publish script could run twice, and
        # the subscriber's reconnects belong to one loop that also resubscribes.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "protocol": 2,
        "client_name": client_name,
        "parser_class": _AsyncHiredisParser,
    }
    if not url.startswith("unix://"):  # TCP keepalive exists only for TCP
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = _keepalive_options(keepalive_idle_s)
    return options


def command_client(url: str, *, max_connections: int, wait_s: float, **options: Any) -> Redis:
    """A client whose commands queue for one of `max_connections` connections for up to
    `wait_s`, instead of failing at once when a burst (e.g. a reconnect storm of resumes)
    needs more connections than the pool allows."""
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait_s, **options)
    return Redis.from_pool(pool)
