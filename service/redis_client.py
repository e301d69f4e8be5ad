"""How every part of a pod connects to Redis, one server or a Cluster (redis+cluster://): redis-py options
pinned explicitly, the command client of either topology, scripts by SHA1, and task shutdown."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from redis._parsers import _AsyncHiredisParser
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError


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


CLUSTER_SCHEME = "redis+cluster://"

Address = tuple[str, int]

# Script calls of one batch in flight at once on a cluster, all masters together: below the
# smallest connection pool, since redis-py's cluster client fails a command that finds its
# node's pool exhausted instead of waiting.
SLOT_CALLS_IN_FLIGHT: Final = 8

# What a command can raise when Redis cannot answer, on either topology: redis-py's cluster
# errors (no reachable node, slot not covered) are not RedisErrors.
REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError, TimeoutError)


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def parse_cluster_url(url: str) -> tuple[list[Address], dict[str, str]]:
    """Seed nodes and credentials of `redis+cluster://[user:password@]host:port[,host:port...]`."""
    if not is_cluster_url(url):
        raise ValueError("a Redis Cluster URL starts with redis+cluster://")
    rest = url[len(CLUSTER_SCHEME) :].split("/", 1)[0].split("?", 1)[0]
    credentials: dict[str, str] = {}
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        if user:
            credentials["username"] = unquote(user)
        if password:
            credentials["password"] = unquote(password)
    seeds: list[Address] = []
    for part in rest.split(","):
        parsed = urlsplit(f"//{part.strip()}")
        if not parsed.hostname:
            raise ValueError(f"no host in cluster node {part!r}")
        seeds.append((parsed.hostname, parsed.port or 6379))
    return seeds, credentials


def server_address(url: str) -> Address:
    """Host and port of a one-server URL (`redis://`, `rediss://`), or the socket path and 0 (`unix://`)."""
    parsed = urlsplit(url)
    if parsed.scheme == "unix":
        return parsed.path, 0
    return parsed.hostname or "localhost", parsed.port or 6379


def cluster_client(url: str, *, max_connections: int, options: dict[str, Any]) -> RedisCluster:
    """A RedisCluster for commands, with the options of `redis_client.client_options` and the URL's credentials.

    It follows MOVED and ASK by itself; a lost connection is not retried (a retried
    publish script could run twice) but makes the next command re-read the slot map.
    """
    seeds, credentials = parse_cluster_url(url)
    # RedisCluster picks the hiredis parser by itself and takes no parser_class.
    cluster_options: dict[str, Any] = {key: value for key, value in options.items() if key != "parser_class"}
    cluster_options.update(credentials)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        max_connections=max_connections,
        # A dead master must not stop commands for the slots of the others.
        require_full_coverage=False,
        **cluster_options,
    )


@dataclass(frozen=True, slots=True)
class Topology:
    """One Redis or a Redis Cluster, as EVA_WS_REDIS_URL names it: the one place that tells them apart.

    A single Redis is a cluster of one node that owns every slot. What differs is how the
    nodes are found (the URL's server, or the slot map asked from the cluster's seeds), how
    commands reach them (one pool, or redis-py's RedisCluster), and whether PUB/SUB is
    sharded.
    """

    url: str
    sharded: bool
    # The cluster's seed nodes, or the one server.
    seeds: tuple[Address, ...]
    credentials: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_url(cls, url: str) -> Topology:
        if is_cluster_url(url):
            seeds, credentials = parse_cluster_url(url)
            return cls(url, True, tuple(seeds), tuple(credentials.items()))
        return cls(url, False, (server_address(url),))

    def command_client(self, *, max_connections: int, wait_s: float, options: dict[str, Any]) -> Redis | RedisCluster:
        """`cluster_client` on a cluster (`max_connections` per master), else a pool of
        `max_connections` whose commands wait up to `wait_s` for a free connection."""
        if self.sharded:
            return cluster_client(self.url, max_connections=max_connections, options=options)
        return command_client(self.url, max_connections=max_connections, wait_s=wait_s, **options)

    def node_client(self, address: Address, options: dict[str, Any]) -> Redis:
        """A client of one node only (a PUB/SUB link's), never redirected to another."""
        if self.sharded:
            pool_options: dict[str, Any] = {**options, **dict(self.credentials)}
            return Redis.from_pool(ConnectionPool(host=address[0], port=address[1], **pool_options))
        return Redis.from_url(self.url, **options)


def any_command_client(
    url: str, *, max_connections: int, wait_s: float, options: dict[str, Any]
) -> Redis | RedisCluster:
    """`Topology.command_client` of the topology `url` names."""
    return Topology.from_url(url).command_client(max_connections=max_connections, wait_s=wait_s, options=options)


async def eval_script(client: Redis | RedisCluster, script: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA (on a cluster: on the master of the keys' slot), EVAL if the node does not know the script yet.

    Not redis-py's Script: on NOSCRIPT it runs SCRIPT LOAD on every master, which fails
    while any master is down, even for keys whose own master is healthy. NOSCRIPT means
    the script did not run, so falling back to EVAL never runs it twice.
    """
    try:
        return await client.evalsha(_sha1(script), len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script, len(keys), *keys, *args)


@functools.cache
def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # noqa: S324  # the name Redis gives a script, not security


def slot_group(client: Redis | RedisCluster, key: str) -> int:
    """Which script call a key's operation may share: any on one Redis, those of its slot on a cluster."""
    return key_slot(key.encode()) if isinstance(client, RedisCluster) else 0


async def eval_groups(
    client: Redis | RedisCluster, script: str, calls: Iterable[tuple[list[str], list[Any]]]
) -> list[Any]:
    """One script call per (keys, args), each within one slot group; a few at a time, answers in order."""
    in_flight = asyncio.Semaphore(SLOT_CALLS_IN_FLIGHT)

    async def call(keys: list[str], args: list[Any]) -> Any:
        async with in_flight:
            return await eval_script(client, script, keys, args)

    return list(await asyncio.gather(*(call(keys, args) for keys, args in calls)))
