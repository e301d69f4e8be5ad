"""Realistic demo traffic for development: transactions moving through their stages."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from service import keys
from service.broker.base import BrokerUnavailable
from service.log import get_logger
from service.publisher import Publisher

log = get_logger("eva_ws.demo")

CUSTOMERS: Final = ("CUST-001", "CUST-002", "CUST-003")
STAGES: Final = ("created", "kyc", "underwriting", "approval", "funding", "closed")
USERS: Final = ("alice", "bob", "carol", "dave")


class DemoTraffic:
    """Keeps a handful of transactions per customer and moves them along, one event per tick."""

    def __init__(self, publisher: Publisher, *, rng: random.Random | None = None) -> None:
        self._publisher = publisher
        self._rng = rng or random.Random()
        self._open: dict[str, dict[str, Any]] = {}
        self._next_id = 1000

    async def tick(self) -> None:
        rng = self._rng
        if len(self._open) < 6 or rng.random() < 0.15:
            await self._new(rng.choice(CUSTOMERS))
            return
        txn = self._open[rng.choice(sorted(self._open))]
        index = STAGES.index(txn["stage"])
        if index + 1 < len(STAGES) and rng.random() < 0.4:
            txn["stage"] = STAGES[index + 1]
            await self._emit("stage_change", txn, ["stage"])
            if txn["stage"] == "closed":
                del self._open[txn["id"]]
                await self._emit("transaction_delete", txn, [])
            return
        txn["amount"] = round(txn["amount"] * rng.uniform(0.95, 1.05), 2)
        txn["status"] = rng.choice(("pending", "in_review", "on_hold", "pending"))
        await self._emit("transaction_update", txn, ["amount", "status"])

    async def _new(self, customer: str) -> None:
        self._next_id += 1
        txn: dict[str, Any] = {
            "id": f"TXN-{self._next_id}",
            "customerId": customer,
            "status": "pending",
            "stage": STAGES[0],
            "amount": round(self._rng.uniform(1_000, 250_000), 2),
            "currency": "EUR",
        }
        self._open[txn["id"]] = txn
        await self._emit("transaction_new", txn, list(txn))

    async def _emit(self, kind: str, txn: dict[str, Any], changed: list[str]) -> None:
        data = {
            **txn,
            "updatedAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "updatedBy": self._rng.choice(USERS),
            "changedFields": changed,
        }
        await self._publisher.publish(kind, data)


async def demo_publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Publish demo events every EVA_WS_DEMO_INTERVAL_S while the app runs (development)."""
    settings = app[keys.SETTINGS]
    if not settings.demo_enabled:
        yield
        return
    traffic = DemoTraffic(app[keys.PUBLISHER])

    async def run() -> None:
        while True:
            try:
                await traffic.tick()
            except BrokerUnavailable:
                log.warning("demo_publish_failed")
            await asyncio.sleep(settings.demo_interval_s)

    task = asyncio.create_task(run())
    log.info("demo_publisher_started", interval_s=settings.demo_interval_s)
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
