"""`scripts/chaos`: one seeded run, from the start of the topology to the table and the exit code.

    scripts/chaos --seed N --duration 60 [--aof] [--redis-cluster] [--idempotency-keys auto|on|off] [--outbox]

Exit 0 when the checker finds no violation, 1 when it does, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import aiohttp

from fleet import ROOT
from fleet.chaos.checker import (
    ClientLog,
    Kind,
    PublishedEvent,
    Report,
    as_ledger,
    check,
    check_outbox,
    render_table,
)
from fleet.chaos.faults import Fault, inject, kinds_for, schedule
from fleet.chaos.proxy import HoldingProxy
from fleet.chaos.topology import HISTORY_SIZE, Topology
from fleet.chaos.traffic import NodeClients, OutboxWriter, Publisher, RecordingClient, idempotency_keys_supported
from fleet.waiting import eventually
from service.auth import mint_token
from service.config import load_settings

SETTLE_DEADLINE_S: Final = 90.0
TRANSACTIONS_PER_CUSTOMER: Final = 3


@dataclass
class Options:
    seed: int
    duration_s: float
    aof: bool = False
    redis_cluster: bool = False
    outbox: bool = False  # events go through the PostgreSQL outbox, written by OutboxWriters
    outbox_writers: int = 3
    idempotency_keys: str = "auto"  # auto: send keys if the server accepts the field
    python_clients: int = 4
    node_clients: int = 2
    customers: int = 4
    publishers: int = 2
    events_per_s: float = 8.0
    directory: Path = field(default_factory=lambda: ROOT / ".cache" / "chaos")


@dataclass
class Outcome:
    report: Report
    faults: list[Fault]
    recovery_s: dict[str, float]
    idempotency_keys: bool
    table: str

    @property
    def exit_code(self) -> int:
        return 0 if self.report.ok else 1


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seed", type=int, required=True, help="fixes the fault schedule and the publishing")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults and traffic (max 7200)")
    parser.add_argument("--aof", action="store_true", help="Redis with an fsync-always append-only file")
    parser.add_argument("--redis-cluster", action="store_true", help="a 3-master Redis Cluster instead of one server")
    parser.add_argument("--idempotency-keys", choices=["auto", "on", "off"], default="auto")
    parser.add_argument(
        "--outbox", action="store_true", help="events written into a PostgreSQL outbox (docs/outbox.md), not POSTed"
    )
    parser.add_argument("--python-clients", type=int, default=4, choices=range(1, 17), metavar="1..16")
    parser.add_argument("--node-clients", type=int, default=2, choices=range(0, 17), metavar="0..16")
    parser.add_argument("--dir", type=Path, default=None, help="state and logs (default .cache/chaos/seed-N)")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 7200:
        parser.error("--duration must be between 1 and 7200 seconds")
    return Options(
        seed=args.seed,
        duration_s=args.duration,
        aof=args.aof,
        redis_cluster=args.redis_cluster,
        outbox=args.outbox,
        idempotency_keys=args.idempotency_keys,
        python_clients=args.python_clients,
        node_clients=args.node_clients,
        directory=args.dir or ROOT / ".cache" / "chaos" / f"seed-{args.seed}",
    )


def recovery_times(faults: list[Fault], logs: list[ClientLog], ledger: list[PublishedEvent]) -> dict[str, float]:
    """Per fault kind, the worst time from healing until every subscription got an event accepted after it."""
    accepted_at = {e.event_id: a.at_s for e in ledger if (a := e.accepted) is not None}
    worst: dict[str, float] = {}
    for fault in faults:
        waits: list[float] = []
        for log in logs:
            firsts: dict[str, float] = {}
            for record in log.records:
                if record.kind is not Kind.EVENT or record.subscription in firsts or record.at_s < fault.healed_at_s:
                    continue
                if accepted_at.get(record.event_id or "", 0.0) >= fault.healed_at_s:
                    firsts[record.subscription] = record.at_s - fault.healed_at_s
            waits += firsts.values()
        if waits:
            worst[fault.kind] = max(worst.get(fault.kind, 0.0), max(waits))
    return worst


async def run(options: Options) -> Outcome:
    """Start everything, inject the schedule under traffic, settle, stop everything, judge."""
    options.directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(options.seed)
    secret = secrets.token_urlsafe(32)
    settings = load_settings({"EVA_WS_JWT_SECRET": secret})
    topology = Topology(
        options.directory, secret=secret, aof=options.aof, redis_cluster=options.redis_cluster, outbox=options.outbox
    )
    links: list[HoldingProxy] = []
    python_clients: list[RecordingClient] = []
    node: NodeClients | None = None
    faults: list[Fault] = []
    writers: list[OutboxWriter] = []
    rows_left = 0
    async with aiohttp.ClientSession() as session:
        try:
            await topology.start()
            publisher_token = mint_token(settings, sub="chaos-publisher", customers=[], roles=["publisher"])
            keys = options.idempotency_keys == "on" or (
                options.idempotency_keys == "auto"
                and await idempotency_keys_supported(session, topology.url, publisher_token)
            )
            customers = [f"CUST-{n:03d}" for n in range(1, options.customers + 1)]

            def subscriptions_of(index: int) -> list[str]:
                # Two customers each, overlapping, so every stream has clients of both kinds and several pods.
                return [customers[index % len(customers)], customers[(index + 1) % len(customers)]]

            for _ in range(options.python_clients + options.node_clients):
                links.append(await HoldingProxy(topology.nginx.port).start())
            for index in range(options.python_clients):
                mine = subscriptions_of(index)
                token = mint_token(settings, sub=f"py-{index}", customers=mine, ttl_s=4 * 3600)
                client = RecordingClient(
                    session,
                    f"ws://127.0.0.1:{links[index].port}/ws/transactions",
                    token,
                    routing_key=mine[0],
                    subscriptions=[{"channel": "transactions", "filters": {"customerId": c}} for c in mine],
                    max_backoff_s=2.0,
                    name=f"py-{index}",
                )
                python_clients.append(client)
                client.start()
            specs = []
            for index in range(options.python_clients, options.python_clients + options.node_clients):
                mine = subscriptions_of(index)
                specs.append(
                    {
                        "name": f"node-{index}",
                        "url": f"ws://127.0.0.1:{links[index].port}/ws/transactions",
                        "token": mint_token(settings, sub=f"node-{index}", customers=mine, ttl_s=4 * 3600),
                        "customers": mine,
                    }
                )
            if specs:
                node = NodeClients(specs, options.directory / "node-clients.log")
                await node.start()
            logs = [c.log for c in python_clients] + (list(node.logs.values()) if node else [])
            wanted = {log.name: 2 for log in logs}
            await eventually(
                lambda: all(sum(r.kind is Kind.SUBSCRIBED for r in log.records) >= wanted[log.name] for log in logs),
                "every client subscribed",
                deadline_s=60.0,
            )

            transactions = [(c, f"TXN-{c[-3:]}-{t}") for c in customers for t in range(TRANSACTIONS_PER_CUSTOMER)]
            commit_order: dict[str, int] = {}
            if options.outbox:
                assert topology.postgres is not None
                # transactions[w::n] gives every writer transactions of every customer: concurrent writers per channel.
                writers = [
                    OutboxWriter(
                        topology.postgres.dsn,
                        transactions=transactions[w :: options.outbox_writers],
                        rng=random.Random(rng.random()),
                        commit_order=commit_order,
                        name=f"writer-{w}",
                    )
                    for w in range(options.outbox_writers)
                ]
            publishers = (
                []
                if options.outbox
                else [
                    Publisher(
                        session,
                        topology.url,
                        publisher_token,
                        transactions=transactions[p :: options.publishers],
                        rng=random.Random(rng.random()),
                        idempotency_keys=keys,
                        name=f"pub-{p}",
                    )
                    for p in range(options.publishers)
                ]
            )
            stop_publishing = asyncio.Event()
            interval_s = max(1, len(publishers) + len(writers)) / options.events_per_s
            publishing = [asyncio.ensure_future(p.run(stop_publishing, interval_s=interval_s)) for p in publishers]
            publishing += [asyncio.ensure_future(w.run(stop_publishing, interval_s=interval_s)) for w in writers]
            end = time.monotonic() + options.duration_s
            for step in schedule(options.seed, options.duration_s, kinds_for(topology)):
                await asyncio.sleep(min(step.gap_s, max(0.0, end - time.monotonic())))
                if time.monotonic() >= end:
                    break
                fault = await inject(step, topology, links)
                faults.append(fault)
                print(f"{time.strftime('%H:%M:%S')} {fault.kind} {fault.detail}", flush=True)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            stop_publishing.set()
            await asyncio.gather(*publishing)
            await asyncio.gather(*(p.settle() for p in publishers))
            await asyncio.gather(*(w.settle() for w in writers))
            ledger = [e for p in publishers for e in p.ledger]
            if options.outbox:
                rows_left = await _wait_outbox_empty(topology)
                # Committed events as published ones (no position yet): what the clients must end with.
                ledger, _ = as_ledger([w for writer in writers for w in writer.writes], [])
            await _wait_settled(logs, ledger)
        finally:
            for writer in writers:
                await writer.close()
            await asyncio.gather(*(c.stop() for c in python_clients))
            if node is not None:
                await node.stop()
            for link in links:
                await link.close()
            await topology.stop()
    writes = [w for writer in writers for w in writer.writes]
    if options.outbox:
        ledger, _ = as_ledger(writes, logs)
        with (options.directory / "outbox-writes.jsonl").open("w") as out:
            for write in writes:
                out.write(json.dumps(asdict(write)) + "\n")
    _dump(options.directory, ledger, logs)
    if options.outbox:
        report = check_outbox(writes, logs, history_size=HISTORY_SIZE, rows_left=rows_left)
    else:
        report = check(ledger, logs, history_size=HISTORY_SIZE, idempotency_keys=keys)
    recovery = recovery_times(faults, logs, ledger)
    table = render_table(report, dict(Counter(str(f.kind) for f in faults)), recovery)
    return Outcome(report, faults, recovery, keys, table)


def _dump(directory: Path, ledger: list[PublishedEvent], logs: list[ClientLog]) -> None:
    """The checker's inputs, one JSON object a line, to look into a violation after the run."""
    with (directory / "ledger.jsonl").open("w") as out:
        for event in ledger:
            out.write(json.dumps(asdict(event)) + "\n")
    with (directory / "deliveries.jsonl").open("w") as out:
        for log in logs:
            for record in log.records:
                out.write(json.dumps({"client": log.name, **asdict(record)}) + "\n")


