"""The stores every backend contract runs against (in-process, one Redis, a Redis Cluster) as pytest fixtures.

A contract test asks for `store` and runs once per topology. `store` is running; `absent_store`
has a URL but nothing listening until the test calls `up()`. The cluster of the `store`
fixture is shared by a whole test module: a test that takes its nodes away uses `absent_store`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer

TOPOLOGIES: Final = ("memory", "redis", "cluster")


@dataclass
class Store:
    """Where the backends under test keep their shared state, and the faults a test can cause there."""

    topology: str
    # EVA_WS_REDIS_URL; None for the in-process backends.
    url: str | None = None
    servers: list[RedisServer] = field(default_factory=list)
    cluster: RedisCluster | None = None
    # Keys of one test never meet another test's keys on a shared server.
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:6]}:")
    _created: bool = True

    @property
    def shared(self) -> bool:
        """Several pods share this store (and it can be down); false for the in-process backends."""
        return self.url is not None

    def up(self) -> None:
        """Start whatever is not running; a cluster that was never created is created now."""
        if self.cluster is not None and not self._created:
            self.cluster.start()
            self._created = True
            return
        for server in self.servers:
            if server.process is None:
                server.start()
        if self.cluster is not None:
            self.cluster.wait_ok()

    def down(self) -> None:
        """Kill every server (kill -9)."""
        for server in self.servers:
            server.kill()

    def pause_writes(self, duration_ms: int) -> None:
        """CLIENT PAUSE WRITE on every server: PUBLISH waits while PINGs are still answered (a deaf link)."""
        for server in self.servers:
            server.cli("CLIENT", "PAUSE", str(duration_ms), "WRITE")

    def cli(self, *args: str) -> list[str]:
        """One redis-cli command on every server; their replies."""
        return [server.cli(*args) for server in self.servers]


def _redis(directory: Path) -> Store:
    server = RedisServer(directory)
    return Store("redis", url=server.url, servers=[server])


def _cluster(directory: Path) -> Store:
    cluster = RedisCluster(directory)
    return Store("cluster", url=cluster.url, servers=list(cluster.nodes), cluster=cluster, _created=False)


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One Redis Cluster for a module's tests that leave every node running."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=TOPOLOGIES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A running store of each topology."""
    if request.param == "memory":
        yield Store("memory")
    elif request.param == "redis":
        made = _redis(tmp_path)
        made.up()
        yield made
        made.down()
    else:
        cluster: RedisCluster = request.getfixturevalue("module_cluster")
        yield Store("cluster", url=cluster.url, servers=list(cluster.nodes), cluster=cluster)


@pytest.fixture(params=TOPOLOGIES)
def absent_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store of each topology that is not running yet (nothing to start for the in-process one)."""
    if request.param == "memory":
        yield Store("memory")
        return
    made = _redis(tmp_path) if request.param == "redis" else _cluster(tmp_path)
    yield made
    made.down()
