"""Connection caps enforced across pods: leases in Redis sorted sets that expire with their pod."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any, Final

from redis.asyncio import Redis, RedisCluster

from service import metrics, redis_keys, redis_lua
from service.config import Settings
from service.limits import ConnectionCounter, Leases
from service.log import get_logger
from service.redis_batch import Batcher
from service.redis_client import (
    REDIS_ERRORS,
    SLOT_CALLS_IN_FLIGHT,
    any_command_client,
    cancel_and_wait,
    client_name_part,
    client_options,
    eval_groups,
    slot_group,
)

log = get_logger("eva_ws.limits")

# One sorted set per cap key (`user:<id>`, `ip:<addr>`, see redis_keys.connection_leases):
# member `<pod instance>|<lease>`, score the lease's expiry in Redis time (ms). Expired leases
# are dropped before counting, so the leases of a pod that died without releasing them stop
# counting after `lease_ttl_s`. A release is an operation with limit RELEASE.
RELEASE: Final = -1
# Bounds one refresh script's run: Redis serves nothing else while it runs.
REFRESH_KEYS_PER_CALL: Final = 500


class RedisConnectionCounter(ConnectionCounter):
    """See ConnectionCounter; the cap holds across every pod sharing the Redis.

    When Redis cannot answer, `acquire` lets the connection in (and counts it in
    `eva_ws_connection_caps_unavailable_total`): an outage of the shared store must not
    lock every user out. The pod's leases are refreshed every `lease_ttl_s / 3`.

    The acquires and releases of concurrent connections share one script call (see Batcher);
    on a Redis Cluster, one per slot of the batch's keys.
    """

    def __init__(self, client: Redis | RedisCluster, *, prefix: str, pod_id: str, lease_ttl_s: float = 30.0) -> None:
        self._client = client
        self._prefix = prefix
        self._instance = f"{pod_id}/{secrets.token_hex(4)}"
        self._ttl_ms = max(1000, int(lease_ttl_s * 1000))
        self._held = Leases()
        self._refresher: asyncio.Task[None] | None = None
        # (key, member, limit or RELEASE) per operation.
        self._batcher: Batcher[tuple[str, str, int], int] = Batcher(self._send_batch)

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
        client = any_command_client(url, max_connections=16, wait_s=2.0, options=options)
        return cls(client, prefix=settings.redis_prefix, pod_id=settings.pod_id, lease_ttl_s=settings.presence_ttl_s)

    def _key(self, key: str) -> str:
        return redis_keys.connection_leases(self._prefix, key)

    def _member(self, lease_id: str) -> str:
        return f"{self._instance}|{lease_id}"

    async def acquire(self, key: str, lease_id: str, limit: int) -> bool:
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever(), name="connection-lease-refresh")
        try:
            granted = await self._batcher.submit((self._key(key), self._member(lease_id), limit))
        except REDIS_ERRORS as exc:
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
            await self._batcher.submit((self._key(key), self._member(lease_id), RELEASE))
        except REDIS_ERRORS as exc:
            # The lease expires by itself once this pod stops refreshing it.
            log.warning("connection_cap_unavailable", error=type(exc).__name__)

    async def close(self) -> None:
        if self._refresher is not None:
            await cancel_and_wait(self._refresher)
        await self._batcher.wait_idle()
        with contextlib.suppress(*REDIS_ERRORS):
            for key in list(self._held):
                members = [self._member(lease) for lease in self._held.holders(key)]
                if members:
                    await self._client.zrem(self._key(key), *members)
        self._held.clear()
        await self._client.aclose()

    async def _send_batch(self, operations: list[tuple[str, str, int]]) -> list[int]:
        """One script call for the batch (on a cluster, one per slot), answers in the batch's order."""
        groups: dict[int, list[int]] = {}
        for index, (key, _, _) in enumerate(operations):
            groups.setdefault(slot_group(self._client, key), []).append(index)
        calls = []
        for indexes in groups.values():
            args: list[Any] = [self._ttl_ms]
            for index in indexes:
                args += operations[index][1:]
            calls.append(([operations[index][0] for index in indexes], args))
        async with asyncio.timeout(2.0):
            replies = await eval_groups(self._client, redis_lua.LEASES_APPLY, calls)
        answers = [0] * len(operations)
        for indexes, reply in zip(groups.values(), replies, strict=True):
            for index, answer in zip(indexes, reply, strict=True):
                answers[index] = int(answer)
        return answers

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            leases = [(key, [self._member(lease) for lease in self._held.holders(key)]) for key in self._held]
            try:
                await self._refresh([(self._key(key), members) for key, members in leases if members])
            except REDIS_ERRORS as exc:
                log.warning("connection_cap_refresh_failed", error=type(exc).__name__)
                # Redis is down: every key is tried again next round

    async def _refresh(self, leases: list[tuple[str, list[str]]]) -> None:
        """Extend (or re-add) every lease: a pod holds one key per user, so many keys share a
        script call (on a cluster, keys of one slot) instead of one round trip each."""
        groups: dict[int, list[tuple[str, list[str]]]] = {}
        for key, members in leases:
            groups.setdefault(slot_group(self._client, key), []).append((key, members))
        calls = []
        for group in groups.values():
            for start in range(0, len(group), REFRESH_KEYS_PER_CALL):
                chunk = group[start : start + REFRESH_KEYS_PER_CALL]
                args: list[Any] = [self._ttl_ms]
                for _, members in chunk:
                    args += (len(members), *members)
                calls.append(([key for key, _ in chunk], args))
        for start in range(0, len(calls), SLOT_CALLS_IN_FLIGHT):
            async with asyncio.timeout(2.0):
                await eval_groups(self._client, redis_lua.LEASES_REFRESH, calls[start : start + SLOT_CALLS_IN_FLIGHT])
