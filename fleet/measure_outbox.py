"""Start PostgreSQL, Redis and one pod, and measure the outbox relay: throughput and commit-to-client latency.

Run from the repository root: `.venv/bin/python -m fleet.measure_outbox [--rows N] [--channels N] [--events N]`.
- throughput: one transaction commits `--rows` outbox rows over `--channels` channels; from its
  commit until the outbox is empty, rows per second into Redis and rows per CPU-second of the pod
  (its user + system time over the drain, from /proc), so per pod core;
- latency: `--events` events, one transaction each at `--rate` per second, to a channel a
  WebSocket client on the pod subscribed to; from issuing COMMIT until the client has the event.
Needs the test extra (psycopg) and Debian's postgresql and redis-server packages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import psycopg

from fleet.postgres_server import PostgresServer
from fleet.process import ServiceProcess
from fleet.redis_server import RedisServer
from service.auth import mint_token
from service.config import load_settings
from service.postgres_outbox import enqueue, outbox_row

SECRET = "measure-outbox-" + "s" * 48
SCHEMA = Path(__file__).resolve().parent.parent / "deploy" / "sql" / "outbox.sql"


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _event(customer: str, seq: int) -> dict[str, object]:
    return {"type": "transaction_new", "data": {"id": f"T{seq}", "customerId": customer, "seq": seq}}


async def _throughput(dsn: str, pod: ServiceProcess, rows: int, channels: int) -> tuple[float, float]:
    assert pod.proc is not None
    batch = [outbox_row(_event(f"C{n % channels}", n)) for n in range(rows)]
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        async with connection.cursor() as cursor:
            await cursor.executemany("INSERT INTO eva_ws_outbox (channel, event) VALUES (%s, %s::jsonb)", batch)
        cpu_before = _cpu_s(pod.proc.pid)
        started = time.perf_counter()
        await connection.commit()
        await connection.set_autocommit(True)
        while True:
            cursor = await connection.execute("SELECT count(*) FROM eva_ws_outbox")
            row = await cursor.fetchone()
            if row is not None and row[0] == 0:
                break
            await asyncio.sleep(0.01)
    elapsed_s = time.perf_counter() - started
    return rows / elapsed_s, rows / (_cpu_s(pod.proc.pid) - cpu_before)


async def _latency(dsn: str, pod: ServiceProcess, events: int, rate: float) -> list[float]:
    settings = load_settings({"EVA_WS_JWT_SECRET": SECRET, "EVA_WS_MODE": "production"})
    token = mint_token(settings, sub="measure", customers=["L1"])
    issued: dict[int, float] = {}
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{pod.url}/ws/transactions?token={token}") as ws:
        await ws.send_json({"type": "subscribe", "channel": "transactions", "filters": {"customerId": "L1"}})
        assert (await ws.receive_json())["type"] == "subscribed"

        async def receive() -> None:
            while len(latencies) < events:
                message = await ws.receive_json()
                if message.get("type") == "transaction_new":
                    latencies.append(time.perf_counter() - issued[message["data"]["seq"]])

        reader = asyncio.create_task(receive())
        async with await psycopg.AsyncConnection.connect(dsn) as connection:
            for seq in range(events):
                await enqueue(connection, _event("L1", seq))
                issued[seq] = time.perf_counter()
                await connection.commit()
                await asyncio.sleep(1 / rate)
        await asyncio.wait_for(reader, timeout=60)
    return latencies


async def _measure(args: argparse.Namespace, directory: Path) -> None:
    redis = RedisServer(directory / "redis")
    postgres = PostgresServer()
    redis.start()
    postgres.start()
    pod = ServiceProcess(directory, jwt_secret=SECRET, redis_url=redis.url, outbox_dsn=postgres.dsn)
    try:
        with psycopg.connect(postgres.dsn, autocommit=True) as connection:
            connection.execute(SCHEMA.read_bytes())
        pod.start()
        per_s, per_cpu_s = await _throughput(postgres.dsn, pod, args.rows, args.channels)
        print(f"throughput: {args.rows} rows over {args.channels} channels, batch size 500 (the default)")
        print(f"  {per_s:8.0f} rows/s into Redis   {per_cpu_s:8.0f} rows per pod CPU-second")
        latencies_ms = sorted(s * 1000 for s in await _latency(postgres.dsn, pod, args.events, args.rate))
        p99 = latencies_ms[int(len(latencies_ms) * 0.99) - 1]
        print(f"latency: {args.events} events, one commit each, {args.rate:.0f}/s, from COMMIT to the client")
        print(
            f"  median {statistics.median(latencies_ms):6.1f} ms   p99 {p99:6.1f} ms   worst {latencies_ms[-1]:6.1f} ms"
        )
    finally:
        pod.stop()
        postgres.cleanup()
        redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the throughput backlog")
    parser.add_argument("--channels", type=int, default=100, help="channels the backlog is spread over")
    parser.add_argument("--events", type=int, default=500, help="events of the latency run")
    parser.add_argument("--rate", type=float, default=50.0, help="commits per second of the latency run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        asyncio.run(_measure(args, Path(name)))


if __name__ == "__main__":
    main()
