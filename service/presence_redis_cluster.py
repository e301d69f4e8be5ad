"""Presence on Redis Cluster: RedisPresence's hashes and heartbeats, with each script confined to one slot.

Keys (prefix = EVA_WS_REDIS_PREFIX); the braces are hash tags, so a customer's two hashes share a slot:
- `<prefix>presence:{<customerId>}`: hash conn_id -> JSON {"user_id", "pod_id", "connected_at", "instance"}.
- `<prefix>presence_count:{<customerId>}`: hash instance -> number of that instance's entries in the hash above.
- `<prefix>presence_pod:<instance>`: heartbeat string with a TTL of `heartbeat_ttl_s`, refreshed every third of it.

A script on Redis Cluster may touch only its own slot, and the heartbeats live in other
slots, so reading takes two steps instead of RedisPresence's one script: the pod reads
the customer's instances and checks their heartbeats, then one script on the customer's
slot drops the entries of the instances whose heartbeat is gone and sums the counters of
the others. A heartbeat that cannot be read (its master is down) counts as alive.

A pod whose heartbeat lapsed (a stall longer than the TTL) writes its entries again on
its next beat; a reader that checked the heartbeat just before that beat can still drop
them, and they come back only after the next lapse or reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import orjson
import structlog

from service.broker.base import BrokerUnavailable
from service.config import Settings
from service.presence import Presence, PresenceEntry
from service.presence_redis import _ADD, _REMOVE, _parse
from service.redis_client import cancel_and_wait, client_name_part, client_options
from service.redis_cluster_client import CLUSTER_ERRORS, cluster_client, eval_script

log = structlog.get_logger("eva_ws.presence")

# KEYS: entries hash, counts hash. ARGV: the instances whose heartbeat is gone.
_PURGE: Final = """
local dead, any_dead = {}, false
for i = 1, #ARGV do
  dead[ARGV[i]] = true
  any_dead = true
end
local counts = redis.call('HGETALL', KEYS[2])
local total = 0
for i = 1, #counts, 2 do
  if not dead[counts[i]] then
    total = total + tonumber(counts[i + 1])
  end
end
if any_dead then
  local flat = redis.call('HGETALL', KEYS[1])
  for i = 1, #flat, 2 do
    local ok, entry = pcall(cjson.decode, flat[i + 1])
    if ok and type(entry) == 'table' and dead[entry['instance']] then
      redis.call('HDEL', KEYS[1], flat[i])
    end
  end
  for instance in pairs(dead) do
    redis.call('HDEL', KEYS[2], instance)
  end
