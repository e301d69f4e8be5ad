"""Caps on open connections per user and per client IP, behind a counter that a shared store can implement."""

from __future__ import annotations

import abc
from typing import Final

from aiohttp import web

USER_SCOPE: Final = "user"
IP_SCOPE: Final = "ip"


class ConnectionCounter(abc.ABC):
    """Leases on a bounded number of slots per key (``user:<id>``, ``ip:<addr>``).

    Contract for every implementation:
    - `acquire` is atomic: two concurrent acquires never both take the last slot.
    - A lease is named by the caller (the connection id); acquiring it twice holds one slot,
      releasing a lease that is not held does nothing.
    - In-process counts are exact for one pod. A shared implementation (Redis) enforces the
      cap across pods and must expire the leases of a pod that died without releasing them.
    """

    @abc.abstractmethod
    async def acquire(self, key: str, lease_id: str, limit: int) -> bool:
        """Take a slot of `key` for `lease_id`; False when `limit` slots are already held."""

    @abc.abstractmethod
    async def release(self, key: str, lease_id: str) -> None:
        """Give the slot back."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the counter's own resources."""


class LocalConnectionCounter(ConnectionCounter):
    """Exact counts for this process; see ConnectionCounter for the contract."""

    def __init__(self) -> None:
        self._leases: dict[str, set[str]] = {}

    async def acquire(self, key: str, lease_id: str, limit: int) -> bool:
        # No await between the check and the add: atomic on the event loop.
        holders = self._leases.get(key)
        if holders is None:
            holders = self._leases[key] = set()
        if lease_id in holders:
            return True
        if len(holders) >= limit:
            return False
        holders.add(lease_id)
        return True

    async def release(self, key: str, lease_id: str) -> None:
        holders = self._leases.get(key)
        if holders is None:
            return
        holders.discard(lease_id)
        if not holders:
            del self._leases[key]

    async def close(self) -> None:
        self._leases.clear()

    def count(self, key: str) -> int:
        return len(self._leases.get(key, ()))


class ConnectionLimits:
    """Applies the per-user and per-IP caps of the settings; 0 turns a cap off."""

    def __init__(self, counter: ConnectionCounter, *, per_user: int, per_ip: int) -> None:
        self.counter = counter
        self._per_user = per_user
        self._per_ip = per_ip

    async def acquire_ip(self, lease_id: str, ip: str) -> bool:
        return not self._per_ip or await self.counter.acquire(f"{IP_SCOPE}:{ip}", lease_id, self._per_ip)

    async def acquire_user(self, lease_id: str, user_id: str) -> bool:
        return not self._per_user or await self.counter.acquire(f"{USER_SCOPE}:{user_id}", lease_id, self._per_user)

    async def release(self, lease_id: str, *, ip: str, user_id: str | None) -> None:
        if self._per_ip:
            await self.counter.release(f"{IP_SCOPE}:{ip}", lease_id)
        if self._per_user and user_id is not None:
            await self.counter.release(f"{USER_SCOPE}:{user_id}", lease_id)


def client_ip(request: web.BaseRequest, header: str | None) -> str:
    """The client address: the last entry of `header` (set by a trusted proxy), else the TCP peer."""
    if header is not None:
        # A proxy appends the peer it saw; earlier entries come from the client and can be forged.
        value = request.headers.get(header, "").rsplit(",", 1)[-1].strip()
        if value:
            return value[:64]
    return request.remote or "unknown"
