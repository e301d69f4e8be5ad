"""Revocations kept in Redis (one Redis or a Cluster), so every pod, restarted or new, refuses the same tokens.

Key (prefix = EVA_WS_REDIS_PREFIX): `{prefix}revocations:{revocations}`, a sorted set whose
members are revocations as JSON (service/revocations.Revocation.to_json) scored by their
`expiresAt`. One key, so on Redis Cluster it lives in one slot (the hash tag names it) and a
pod reads every revocation with one command. Entries past their `expiresAt` are dropped
with every write, and the key itself expires with the newest entry: nothing outlives the
longest token lifetime a pod accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

import orjson
import structlog

from service.backend_errors import BackendUnavailable
from service.config import Settings
from service.redis_client import REDIS_ERRORS, any_command_client, client_name_part, client_options
from service.redis_keys import tagged
from service.revocations import Revocation, RevocationStore

log = structlog.get_logger("eva_ws.revocations")


def revocations_key(prefix: str) -> str:
    """The sorted set of every revocation in force."""
    return f"{prefix}revocations:{tagged('revocations')}"


class RedisRevocationStore(RevocationStore):
    """See RevocationStore; every call is bounded by connect + command timeout, else BackendUnavailable."""

    def __init__(
        self, *, url: str, prefix: str, pod_id: str, connect_timeout_s: float = 1.0, command_timeout_s: float = 1.0
    ) -> None:
        self._key = revocations_key(prefix)
        self._timeout_s = connect_timeout_s + command_timeout_s
        self._client = any_command_client(
            url,
            max_connections=2,
            wait_s=self._timeout_s,
            options=client_options(
                url,
                connect_timeout_s=connect_timeout_s,
                command_timeout_s=command_timeout_s,
                keepalive_idle_s=10,
                client_name=f"eva-ws:{client_name_part(pod_id)}:revocations",
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisRevocationStore:
        if settings.redis_url is None:
            raise ValueError("RedisRevocationStore needs EVA_WS_REDIS_URL")
        return cls(url=settings.redis_url, prefix=settings.redis_prefix, pod_id=settings.pod_id)

    @contextlib.asynccontextmanager
    async def _redis_call(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"revocations: {type(exc).__name__}") from exc

    async def add(self, revocation: Revocation) -> None:
        """See RevocationStore.add."""
        now = time.time()
        async with self._redis_call():
            await self._client.zadd(self._key, {revocation.encode(): revocation.expires_at})
            await self._client.zremrangebyscore(self._key, "-inf", now)
            # The score of the entry that stays longest; none if every entry has expired.
            scores = await self._client.zrange(self._key, -1, -1, withscores=True)
            if scores:
                # Whole seconds, rounded up: the key never expires before its newest entry.
                await self._client.expireat(self._key, math.ceil(float(scores[0][1])) + 1)

    async def load(self) -> list[Revocation]:
        """See RevocationStore.load; an entry that does not parse is logged and skipped."""
        async with self._redis_call():
            members = await self._client.zrangebyscore(self._key, time.time(), "+inf")
        revocations = []
        for member in members:
            try:
                if not isinstance(member, bytes | str):
                    raise ValueError("not a string")
                revocations.append(Revocation.from_json(orjson.loads(member)))
            except ValueError as error:  # orjson.JSONDecodeError is a ValueError
                log.warning("revocation_invalid", error=str(error))
        return revocations

    async def close(self) -> None:
        """See RevocationStore.close."""
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()
