"""Presence shared by every pod through Redis hashes, with per-pod heartbeats so a crashed pod's entries expire.

Keys (prefix = EVA_WS_REDIS_PREFIX):
- `{prefix}presence:{customerId}`: hash conn_id -> JSON {"user_id", "pod_id", "connected_at", "instance"}.
- `{prefix}presence_count:{customerId}`: hash instance -> number of that instance's entries in the hash above.
- `{prefix}presence_pod:{instance}`: heartbeat string with a TTL of `heartbeat_ttl_s`, refreshed every third of it.

`instance` is the pod id plus a random suffix, so a pod restarted under the same name
never revives the entries of its previous life.

Reading (`list`, `count`) runs one script that checks the heartbeat of every instance
listed in the count hash; entries of instances whose heartbeat is gone are deleted on
the spot. `count` is the sum of the live instances' counters: O(instances), not
O(connections); only the first read after a crash walks the whole hash. A pod's
entries therefore disappear within `heartbeat_ttl_s` of a `kill -9`, as seen by any
reader. Entries of a customer nobody reads again stay until they are read.
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
from redis.exceptions import RedisError

from service.broker.base import BrokerUnavailable
from service.config import Settings
from service.presence import Presence, PresenceEntry
from service.redis_batch import Batcher
from service.redis_client import cancel_and_wait, client_name_part, client_options, command_client
from service.redis_cluster_client import eval_script

log = structlog.get_logger("eva_ws.presence")

_PURGE: Final = """
local function purge(entries_key, counts_key, heartbeat_prefix)
  local counts = redis.call('HGETALL', counts_key)
  local total, dead, any_dead = 0, {}, false
  for i = 1, #counts, 2 do
    if redis.call('EXISTS', heartbeat_prefix .. counts[i]) == 1 then
      total = total + tonumber(counts[i + 1])
    else
      dead[counts[i]] = true
      any_dead = true
    end
  end
  if any_dead then
    local flat = redis.call('HGETALL', entries_key)
    for i = 1, #flat, 2 do
      local ok, entry = pcall(cjson.decode, flat[i + 1])
      if ok and type(entry) == 'table' and dead[entry['instance']] then
        redis.call('HDEL', entries_key, flat[i])
      end
    end
    for instance in pairs(dead) do
      redis.call('HDEL', counts_key, instance)
    end
  end
  return total
end
"""

# KEYS: entries hash, counts hash. ARGV: conn_id, entry JSON, instance.
_ADD: Final = """
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
return 1
"""
# KEYS: entries hash, counts hash. ARGV: conn_id, instance.
_REMOVE: Final = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
  end
end
return 1
"""
# Many adds and removes in one round trip, in order. KEYS: entries hash, counts hash, per
# operation. ARGV: instance, then conn_id and entry JSON per operation (an empty JSON removes).
_APPLY: Final = """
local instance = ARGV[1]
for i = 1, #KEYS / 2 do
  local entries, counts, conn_id, value = KEYS[2 * i - 1], KEYS[2 * i], ARGV[2 * i], ARGV[2 * i + 1]
  if value == '' then
    if redis.call('HDEL', entries, conn_id) == 1 then
      if redis.call('HINCRBY', counts, instance, -1) <= 0 then
        redis.call('HDEL', counts, instance)
      end
    end
  elseif redis.call('HSET', entries, conn_id, value) == 1 then
    redis.call('HINCRBY', counts, instance, 1)
  end
end
return #KEYS / 2
"""
# KEYS: entries hash, counts hash. ARGV: heartbeat key prefix.
_COUNT: Final = _PURGE + "return purge(KEYS[1], KEYS[2], ARGV[1])\n"
_LIST: Final = _PURGE + "purge(KEYS[1], KEYS[2], ARGV[1])\nreturn redis.call('HGETALL', KEYS[1])\n"


