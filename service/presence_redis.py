"""Presence shared by every pod through Redis hashes, with per-pod heartbeats so a crashed pod's entries expire.

Keys (prefix = EVA_WS_REDIS_PREFIX); the braces are hash tags, so on Redis Cluster a
customer's two hashes share a slot (on one Redis they are just part of the name):
- `{prefix}presence:{<customerId>}`: hash conn_id -> JSON {"user_id", "pod_id", "connected_at", "instance"}.
- `{prefix}presence_count:{<customerId>}`: hash instance -> number of that instance's entries in the hash above.
- `{prefix}presence_pod:{instance}`: heartbeat string with a TTL of `heartbeat_ttl_s`, refreshed every third of it.

`instance` is the pod id plus a random suffix, so a pod restarted under the same name
never revives the entries of its previous life.

Reading (`list`, `count`) runs one script on the customer's hashes that deletes the
entries of instances whose heartbeat is gone and sums the counters of the others:
O(instances), not O(connections); only the first read after a crash walks the whole
hash. On one Redis the script checks the heartbeats itself. On Redis Cluster a script may
touch only its own slot and the heartbeats live in others, so the pod checks them first
(`EXISTS`) and names the dead instances to the script; a heartbeat whose master cannot
answer counts as alive. A pod's entries therefore disappear within `heartbeat_ttl_s` of a
`kill -9`, as seen by any reader. Entries of a customer nobody reads again stay until read.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import structlog

from service import redis_keys, redis_lua
from service.backend_errors import BackendUnavailable
from service.config import Settings
from service.presence import Presence, PresenceEntry
from service.redis_batch import Batcher
from service.redis_client import (
    REDIS_ERRORS,
    Topology,
    cancel_and_wait,
    client_name_part,
    client_options,
    eval_groups,
    eval_script,
    slot_group,
)

log = structlog.get_logger("eva_ws.presence")

Announcement = tuple[str, bytes]
"""A Redis PUB/SUB channel and the message PUBLISHed on it."""
Write = tuple[tuple[str, ...], str, bytes, tuple[Announcement, ...]]
"""One connection's add or remove: its customers, its id, its entry JSON (b"" removes), and
per customer the announcement of it (none: empty)."""


class RedisPresence(Presence):
    """See Presence; entries of a pod that stopped without `close` vanish within `heartbeat_ttl_s`.

    `url` names one Redis or a Redis Cluster (`redis+cluster://`); only key slots differ.
    Every call is bounded by connect + command timeout; when Redis cannot answer it raises
    BackendUnavailable. The heartbeat starts with `start` (or the first `add`, so an app that
    never calls `start` still keeps its entries alive) and keeps beating through outages;
    with each beat the pod writes again the adds and removes that failed. The adds and
    removes of concurrent connections share one script call (on a cluster, one per slot; see Batcher);
    each caller still returns only once its own write is in Redis, or raises.
    """

    def __init__(
        self,
        *,
        url: str,
        prefix: str,
        pod_id: str,
        heartbeat_ttl_s: float = 30.0,
        connect_timeout_s: float = 1.0,
        command_timeout_s: float = 1.0,
        max_connections: int = 16,
    ) -> None:
        self._prefix = prefix
        self._instance = f"{pod_id}/{secrets.token_hex(4)}"
        self._heartbeat_ttl_ms = max(1, int(heartbeat_ttl_s * 1000))
        self._timeout_s = connect_timeout_s + command_timeout_s
        topology = Topology.from_url(url)
        self._client = topology.command_client(
            max_connections=max_connections,
            wait_s=self._timeout_s,
            options=client_options(
                url,
                connect_timeout_s=connect_timeout_s,
                command_timeout_s=command_timeout_s,
                keepalive_idle_s=10,
                client_name=f"eva-ws:{client_name_part(pod_id)}:presence",
            ),
        )
        # One Redis checks heartbeats inside the read script; a cluster cannot (other slots).
        self._sharded = topology.sharded
        # This pod's own entries, re-added if its heartbeat ever lapsed (e.g. a long stall).
        self._local: dict[str, tuple[tuple[str, ...], PresenceEntry]] = {}
        # An `add` failed (Redis down): the next heartbeat writes every local entry again.
        self._rewrite_local = False
        # Connections whose `remove` failed: retried with every heartbeat until Redis takes it.
        self._unremoved: dict[str, tuple[str, ...]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self._starting = asyncio.Lock()  # concurrent first `add`s start one heartbeat, not several
        self._writes: Batcher[Write, None] = Batcher(self._apply)

    def _keys(self, customer_id: str) -> list[str]:
        return [
            redis_keys.presence_entries(self._prefix, customer_id),
            redis_keys.presence_counts(self._prefix, customer_id),
        ]

    @property
    def _heartbeat_prefix(self) -> str:
        return redis_keys.presence_heartbeat_prefix(self._prefix)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> RedisPresence:
        """The presence a pod runs with these settings; `options` are the tunables above."""
        if settings.redis_url is None:
            raise ValueError("RedisPresence needs EVA_WS_REDIS_URL")
        return cls(url=settings.redis_url, prefix=settings.redis_prefix, pod_id=settings.pod_id, **options)

    async def start(self) -> None:
        """Write the first heartbeat and keep it alive until `close`; `add` does it if not done yet.

        A Redis that is down does not fail the start: the heartbeat task keeps trying.
        """
        async with self._starting:
            if self._heartbeat is None:
                try:
                    async with self._redis_call():
                        await self._beat()
                except BackendUnavailable as exc:
                    log.warning("presence_heartbeat_failed", instance=self._instance, error=str(exc))
                self._heartbeat = asyncio.create_task(self._beat_forever(), name="redis-presence-heartbeat")

    @contextlib.asynccontextmanager
    async def _redis_call(self) -> AsyncIterator[None]:
        """Bound a call by the timeout and report any Redis failure as BackendUnavailable."""
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"presence: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """See Presence.close; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            await cancel_and_wait(self._heartbeat)
            self._heartbeat = None
        await self._writes.wait_idle()
        try:
            # The heartbeat goes first, so readers drop whatever a failure leaves.
            async with self._redis_call():
                await self._client.delete(self._heartbeat_prefix + self._instance)
            await self._apply([(customers, conn_id, b"", ()) for conn_id, (customers, _) in self._local.items()])
        except BackendUnavailable as exc:
            # The heartbeat expires anyway, and readers drop the entries then.
            log.warning("presence_close_failed", error=str(exc))
        self._local.clear()
        await self._client.aclose()

    @property
    def announces(self) -> bool:
        """Whether `add` and `remove` can publish announcements with their write (one Redis only:
        on a cluster a script reaches only its own slot, where the broker's channels are not)."""
        return not self._sharded

    async def add(
        self, customer_ids: Sequence[str], entry: PresenceEntry, *, announcements: Sequence[Announcement] = ()
    ) -> None:
        """See Presence.add. `announcements` (only if `announces`): per customer, a PUBLISH the
        same script makes after the write, so announcing costs this pod no round trip of its own."""
        value = orjson.dumps(
            {
                "user_id": entry.user_id,
                "pod_id": entry.pod_id,
                "connected_at": entry.connected_at,
                "instance": self._instance,
            }
        )
        if self._heartbeat is None:
            await self.start()  # without a heartbeat, readers would drop the entry at once
        # Kept even if Redis cannot take it now: a lapsed heartbeat re-adds every local entry.
        customers = tuple(customer_ids)
        self._local[entry.conn_id] = (customers, entry)
        try:
            await self._writes.submit((customers, entry.conn_id, value, tuple(announcements)))
        except BackendUnavailable:
            self._rewrite_local = True
            raise

    async def remove(
        self, customer_ids: Sequence[str], conn_id: str, *, announcements: Sequence[Announcement] = ()
    ) -> None:
        """See Presence.remove; `announcements` as in `add`."""
        self._local.pop(conn_id, None)
        customers = tuple(customer_ids)
        try:
            await self._writes.submit((customers, conn_id, b"", tuple(announcements)))
        except BackendUnavailable:
            self._unremoved[conn_id] = customers
            raise
        self._unremoved.pop(conn_id, None)

    async def _apply(self, writes: list[Write]) -> list[None]:
        """One script for the adds and removes of many connections; on a cluster, one per slot."""
        groups: dict[int, tuple[list[str], list[Any]]] = {}
        for customer_ids, conn_id, value, announcements in writes:
            for index, customer_id in enumerate(customer_ids):
                keys = self._keys(customer_id)
                group = groups.setdefault(slot_group(self._client, keys[0]), ([], [self._instance]))
                group[0].extend(keys)
                group[1].extend((conn_id, value, *(announcements[index] if announcements else ("", ""))))
        if groups:
            async with self._redis_call():
                await eval_groups(self._client, redis_lua.PRESENCE_APPLY, groups.values())
        return [None] * len(writes)

    async def _read(self, customer_id: str, answer: str) -> Any:
        keys = self._keys(customer_id)
        async with self._redis_call():
            if not self._sharded:
                return await eval_script(self._client, redis_lua.PRESENCE_READ, keys, [answer, self._heartbeat_prefix])
            dead = await self._dead_instances(keys[1])
            return await eval_script(self._client, redis_lua.PRESENCE_READ, keys, [answer, "", *dead])

    async def list(self, customer_id: str) -> list[PresenceEntry]:
        flat: list[bytes] = await self._read(customer_id, "list")
        entries = []
        for index in range(0, len(flat) - 1, 2):
            entry = _parse(flat[index], flat[index + 1])
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: e.connected_at)

    async def count(self, customer_id: str) -> int:
        return int(await self._read(customer_id, "count"))

    async def _dead_instances(self, counts_key: str) -> tuple[str, ...]:
        """The instances of a count hash whose heartbeat is gone: O(pods with entries for this customer)."""
        raw = await self._client.hkeys(counts_key)
        instances = [i.decode(errors="replace") if isinstance(i, bytes) else i for i in raw]
        found = await asyncio.gather(
            *(self._client.exists(self._heartbeat_prefix + i) for i in instances), return_exceptions=True
        )
        # A heartbeat on a master that cannot answer counts as alive: a dead master must not
        # hide other customers' connections, and must not purge the entries of live pods.
        return tuple(instance for instance, exists in zip(instances, found, strict=True) if exists == 0)

    async def _beat(self) -> bool:
        """Refresh the heartbeat; True if it had lapsed (readers may have dropped our entries)."""
        previous = await self._client.set(
            self._heartbeat_prefix + self._instance, str(time.time()), px=self._heartbeat_ttl_ms, get=True
        )
        return previous is None

    async def _refresh(self) -> None:
        """One heartbeat; if it had lapsed, readers may have purged our entries, so write them again."""
        async with self._redis_call():
            lapsed = await self._beat()
        for conn_id, customer_ids in list(self._unremoved.items()):
            await self.remove(customer_ids, conn_id)
        if (lapsed or self._rewrite_local) and self._local:
            if lapsed:
                log.warning("presence_heartbeat_lapsed", instance=self._instance, entries=len(self._local))
            self._rewrite_local = False
            for customer_ids, entry in list(self._local.values()):
                await self.add(customer_ids, entry)

    async def _beat_forever(self) -> None:
        interval_s = self._heartbeat_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._refresh()
            except BackendUnavailable as exc:
                # Keep beating: Redis may be back by the next tick, before the TTL runs out.
                log.warning("presence_heartbeat_failed", instance=self._instance, error=str(exc))


def _parse(conn_id: bytes, raw: bytes) -> PresenceEntry | None:
    try:
        data: dict[str, Any] = orjson.loads(raw)
        return PresenceEntry(
            conn_id=conn_id.decode(),
            user_id=str(data["user_id"]),
            pod_id=str(data["pod_id"]),
            connected_at=float(data["connected_at"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        log.warning("presence_entry_invalid", size=len(raw))
        return None
