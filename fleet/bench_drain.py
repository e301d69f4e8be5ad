"""Reconnect peaks when a worker goes away behind nginx: drain without spreading, drain spread over 5 s, kill -9.

`scripts/bench-drain [--clients N] [--workers N] [--json PATH]` starts a fresh cluster per scenario
(fleet/cluster.py), connects N resuming clients (full-jitter backoff from 0.5 s, like the
browser SDKs), takes away the worker holding most of them, and reports how many of its
clients resubscribed in the busiest second and how long until all of them were back.
Figures go to docs/scaling.md; `--json` keeps the raw results, each client's time back included,
which `python -m bench.plots` draws (docs/bench/drain.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from fleet import ROOT
from fleet.clients import ClientFleet, customers
from fleet.cluster import Cluster
from fleet.waiting import eventually

BASE_BACKOFF_S = 0.5


@dataclass
class Result:
    scenario: str
    clients: int
    moved: int
    peak_per_s: int
    all_back_s: float
    unrecovered: int
    gaps: int
    duplicates: int
    # Seconds from the first close (the kill) to each moved client's new subscription, in order.
    back_s: list[float] = field(repr=False)


def peak_per_second(times: list[float]) -> int:
    """The most events in any one-second window."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] > 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


async def scenario(name: str, directory: Path, *, clients: int, workers: int, spread_s: float, kill: bool) -> Result:
    env = {"drain_delay_s": "1", "drain_spread_s": str(spread_s)}
    cluster = Cluster(directory, secret=secrets.token_urlsafe(48), worker_env=env)
    cluster.start(workers)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            ClientFleet(session, cluster, customers(clients), per_customer=1, base_backoff_s=BASE_BACKOFF_S) as fleet,
        ):
            owner = {c: cluster.route(c) for c in fleet.customer_ids}
            victim = max(cluster.workers, key=lambda w: sum(p == w.pod_id for p in owner.values()))
            moved = [c for c in fleet.clients if owner[c.routing_key] == victim.pod_id]
            started = time.monotonic()
            if kill:
                await asyncio.to_thread(cluster.kill_worker, victim)
            else:
                cluster.terminate_worker(victim)
            await eventually(
                lambda: all(c.connections >= 2 and c.subscribed.is_set() for c in moved),
                "the clients of the stopped worker did not come back",
                deadline_s=120,
                interval_s=0.1,
            )
            back = [c.subscribed_at[1] for c in moved]
            # From the first close the clients saw, so the drain delay does not count.
            origin = started if kill else min(c.closed_at[0] for c in moved)
            totals = fleet.totals()
            return Result(
                scenario=name,
                clients=clients,
                moved=len(moved),
                peak_per_s=peak_per_second(back),
                all_back_s=max(back) - origin,
                unrecovered=totals["unrecovered"],
                gaps=totals["gaps"],
                duplicates=totals["duplicates"],
                back_s=sorted(round(t - origin, 4) for t in back),
            )
    finally:
        cluster.stop()


async def run(clients: int, workers: int) -> list[Result]:
    base = Path(tempfile.mkdtemp(prefix="bench-drain-", dir=ROOT / ".cache" if (ROOT / ".cache").exists() else None))
    results = []
    try:
        for index, (name, spread_s, kill) in enumerate(
            [
                ("drain, EVA_WS_DRAIN_SPREAD_S=0", 0.0, False),
                ("drain, EVA_WS_DRAIN_SPREAD_S=5", 5.0, False),
                ("kill -9", 0.0, True),
            ]
        ):
            result = await scenario(
                name, base / str(index), clients=clients, workers=workers, spread_s=spread_s, kill=kill
            )
            results.append(result)
            print(result, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench-drain", description=__doc__)
    parser.add_argument("--clients", type=int, default=600)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    results = asyncio.run(run(args.clients, args.workers))
    if args.json:
        raw = {"workers": args.workers, "base_backoff_s": BASE_BACKOFF_S, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    print()
    print("| scenario | clients moved | reconnects in the busiest second | all back after | unrecovered/gaps/dups |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.scenario} | {r.moved} of {r.clients} | {r.peak_per_s} | {r.all_back_s:.1f} s "
            f"| {r.unrecovered} / {r.gaps} / {r.duplicates} |"
        )


if __name__ == "__main__":
    main()