async def _wait_outbox_empty(topology: Topology) -> int:
    """Until the relays emptied the outbox, or the deadline: the rows left."""
    rows = await asyncio.to_thread(topology.outbox_rows)
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while rows and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        rows = await asyncio.to_thread(topology.outbox_rows)
    return rows


async def _wait_settled(logs: list[ClientLog], ledger: list[PublishedEvent]) -> None:
    """Until every client saw the last event published for each transaction it follows, or the deadline."""
    last: dict[str, PublishedEvent] = {}
    for event in ledger:
        if event.accepted is not None:
            last[event.transaction_id] = event

    def settled() -> bool:
        for log in logs:
            subscriptions = {r.subscription for r in log.records}
            seen = {r.event_id for r in log.records if r.kind is Kind.EVENT}
            if any(e.subscription in subscriptions and e.event_id not in seen for e in last.values()):
                return False
        return True

    with contextlib.suppress(AssertionError):
        await eventually(settled, "every client has the last state", deadline_s=SETTLE_DEADLINE_S, interval_s=0.2)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    mode = "Redis Cluster" if options.redis_cluster else "Redis with AOF" if options.aof else "Redis without AOF"
    if options.outbox:
        mode += ", events through the PostgreSQL outbox"
    print(
        f"chaos run: seed {options.seed}, {options.duration_s:.0f} s, {mode}, logs in {options.directory}", flush=True
    )

    async def guarded() -> Outcome:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)  # so `finally` stops every process started
        return await run(options)

    try:
        outcome = asyncio.run(guarded())
    except asyncio.CancelledError:
        print("chaos run interrupted; everything it started is stopped", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001  # the run broke, not the service's guarantee: a different exit code
        traceback.print_exc()
        print(f"chaos run failed before the check; logs in {options.directory}", file=sys.stderr)
        return 2
    print(outcome.table)
    keys = "sent" if outcome.idempotency_keys else "not supported by the server, not sent"
    print(f"\nidempotency keys: {keys}")
    for kind, detail in outcome.report.violations[:50]:
        print(f"VIOLATION {kind}: {detail}")
    if len(outcome.report.violations) > 50:
        print(f"... and {len(outcome.report.violations) - 50} more (see report.json)")
    summary = {
        "seed": options.seed,
        "duration_s": options.duration_s,
        "aof": options.aof,
        "redis_cluster": options.redis_cluster,
        "outbox": options.outbox,
        "idempotency_keys": outcome.idempotency_keys,
        "faults": [asdict(f) for f in outcome.faults],
        "recovery_s": outcome.recovery_s,
        "report": {k: v for k, v in asdict(outcome.report).items() if k != "violations"},
        "violations": [[str(k), d] for k, d in outcome.report.violations],
    }
    (options.directory / "report.json").write_text(json.dumps(summary, indent=2))
    print(f"\nresult: {'PASS' if outcome.exit_code == 0 else 'FAIL'} (seed {options.seed})")
    return outcome.exit_code