end
"""
_COUNT: Final = _PURGE + "return total\n"
_LIST: Final = _PURGE + "return redis.call('HGETALL', KEYS[1])\n"


class RedisClusterPresence(Presence):
    """See Presence and RedisPresence: the same behaviour and tunables, on Redis Cluster.

    A connection with several customers writes one script per customer, in parallel,
    since each customer's hashes may live on a different master. Every call is bounded
    by connect + command timeout and raises BrokerUnavailable when the master of a
    customer's slot cannot answer (the handlers answer 503 or carry on without presence).
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
        options = client_options(
            url,
            connect_timeout_s=connect_timeout_s,
            command_timeout_s=command_timeout_s,
            keepalive_idle_s=10,
            client_name=f"eva-ws:{client_name_part(pod_id)}:presence",
        )
        self._client = cluster_client(url, max_connections=max_connections, options=options)
        # This pod's own entries, re-added if its heartbeat ever lapsed (e.g. a long stall).
        self._local: dict[str, tuple[tuple[str, ...], PresenceEntry]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self._starting = asyncio.Lock()  # concurrent first `add`s start one heartbeat, not several

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> RedisClusterPresence:
        """The presence a pod runs with these settings; `options` are the tunables above."""
        if settings.redis_url is None:
            raise ValueError("RedisClusterPresence needs EVA_WS_REDIS_URL")
        return cls(url=settings.redis_url, prefix=settings.redis_prefix, pod_id=settings.pod_id, **options)

    def _keys(self, customer_id: str) -> list[str]:
        return [f"{self._prefix}presence:{{{customer_id}}}", f"{self._prefix}presence_count:{{{customer_id}}}"]

    def _heartbeat_key(self, instance: str) -> str:
        return f"{self._prefix}presence_pod:{instance}"

    async def start(self) -> None:
        """Write the first heartbeat and keep it alive until `close`; `add` does it if not done yet."""
        async with self._starting:
            if self._heartbeat is None:
                async with asyncio.timeout(self._timeout_s):
                    await self._beat()
                self._heartbeat = asyncio.create_task(self._beat_forever(), name="redis-presence-heartbeat")

    async def close(self) -> None:
        """See Presence.close; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            await cancel_and_wait(self._heartbeat)
            self._heartbeat = None
        try:
            # The heartbeat goes first, so readers drop whatever a failure leaves.
            async with asyncio.timeout(self._timeout_s):
                await self._client.delete(self._heartbeat_key(self._instance))
                await asyncio.gather(
                    *(
                        self._remove_one(customer_id, conn_id)
                        for conn_id, (customer_ids, _) in self._local.items()
                        for customer_id in customer_ids
                    )
                )
        except CLUSTER_ERRORS as exc:
            # The heartbeat expires anyway, and readers drop the entries then.
            log.warning("presence_close_failed", error=type(exc).__name__)
        self._local.clear()
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def _bounded(self, operation: str) -> AsyncIterator[None]:
        """Bound a call by connect + command timeout; a master that cannot answer is BrokerUnavailable."""
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except CLUSTER_ERRORS as exc:
            raise BrokerUnavailable(f"presence {operation} failed: {type(exc).__name__}") from exc

    async def add(self, customer_ids: Sequence[str], entry: PresenceEntry) -> None:
        value = orjson.dumps(
            {
                "user_id": entry.user_id,
                "pod_id": entry.pod_id,
                "connected_at": entry.connected_at,
                "instance": self._instance,
            }
        )
        if self._heartbeat is None:
            async with self._bounded("start"):
                await self.start()  # without a heartbeat, readers would drop the entry at once
        async with self._bounded("add"):
            await asyncio.gather(
                *(
                    eval_script(self._client, _ADD, self._keys(customer_id), [entry.conn_id, value, self._instance])
                    for customer_id in customer_ids
                )
            )
        self._local[entry.conn_id] = (tuple(customer_ids), entry)

    async def remove(self, customer_ids: Sequence[str], conn_id: str) -> None:
        self._local.pop(conn_id, None)
        async with self._bounded("remove"):
            await asyncio.gather(*(self._remove_one(customer_id, conn_id) for customer_id in customer_ids))

    async def _remove_one(self, customer_id: str, conn_id: str) -> None:
        await eval_script(self._client, _REMOVE, self._keys(customer_id), [conn_id, self._instance])

    async def list(self, customer_id: str) -> list[PresenceEntry]:
        async with self._bounded("list"):
            dead = await self._dead_instances(customer_id)
            flat = await eval_script(self._client, _LIST, self._keys(customer_id), [*dead])
        entries = []
        for index in range(0, len(flat) - 1, 2):
            entry = _parse(flat[index], flat[index + 1])
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: e.connected_at)

    async def count(self, customer_id: str) -> int:
        async with self._bounded("count"):
            dead = await self._dead_instances(customer_id)
            total = await eval_script(self._client, _COUNT, self._keys(customer_id), [*dead])
        return int(total)

    async def _dead_instances(self, customer_id: str) -> tuple[str, ...]:
        """The customer's instances whose heartbeat is gone: O(pods with entries for this customer)."""
        raw = await self._client.hkeys(self._keys(customer_id)[1])
        instances = [i.decode(errors="replace") if isinstance(i, bytes) else i for i in raw]
        found = await asyncio.gather(
            *(self._client.exists(self._heartbeat_key(i)) for i in instances), return_exceptions=True
        )
        # A heartbeat on a master that cannot answer counts as alive: a dead master must not
        # hide other customers' connections, and must not purge the entries of live pods.
        return tuple(instance for instance, exists in zip(instances, found, strict=True) if exists == 0)

    async def _beat(self) -> bool:
        """Refresh the heartbeat; True if it had lapsed (readers may have dropped our entries)."""
        previous = await self._client.set(
            self._heartbeat_key(self._instance), str(time.time()), px=self._heartbeat_ttl_ms, get=True
        )
        return previous is None

    async def _refresh(self) -> None:
        """One heartbeat; if it had lapsed, readers may have purged our entries, so write them again."""
        async with asyncio.timeout(self._timeout_s):
            lapsed = await self._beat()
        if lapsed and self._local:
            log.warning("presence_heartbeat_lapsed", instance=self._instance, entries=len(self._local))
            for customer_ids, entry in list(self._local.values()):
                await self.add(customer_ids, entry)

    async def _beat_forever(self) -> None:
        interval_s = self._heartbeat_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._refresh()
            except CLUSTER_ERRORS as exc:
                # Keep beating: Redis may be back by the next tick, before the TTL runs out.
                log.warning("presence_heartbeat_failed", instance=self._instance, error=type(exc).__name__)
