"""What the cluster tests share: a numbered event stream, publishing with retries, presence and metrics reads."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from fleet.clients import ClientFleet
from fleet.cluster import Cluster, Worker
from fleet.waiting import eventually
from service.auth import mint_token
from tests.conftest import SECRET, make_settings, metric_value


@contextlib.contextmanager
def running_cluster(tmp_path: Path, workers: int, **worker_env: str) -> Iterator[Cluster]:
    """A started cluster that is stopped however the test ends."""
    cluster = Cluster(tmp_path / "cluster", secret=SECRET, worker_env=worker_env)
    cluster.start(workers)
    try:
        yield cluster
    finally:
        cluster.stop()


def key(customer: str) -> str:
    return f"transactions:{customer}"


def publisher_token() -> str:
    return mint_token(make_settings(), sub="backend", customers=[], roles=["publisher"], ttl_s=3600)


async def publish(
    session: aiohttp.ClientSession, cluster: Cluster, events: list[dict[str, Any]], *, routing_key: str = ""
) -> list[dict[str, Any]]:
    """POST a batch through nginx, retrying refusals (a worker going away) with backoff; the acks."""
    headers = {"Authorization": f"Bearer {publisher_token()}"}
    url = f"{cluster.url}/api/v1/publish?customerId={routing_key}"
    attempt = 0
    while True:
        try:
            async with session.post(url, json={"events": events}, headers=headers) as response:
                if response.status == 202:
                    body = await response.json()
                    acks: list[dict[str, Any]] = body["events"]
                    return acks
                assert response.status in (502, 503, 504), (response.status, await response.text())
        except (aiohttp.ClientError, OSError):
            pass
        attempt += 1
        assert attempt < 100, "publishing kept failing"
        await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))


def transaction(customer: str, txn_id: str) -> dict[str, Any]:
    return {
        "type": "transaction_update",
        "data": {"id": txn_id, "customerId": customer, "status": "pending", "stage": "kyc"},
    }


class NumberedStream:
    """Publishes round after round, one numbered event per customer per round, through nginx.

    `acked[customer]` holds the ids the service acknowledged (202); a client entitled to the
    customer must end up with every one of them.
    """

    def __init__(self, session: aiohttp.ClientSession, cluster: Cluster, customer_ids: list[str]) -> None:
        self.session = session
        self.cluster = cluster
        self.customer_ids = customer_ids
        self.acked: dict[str, set[str]] = {c: set() for c in customer_ids}
        self.rounds = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _publish_one(self, customer: str, seq: int) -> None:
        txn_id = f"{customer}-seq-{seq}"
        await publish(self.session, self.cluster, [transaction(customer, txn_id)], routing_key=customer)
        self.acked[customer].add(txn_id)

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.gather(*(self._publish_one(c, self.rounds) for c in self.customer_ids))
            self.rounds += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.1)

    async def wait_rounds(self, more: int) -> None:
        target = self.rounds + more
        await eventually(lambda: self.rounds >= target, f"published fewer than {target} rounds", deadline_s=60)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def total(self) -> int:
        return sum(len(ids) for ids in self.acked.values())


async def wait_all_delivered(fleet: ClientFleet, stream: NumberedStream, deadline_s: float = 30.0) -> None:
    """Every client ends up with every acknowledged event of its customer."""

    def missing() -> int:
        return sum(len(stream.acked[c.routing_key] - c.event_ids(key(c.routing_key))) for c in fleet.clients)

    await eventually(lambda: missing() == 0, lambda: f"{missing()} events missing", deadline_s=deadline_s)


async def presence_pods(session: aiohttp.ClientSession, cluster: Cluster, customer: str) -> Counter[str]:
    """Connections of a customer per pod, as presence in Redis reports them."""
    token = mint_token(make_settings(), sub="ops", customers=[customer], ttl_s=600)
    async with session.get(
        f"{cluster.url}/api/v1/presence/{customer}", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return Counter(c["podId"] for c in body["connections"])


def worker_metric(cluster: Cluster, worker: Worker, name: str) -> float:
    return metric_value(cluster.metrics(worker), name)
