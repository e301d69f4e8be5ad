"""Fixtures shared by the Redis tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server without persistence, stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def persistent_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Like `redis_server`, but every acknowledged write survives a restart or kill -9."""
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.kill()
