"""Connection caps enforced across pods: leases in Redis sorted sets that expire with their pod."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any, Final

from redis.asyncio import Redis, RedisCluster

from service import metrics
from service.config import Settings
from service.limits import ConnectionCounter, Leases
from service.log import get_logger
from service.redis_batch import Batcher
from service.redis_client import cancel_and_wait, client_name_part, client_options, command_client
from service.redis_cluster_client import CLUSTER_ERRORS, cluster_client, eval_script, is_cluster_url

log = get_logger("eva_ws.limits")

# One sorted set per key (`user:<id>`, `ip:<addr>`): member `<pod instance>|<lease>`, score the
# lease's expiry in Redis time (ms). Expired leases are dropped before counting, so the
# leases of a pod that died without releasing them stop counting after `lease_ttl_s`.
# The key's hash tag keeps each script on one slot of a Redis Cluster.
_NOW: Final = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
ACQUIRE_SCRIPT: Final = (
    _NOW
    + """redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""
)
# Many acquires and releases in one round trip, in order, each as ACQUIRE_SCRIPT would decide it.
# KEYS: one per operation. ARGV: the TTL, then member and limit per operation (a limit
# of RELEASE removes the member). Answers 1 (granted, or released) or 0 per operation.
RELEASE: Final = -1
LEASES_SCRIPT: Final = (
    _NOW
    + """local ttl = tonumber(ARGV[1])
local answers = {}
for i = 1, #KEYS do
  local key, member, limit = KEYS[i], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  if limit < 0 then
    redis.call('ZREM', key, member)
    answers[i] = 1
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if not redis.call('ZSCORE', key, member) and redis.call('ZCARD', key) >= limit then
      answers[i] = 0
    else
      redis.call('ZADD', key, now + ttl, member)
      redis.call('PEXPIRE', key, ttl)
      answers[i] = 1
    end
  end
end
return answers
"""
)
# Re-adds as well as extends: a lease dropped while Redis was unreachable counts again.
REFRESH_SCRIPT: Final = (
    _NOW
    + """local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl)
return #ARGV - 1
"""
)

# REFRESH_SCRIPT for many keys. ARGV: the TTL, then per key its member count and members.
REFRESH_MANY_SCRIPT: Final = (
    _NOW
    + """local ttl = tonumber(ARGV[1])
local a = 2
for i = 1, #KEYS do
  local n = tonumber(ARGV[a])
  for j = a + 1, a + n do redis.call('ZADD', KEYS[i], now + ttl, ARGV[j]) end
  redis.call('PEXPIRE', KEYS[i], ttl)
  a = a + n + 1
end
return #KEYS
"""
)
# Bounds one refresh script's run: Redis serves nothing else while it runs.
REFRESH_KEYS_PER_CALL: Final = 500


