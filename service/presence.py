"""Who is connected, per customer: the Presence interface and its in-process implementation."""

from __future__ import annotations

import abc
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    conn_id: str
    user_id: str
    pod_id: str
    # Unix seconds.
    connected_at: float


class Presence(abc.ABC):
    """Connection → (user, pod, connected-at), per customer.

    Contract: `add` and `remove` are idempotent; entries of a pod that stopped without
    calling `remove` disappear by themselves within a bounded time (the implementation
    documents it); `list` and `count` may be read from any pod.
    """

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin background work (e.g. the pod heartbeat); called once before use."""

    @abc.abstractmethod
    async def add(self, customer_ids: Sequence[str], entry: PresenceEntry) -> None:
        """Record a connection under each of its customers."""

    @abc.abstractmethod
    async def remove(self, customer_ids: Sequence[str], conn_id: str) -> None:
        """Forget a connection."""

    @abc.abstractmethod
    async def list(self, customer_id: str) -> list[PresenceEntry]:
        """Every live connection of a customer, oldest first."""

    @abc.abstractmethod
    async def count(self, customer_id: str) -> int:
        """How many live connections a customer has."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work and remove this pod's entries."""


class MemoryPresence(Presence):
    """Presence of a single process; entries die with it, so no expiry is needed."""

    def __init__(self) -> None:
        self._by_customer: defaultdict[str, dict[str, PresenceEntry]] = defaultdict(dict)

    async def start(self) -> None:
        return None

    async def add(self, customer_ids: Sequence[str], entry: PresenceEntry) -> None:
        for customer_id in customer_ids:
            self._by_customer[customer_id][entry.conn_id] = entry

    async def remove(self, customer_ids: Sequence[str], conn_id: str) -> None:
        for customer_id in customer_ids:
            entries = self._by_customer.get(customer_id)
            if entries is not None:
                entries.pop(conn_id, None)
                if not entries:
                    del self._by_customer[customer_id]

    async def list(self, customer_id: str) -> list[PresenceEntry]:
        return sorted(self._by_customer.get(customer_id, {}).values(), key=lambda e: e.connected_at)

    async def count(self, customer_id: str) -> int:
        return len(self._by_customer.get(customer_id, {}))

    async def close(self) -> None:
        self._by_customer.clear()
