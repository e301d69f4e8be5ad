"""Through a real nginx onto three workers: events reach exactly the entitled clients, customers stay on one pod,
pods share the Redis channels, and a scale-out moves only about 1/(N+1) of the customers."""

from __future__ import annotations

from collections import Counter

import aiohttp
import redis.asyncio as aioredis

from fleet.clients import ClientFleet, customers
from fleet.waiting import eventually
from tests.cluster_testing import (
    key,
    presence_pods,
    publish,
    running_cluster,
    transaction,
    worker_metric,
)

WORKERS = 3
CUSTOMERS = 30
PROBES = 600  # routing keys asked of nginx to measure the ring's balance


async def test_events_reach_exactly_the_entitled_clients_on_whichever_pod_they_are(tmp_path):
    with running_cluster(tmp_path, WORKERS) as cluster:
        names = customers(CUSTOMERS)
        async with aiohttp.ClientSession() as session, ClientFleet(session, cluster, names, per_customer=2) as fleet:
            expected: dict[str, set[str]] = {}
            for round_ in range(3):
                batch = [transaction(c, f"{c}-txn-{round_}") for c in names]
                acks = await publish(session, cluster, batch, routing_key=f"publisher-{round_}")
                assert [a["subscription"] for a in acks] == [key(c) for c in names]
                for c in names:
                    expected.setdefault(c, set()).add(f"{c}-txn-{round_}")

            await eventually(
                lambda: all(c.event_ids(key(c.routing_key)) == expected[c.routing_key] for c in fleet.clients),
                "every client has its customer's three events",
            )
            for client in fleet.clients:
                # Only its own customer's events, each once, in offset order.
                assert set(client.streams) == {key(client.routing_key)}
                offsets = [e["offset"] for e in client.events(key(client.routing_key))]
                assert offsets == sorted(offsets)
                assert len(offsets) == 3
                assert {e["data"]["customerId"] for e in client.all_events()} == {client.routing_key}
            assert fleet.totals() == {"duplicates": 0, "gaps": 0, "unrecovered": 0, "resyncs": 0, "errors": 0}

        # The access log has every upgrade, and never a token from the query string.
        def access_log() -> str:
            return (cluster.nginx.directory / "stdout.log").read_text()

        # nginx logs an upgrade when the socket ends, a moment after the client closed it.
        await eventually(
            lambda: access_log().count('"GET /ws/transactions HTTP/1.1" 101') == len(fleet.clients),
            "an access log line per socket",
        )
        assert all(client.token not in access_log() for client in fleet.clients)


async def test_a_customer_lands_on_one_pod_and_pods_share_the_channels(tmp_path):
    with running_cluster(tmp_path, WORKERS) as cluster:
        names = customers(CUSTOMERS)
        async with aiohttp.ClientSession() as session, ClientFleet(session, cluster, names, per_customer=2):
            owner: dict[str, str] = {}
            for customer in names:
                pods = await presence_pods(session, cluster, customer)
                assert sum(pods.values()) == 2
                assert len(pods) == 1, f"{customer} is split over {dict(pods)}"
                (owner[customer],) = pods
                assert cluster.route(customer) == owner[customer]

            per_pod = Counter(owner.values())
            channels = {
                w.pod_id: worker_metric(cluster, w, 'eva_ws_broker_subscriptions_actual{kind="client"}')
                for w in cluster.workers
            }
            hub_channels = {w.pod_id: worker_metric(cluster, w, "eva_ws_hub_channels") for w in cluster.workers}
            print(f"customers per pod {dict(per_pod)}; Redis subscriptions per pod {channels}")
            # Each pod subscribes to exactly the channels of the customers routed to it ...
            for worker in cluster.workers:
                assert channels[worker.pod_id] == per_pod[worker.pod_id]
                assert hub_channels[worker.pod_id] == per_pod[worker.pod_id]
                # The channels between pods (control, inspect) are counted apart, and in effect too.
                internal = [
                    worker_metric(cluster, worker, f'eva_ws_broker_subscriptions_{state}{{kind="internal"}}')
                    for state in ("wanted", "actual")
                ]
                assert internal[0] == internal[1] > 0
            # ... and the ring gives each pod about 1/N of all routing keys: a bound on the ketama
            # ring's imbalance, read over many keys (30 customers alone are too few: a 20/7/3 split
            # of them is bad luck of the draw, not a skewed ring).
            shares = Counter(cluster.route(f"PROBE-{i:04d}") for i in range(PROBES))
            print(f"ring shares over {PROBES} keys: {dict(shares)}")
            assert set(shares) == {w.pod_id for w in cluster.workers}
            assert max(shares.values()) <= 0.5 * PROBES
            assert min(shares.values()) >= 0.2 * PROBES

            # The union is exactly the wanted set, and no channel is subscribed by two pods.
            client = aioredis.Redis.from_url(cluster.redis.url, decode_responses=True)
            try:
                live = {str(c) for c in await client.pubsub_channels() if str(c).startswith("transactions:")}
                assert live == {key(c) for c in names}
                numsub = dict(await client.pubsub_numsub(*sorted(live)))
                assert set(numsub.values()) == {1}
            finally:
                await client.aclose()


def test_adding_a_worker_moves_only_about_one_in_n_plus_one_customers(tmp_path):
    names = customers(300)
    with running_cluster(tmp_path, WORKERS) as cluster:
        before = {c: cluster.route(c) for c in names}
        new = cluster.add_worker()
        after = {c: cluster.route(c) for c in names}
    assert None not in before.values()
    assert None not in after.values()
    moved = [c for c in names if before[c] != after[c]]
    fraction = len(moved) / len(names)
    print(f"moved {len(moved)}/{len(names)} customers ({fraction:.1%}) from {WORKERS} to {WORKERS + 1} workers")
    # Consistent hashing: the only customers that move are the ones the new worker takes over ...
    assert {after[c] for c in moved} == {new.pod_id}
    # ... and that is about 1/(N+1) = 25% of them (ketama's spread is a few points).
    assert 0.12 <= fraction <= 0.38
