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


class Leases(dict[str, "str | set[str]"]):
    """Lease ids held per key.

    A key with a single holder maps to the bare lease id: nearly every user has one socket,
    and a one-element set would cost each of them 216 bytes.
    """

    __slots__ = ()

    def holders(self, key: str) -> tuple[str, ...] | set[str]:
        held = self.get(key)
        if held is None:
            return ()
        return (held,) if isinstance(held, str) else held

    def add(self, key: str, lease_id: str) -> None:
        held = self.get(key)
        if held is None:
            self[key] = lease_id
        elif isinstance(held, str):
            if held != lease_id:
                self[key] = {held, lease_id}
        else:
            held.add(lease_id)

    def discard(self, key: str, lease_id: str) -> bool:
        """Forget a lease; False when it was not held."""
        held = self.get(key)
        if held is None:
            return False
        if isinstance(held, str):
            if held != lease_id:
                return False
            del self[key]
            return True
        if lease_id not in held:
            return False
        held.discard(lease_id)
        if len(held) == 1:
            self[key] = held.pop()
        return True


class LocalConnectionCounter(ConnectionCounter):
    """Exact counts for this process; see ConnectionCounter for the contract."""

    def __init__(self) -> None:
        self._leases = Leases()

    async def acquire(self, key: str, lease_id: str, limit: int) -> bool:
        # No await between the check and the add: atomic on the event loop.
        holders = self._leases.holders(key)
        if lease_id in holders:
            return True
        if len(holders) >= limit:
            return False
        self._leases.add(key, lease_id)
        return True

    async def release(self, key: str, lease_id: str) -> None:
        self._leases.discard(key, lease_id)

    async def close(self) -> None:
        self._leases.clear()

    def count(self, key: str) -> int:
        return len(self._leases.holders(key))


class ConnectionLimits:
    """Applies the per-user and per-IP caps of the settings; 0 turns a cap off."""

    def __init__(self, counter: ConnectionCounter, *, per_user: int, per_ip: int) -> None:
        self.counter = counter
        self._per_user = per_user
        self._per_ip = per_ip

    @property
    def per_ip(self) -> int:
        """The cap per client address; 0: none."""
        return self._per_ip

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
