"""Connections per worker after a scale-out with rebalancing on: how the old pods shed to the new one, over time.

`.venv/bin/python -m fleet.bench_rebalance [--clients 40] [--workers 2] [--json PATH]` starts a cluster
(fleet/cluster.py) with EVA_WS_REBALANCE_* set, connects one resuming client per customer, adds a
worker, and samples every worker's `eva_ws_connections_active` and `eva_ws_rebalance_shed_total`
for `--seconds`. `--json` keeps the samples, which `python -m bench.plots` draws
(docs/bench/rebalance.json). Figures: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from fleet import ROOT
from fleet.clients import ClientFleet, customers
from fleet.cluster import Cluster

SAMPLE_EVERY_S = 0.25


def metric_sum(exposition: str, name: str) -> float:
    """The sum of every sample of one metric (counters without their _total suffix in the family name)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    )


async def run(
    *, clients: int, workers: int, interval_s: float, tolerance: float, max_shed: int, seconds: float
) -> dict[str, Any]:
    settings = {
        "rebalance_interval_s": str(interval_s),
        "rebalance_tolerance": str(tolerance),
        "rebalance_max_shed_per_interval": str(max_shed),
    }
    cache = ROOT / ".cache"
    with tempfile.TemporaryDirectory(prefix="bench-rebalance-", dir=cache if cache.exists() else None) as directory:
        cluster = Cluster(Path(directory), secret=secrets.token_urlsafe(48), worker_env=settings)
        cluster.start(workers)
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
                ClientFleet(session, cluster, customers(clients), per_customer=1) as fleet,
            ):
                samples: list[dict[str, Any]] = []

                async def sample(started: float) -> None:
                    expositions = await asyncio.gather(
                        *(asyncio.to_thread(cluster.metrics, w) for w in cluster.workers)
                    )
                    samples.append(
                        {
                            "t_s": round(time.monotonic() - started, 3),
                            "connections": {
                                w.pod_id: metric_sum(e, "eva_ws_connections_active")
                                for w, e in zip(cluster.workers, expositions, strict=True)
                            },
                            "shed": sum(metric_sum(e, "eva_ws_rebalance_shed_total") for e in expositions),
                        }
                    )

                started = time.monotonic()
                await sample(started)
                new = await asyncio.to_thread(cluster.add_worker)
                scaled_out_s = time.monotonic() - started  # the new worker is up and nginx reloaded
                while time.monotonic() - started < seconds:
                    await asyncio.sleep(SAMPLE_EVERY_S)
                    await sample(started)
                totals = fleet.totals()
        finally:
            cluster.stop()
    return {
        "clients": clients,
        "workers_before": workers,
        "new_worker": new.pod_id,
        "settings": settings,
        "scaled_out_s": round(scaled_out_s, 3),
        "samples": samples,
        "unrecovered": totals["unrecovered"],
        "gaps": totals["gaps"],
        "duplicates": totals["duplicates"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fleet.bench_rebalance", description=__doc__)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2, help="before the scale-out, which adds one")
    parser.add_argument("--interval-s", type=float, default=0.5, help="EVA_WS_REBALANCE_INTERVAL_S")
    parser.add_argument("--tolerance", type=float, default=0.2, help="EVA_WS_REBALANCE_TOLERANCE")
    parser.add_argument("--max-shed", type=int, default=4, help="EVA_WS_REBALANCE_MAX_SHED_PER_INTERVAL")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to sample after the scale-out")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    raw = asyncio.run(
        run(
            clients=args.clients,
            workers=args.workers,
            interval_s=args.interval_s,
            tolerance=args.tolerance,
            max_shed=args.max_shed,
            seconds=args.seconds,
        )
    )
    last = raw["samples"][-1]
    print(f"after {last['t_s']:.1f} s: {last['connections']}, {last['shed']:.0f} shed")
    print(f"unrecovered / gaps / duplicates: {raw['unrecovered']} / {raw['gaps']} / {raw['duplicates']}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
