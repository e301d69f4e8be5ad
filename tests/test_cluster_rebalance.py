"""Rebalance after a scale-out behind nginx: old pods shed a few sockets per round with 4013, clients resume on the
pod the ring now names, and the spread settles without losing an event."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest

from fleet.clients import ClientFleet, customers
from fleet.waiting import eventually
from service.rebalance import plan_shed
from tests.cluster_testing import (
    NumberedStream,
    presence_pods,
    running_cluster,
    wait_all_delivered,
    worker_metric,
)
from tests.conftest import make_settings

TOLERANCE = 0.2
REBALANCE = {
    "rebalance_interval_s": "0.5",
    "rebalance_tolerance": str(TOLERANCE),
    "rebalance_max_shed_per_interval": "4",
}


@pytest.mark.parametrize(
    ("count", "pods", "total", "expected"),
    [
        (20, 1, 20, 0),  # alone: nobody to give to
        (20, 3, 40, 4),  # average 13.3: shed, capped at 4
        (15, 3, 40, 0),  # within 1.2 x average
        (17, 3, 40, 4),
        (14, 2, 24, 0),  # average 12, threshold 14.4
        (16, 2, 24, 4),
        (0, 3, 40, 0),
    ],
)
def test_plan_sheds_only_the_capped_excess_above_the_tolerance(count, pods, total, expected):
    assert plan_shed(count, pods=pods, total=total, tolerance=TOLERANCE, max_shed=4) == expected


def test_rebalance_settings_default_to_off_and_are_validated():
    settings = make_settings()
    assert settings.rebalance_interval_s == 0
    assert make_settings(rebalance_interval_s="10").rebalance_interval_s == 10
    with pytest.raises(ValueError, match="EVA_WS_REBALANCE_TOLERANCE"):
        make_settings(rebalance_tolerance="-1")


async def test_after_a_scale_out_the_new_worker_gets_connections_and_the_spread_settles(tmp_path):
    names = customers(40)
    with running_cluster(tmp_path, 2, **REBALANCE) as cluster:
        async with aiohttp.ClientSession() as session, ClientFleet(session, cluster, names, per_customer=1) as fleet:
            stream = NumberedStream(session, cluster, names)
            stream.start()
            try:
                await stream.wait_rounds(2)
                started = time.monotonic()
                new = await asyncio.to_thread(cluster.add_worker)

                def active() -> dict[str, float]:
                    return {w.pod_id: worker_metric(cluster, w, "eva_ws_connections_active") for w in cluster.workers}

                await eventually(lambda: active()[new.pod_id] > 0, "the new worker got no connection", deadline_s=30)

                async def settled() -> bool:
                    counts = active()
                    if sum(counts.values()) != len(names):
                        return False
                    average = len(names) / len(counts)
                    over = {pod for pod, n in counts.items() if n > (1 + TOLERANCE) * average}
                    if not over:
                        return True
                    # A pod may stay above the average only with customers the ring routes to it.
                    for customer in names:
                        pods = await presence_pods(session, cluster, customer)
                        if set(pods) & over and cluster.route(customer) not in pods:
                            return False
                    return True

                await eventually(settled, lambda: f"spread did not settle: {active()}", deadline_s=40, interval_s=0.5)
                settled_after_s = time.monotonic() - started
                await fleet.wait_subscribed()
                await stream.wait_rounds(2)
            finally:
                await stream.stop()
            await wait_all_delivered(fleet, stream)

            counts = active()

            def codes() -> Counter[int | None]:
                return Counter(code for c in fleet.clients for code in c.close_codes)

            def shed() -> float:
                return sum(worker_metric(cluster, w, "eva_ws_rebalance_shed_total") for w in cluster.workers)

            # A shed already under way (the closes are spread over half an interval) is counted by
            # its pod before its close frame reaches the client: every shed must be seen, in time.
            await eventually(lambda: codes()[4013] == shed(), lambda: f"shed {shed()}, seen {codes()}", deadline_s=20)
            print(f"rebalance 2 -> 3 workers: settled after {settled_after_s:.1f}s at {counts}; shed {shed():.0f}")
            assert counts[new.pod_id] > 0
            assert set(codes()) <= {4013}
            assert fleet.totals() == {"duplicates": 0, "gaps": 0, "unrecovered": 0, "resyncs": 0, "errors": 0}
