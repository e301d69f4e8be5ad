"""Losing a worker behind nginx: its clients reconnect to the others and resume without losing or repeating an event,
whether the worker dies (kill -9) or drains for a rolling restart (SIGTERM, 1012, then started again)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp

from fleet.clients import ClientFleet, customers
from fleet.waiting import eventually
from tests.cluster_testing import (
    NumberedStream,
    presence_pods,
    running_cluster,
    wait_all_delivered,
)

WORKERS = 3
CUSTOMERS = 30
CLEAN = {"duplicates": 0, "gaps": 0, "unrecovered": 0, "resyncs": 0, "errors": 0}


async def test_clients_of_a_killed_worker_resume_on_the_others_without_losing_an_event(tmp_path):
    with running_cluster(tmp_path, WORKERS) as cluster:
        names = customers(CUSTOMERS)
        async with aiohttp.ClientSession() as session, ClientFleet(session, cluster, names, per_customer=2) as fleet:
            owner = {c: cluster.route(c) for c in names}
            victim = max(cluster.workers, key=lambda w: sum(p == w.pod_id for p in owner.values()))
            on_victim = [c for c in fleet.clients if owner[c.routing_key] == victim.pod_id]
            assert on_victim

            stream = NumberedStream(session, cluster, names)
            stream.start()
            try:
                await stream.wait_rounds(5)
                killed_at = time.monotonic()
                await asyncio.to_thread(cluster.kill_worker, victim)
                await eventually(
                    lambda: all(c.connections >= 2 and c.subscribed.is_set() for c in on_victim),
                    lambda: f"{sum(c.connections < 2 for c in on_victim)} clients of the killed worker not back",
                    deadline_s=30,
                )
                back_after_s = max(c.subscribed_at[1] for c in on_victim) - killed_at
                await stream.wait_rounds(5)
            finally:
                await stream.stop()
            await wait_all_delivered(fleet, stream)

            print(
                f"kill -9 of {victim.pod_id} with {len(on_victim)} clients: all resumed {back_after_s:.2f}s later; "
                f"{stream.total()} events in {stream.rounds} rounds"
            )
            assert fleet.totals() == CLEAN
            # Everyone else kept its one connection; the victim's clients now live on the survivors.
            assert all(c.connections == 1 for c in fleet.clients if c not in on_victim)
            for customer in {c.routing_key for c in on_victim}:
                pods = await presence_pods(session, cluster, customer)
                pods.pop(victim.pod_id, None)  # entries of a killed pod expire with its heartbeat
                assert sum(pods.values()) == 2, f"{customer}: {dict(pods)}"


async def test_a_rolling_restart_of_every_worker_loses_and_duplicates_nothing(tmp_path):
    with running_cluster(tmp_path, WORKERS, drain_delay_s="0.5", drain_spread_s="1") as cluster:
        names = customers(CUSTOMERS)
        async with aiohttp.ClientSession() as session, ClientFleet(session, cluster, names, per_customer=2) as fleet:
            stream = NumberedStream(session, cluster, names)
            stream.start()
            codes: Counter[int | None] = Counter()
            try:
                await stream.wait_rounds(3)
                for worker in cluster.workers:
                    # Off the event loop: the clients must see the drain while it happens.
                    cluster.terminate_worker(worker)
                    assert await asyncio.to_thread(worker.process.wait_exited) == 0
                    await asyncio.to_thread(cluster.restart_worker, worker)
                    await fleet.wait_subscribed()
                    await stream.wait_rounds(3)
            finally:
                await stream.stop()
            await wait_all_delivered(fleet, stream)
            for client in fleet.clients:
                codes.update(client.close_codes)

            print(f"rolling restart: close codes seen {dict(codes)}; {stream.total()} events in {stream.rounds} rounds")
            assert fleet.totals() == CLEAN
            # Every client was drained at least once, always with 1012, and came back.
            assert set(codes) == {1012}
            assert all(c.connections >= 2 for c in fleet.clients)