class RedisPresence(Presence):
    """See Presence; entries of a pod that stopped without `close` vanish within `heartbeat_ttl_s`.

    Every call is bounded by connect + command timeout; when Redis cannot answer it raises
    BrokerUnavailable. The heartbeat starts with `start` (or the first `add`, so an app that
    never calls `start` still keeps its entries alive) and keeps beating through outages.
    The adds and removes of concurrent connections share one script call (see Batcher); each
    caller still returns only once its own write is in Redis, or raises.
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
        self._pod_id = pod_id
        self._instance = f"{pod_id}/{secrets.token_hex(4)}"
        self._heartbeat_ttl_ms = max(1, int(heartbeat_ttl_s * 1000))
        self._timeout_s = connect_timeout_s + command_timeout_s
        self._client = command_client(
            url,
            max_connections=max_connections,
            wait_s=self._timeout_s,
            **client_options(
                url,
                connect_timeout_s=connect_timeout_s,
                command_timeout_s=command_timeout_s,
                keepalive_idle_s=10,
                client_name=f"eva-ws:{client_name_part(pod_id)}:presence",
            ),
        )
        self._remove_script = self._client.register_script(_REMOVE)
        self._count_script = self._client.register_script(_COUNT)
        self._list_script = self._client.register_script(_LIST)
        # This pod's own entries, re-added if its heartbeat ever lapsed (e.g. a long stall).
        self._local: dict[str, tuple[tuple[str, ...], PresenceEntry]] = {}
        # An `add` failed (Redis down): the next heartbeat writes every local entry again.
        self._rewrite_local = False
        # Connections whose `remove` failed: retried with every heartbeat until Redis takes it.
        self._unremoved: dict[str, tuple[str, ...]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self._starting = asyncio.Lock()  # concurrent first `add`s start one heartbeat, not several
        # Adds and removes of concurrent connections share a round trip: (customers, conn_id, JSON or b"").
        self._writes: Batcher[tuple[tuple[str, ...], str, bytes], None] = Batcher(self._apply)

    def _entries_key(self, customer_id: str) -> str:
        return f"{self._prefix}presence:{customer_id}"

    def _counts_key(self, customer_id: str) -> str:
        return f"{self._prefix}presence_count:{customer_id}"

    @property
    def _heartbeat_prefix(self) -> str:
        return f"{self._prefix}presence_pod:"

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
                except BrokerUnavailable as exc:
                    log.warning("presence_heartbeat_failed", instance=self._instance, error=str(exc))
                self._heartbeat = asyncio.create_task(self._beat_forever(), name="redis-presence-heartbeat")

    @contextlib.asynccontextmanager
    async def _redis_call(self) -> AsyncIterator[None]:
        """Bound a call by the timeout and report any Redis failure as BrokerUnavailable."""
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"presence: {type(exc).__name__}") from exc

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
            # One round trip; the heartbeat goes first, so readers drop whatever a failure leaves.
            async with asyncio.timeout(self._timeout_s), self._client.pipeline(transaction=False) as pipe:
                await pipe.delete(self._heartbeat_prefix + self._instance)
                for conn_id, (customer_ids, _) in self._local.items():
                    for customer_id in customer_ids:
                        keys = [self._entries_key(customer_id), self._counts_key(customer_id)]
                        await self._remove_script(keys=keys, args=[conn_id, self._instance], client=pipe)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            # The heartbeat expires anyway, and readers drop the entries then.
            log.warning("presence_close_failed", error=type(exc).__name__)
        self._local.clear()
        await self._client.aclose()

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
            await self.start()  # without a heartbeat, readers would drop the entry at once
        # Kept even if Redis cannot take it now: a lapsed heartbeat re-adds every local entry.
        customers = tuple(customer_ids)
        self._local[entry.conn_id] = (customers, entry)
        try:
            await self._writes.submit((customers, entry.conn_id, value))
        except BrokerUnavailable:
            self._rewrite_local = True
            raise

    async def remove(self, customer_ids: Sequence[str], conn_id: str) -> None:
        self._local.pop(conn_id, None)
        customers = tuple(customer_ids)
        try:
            await self._writes.submit((customers, conn_id, b""))
        except BrokerUnavailable:
            self._unremoved[conn_id] = customers
            raise
        self._unremoved.pop(conn_id, None)

    async def _apply(self, writes: list[tuple[tuple[str, ...], str, bytes]]) -> list[None]:
        """One script for the adds and removes of many connections."""
        keys: list[str] = []
        args: list[str | bytes] = [self._instance]
        for customer_ids, conn_id, value in writes:
            for customer_id in customer_ids:
                keys += (self._entries_key(customer_id), self._counts_key(customer_id))
                args += (conn_id, value)
        if keys:
            async with self._redis_call():
                # Not a registered Script: its call checks the client's type through a
                # runtime Protocol, a few percent of a handshake's CPU in a connect storm.
                await eval_script(self._client, _APPLY, keys, args)
        return [None] * len(writes)

    async def list(self, customer_id: str) -> list[PresenceEntry]:
        keys = [self._entries_key(customer_id), self._counts_key(customer_id)]
        async with self._redis_call():
            flat: list[bytes] = await self._list_script(keys=keys, args=[self._heartbeat_prefix])
        entries = []
        for index in range(0, len(flat) - 1, 2):
            entry = _parse(flat[index], flat[index + 1])
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: e.connected_at)

    async def count(self, customer_id: str) -> int:
        keys = [self._entries_key(customer_id), self._counts_key(customer_id)]
        async with self._redis_call():
            total = await self._count_script(keys=keys, args=[self._heartbeat_prefix])
        return int(total)

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
            except BrokerUnavailable as exc:
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