class RedisConnectionCounter(ConnectionCounter):
    """See ConnectionCounter; the cap holds across every pod sharing the Redis.

    When Redis cannot answer, `acquire` lets the connection in (and counts it in
    `eva_ws_connection_caps_unavailable_total`): an outage of the shared store must not
    lock every user out. The pod's leases are refreshed every `lease_ttl_s / 3`.

    On a single Redis the acquires and releases of concurrent connections share one script
    call (see Batcher); on a Redis Cluster the keys live on different slots, so each key
    takes its own call.
    """

    def __init__(self, client: Redis | RedisCluster, *, prefix: str, pod_id: str, lease_ttl_s: float = 30.0) -> None:
        self._client = client
        self._prefix = prefix
        self._instance = f"{pod_id}/{secrets.token_hex(4)}"
        self._ttl_ms = max(1000, int(lease_ttl_s * 1000))
        self._held = Leases()
        self._refresher: asyncio.Task[None] | None = None
        # (key, member, limit or RELEASE) per operation.
        self._batcher: Batcher[tuple[str, str, int], int] | None = (
            None if isinstance(client, RedisCluster) else Batcher(self._send_batch)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisConnectionCounter:
        url = settings.redis_url
        if url is None:
            raise ValueError("RedisConnectionCounter needs EVA_WS_REDIS_URL")
        options = client_options(
            url,
            connect_timeout_s=1.0,
            command_timeout_s=1.0,
            keepalive_idle_s=10,
            client_name=f"eva-ws:{client_name_part(settings.pod_id)}:limits",
        )
        client: Redis | RedisCluster
        if is_cluster_url(url):
            client = cluster_client(url, max_connections=16, options=options)
        else:
            client = command_client(url, max_connections=16, wait_s=2.0, **options)
        return cls(client, prefix=settings.redis_prefix, pod_id=settings.pod_id, lease_ttl_s=settings.presence_ttl_s)

    def _key(self, key: str) -> str:
        return f"{self._prefix}conns:{{{key}}}"

    def _member(self, lease_id: str) -> str:
        return f"{self._instance}|{lease_id}"

    async def acquire(self, key: str, lease_id: str, limit: int) -> bool:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever(), name="connection-lease-refresh")
        try:
            if self._batcher is None:
                granted = await self._run(ACQUIRE_SCRIPT, self._key(key), [self._member(lease_id), limit, self._ttl_ms])
            else:
                granted = await self._batcher.submit((self._key(key), self._member(lease_id), limit))
        except CLUSTER_ERRORS as exc:
            metrics.CONNECTION_CAPS_UNAVAILABLE.inc()
            log.warning("connection_cap_unavailable", error=type(exc).__name__)
            granted = 1
        if granted:
            self._held.add(key, lease_id)
        return bool(granted)

    async def release(self, key: str, lease_id: str) -> None:
        if not self._held.discard(key, lease_id):
            return
        try:
            if self._batcher is None:
                await self._client.zrem(self._key(key), self._member(lease_id))
            else:
                await self._batcher.submit((self._key(key), self._member(lease_id), RELEASE))
        except CLUSTER_ERRORS as exc:
            # The lease expires by itself once this pod stops refreshing it.
            log.warning("connection_cap_unavailable", error=type(exc).__name__)

    async def close(self) -> None:
        if self._refresher is not None:
            await cancel_and_wait(self._refresher)
        if self._batcher is not None:
            await self._batcher.wait_idle()
        with contextlib.suppress(*CLUSTER_ERRORS):
            for key in list(self._held):
                members = [self._member(lease) for lease in self._held.holders(key)]
                if members:
                    await self._client.zrem(self._key(key), *members)
        self._held.clear()
        await self._client.aclose()

    async def _run(self, script: str, key: str, args: list[Any]) -> Any:
        async with asyncio.timeout(2.0):
            return await eval_script(self._client, script, [key], args)

    async def _send_batch(self, operations: list[tuple[str, str, int]]) -> list[int]:
        args: list[Any] = [self._ttl_ms]
        for _, member, limit in operations:
            args += (member, limit)
        async with asyncio.timeout(2.0):
            answers: list[int] = await eval_script(self._client, LEASES_SCRIPT, [key for key, _, _ in operations], args)
        return answers

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            leases = [(key, [self._member(lease) for lease in self._held.holders(key)]) for key in self._held]
            try:
                await self._refresh([(self._key(key), members) for key, members in leases if members])
            except CLUSTER_ERRORS as exc:
                log.warning("connection_cap_refresh_failed", error=type(exc).__name__)
                # Redis is down: every key is tried again next round

    async def _refresh(self, leases: list[tuple[str, list[str]]]) -> None:
        """Extend (or re-add) every lease: a pod holds one key per user, so on a single Redis
        many keys share a script call instead of one round trip each."""
        if self._batcher is None:  # Redis Cluster: the keys live on different slots
            for key, members in leases:
                await self._run(REFRESH_SCRIPT, key, [self._ttl_ms, *members])
            return
        for start in range(0, len(leases), REFRESH_KEYS_PER_CALL):
            chunk = leases[start : start + REFRESH_KEYS_PER_CALL]
            args: list[Any] = [self._ttl_ms]
            for _, members in chunk:
                args += (len(members), *members)
            async with asyncio.timeout(2.0):
                await eval_script(self._client, REFRESH_MANY_SCRIPT, [key for key, _ in chunk], args)
