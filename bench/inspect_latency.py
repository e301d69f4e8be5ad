"""How long GET /api/v1/connections takes on two pods sharing a local redis-server.

    .venv/bin/python -m bench.inspect_latency --sockets 200 --requests 50

Opens `--sockets` sockets per pod (one user each, all of customer C1, each subscribed to it),
then asks the first pod `--requests` times for the sockets of the customer (answered once
every pod presence names has answered) and of one user (answered after the one-second wait
for pods no index names), and prints p50 and p99 of each.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from fleet.process import ServiceProcess
from fleet.redis_server import RedisServer
from service.auth import mint_token
from service.config import load_settings


async def _timed(session: aiohttp.ClientSession, url: str, token: str, requests: int, expected: int) -> str:
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            body = await response.json()
        samples.append(time.perf_counter() - started)
        if response.status != 200 or len(body["connections"]) != expected:
            raise SystemExit(f"unexpected answer {response.status}: {str(body)[:200]}")
    samples.sort()
    return f"p50 {statistics.median(samples) * 1000:.1f} ms, p99 {samples[int(len(samples) * 0.99)] * 1000:.1f} ms"


async def _measure(pods: list[ServiceProcess], secret: str, sockets: int, requests: int) -> None:
    settings = load_settings({"EVA_WS_JWT_SECRET": secret, "EVA_WS_MODE": "production"})
    admin = mint_token(settings, sub="bench-admin", customers=[], roles=["admin"])
    # No connector limit: each open socket holds one of its connections.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        opened = []
        for pod in pods:
            for n in range(sockets):
                token = mint_token(settings, sub=f"{pod.port}-u{n}", customers=["C1"])
                ws = await session.ws_connect(f"{pod.url}/ws/transactions?token={token}")
                await ws.send_json({"type": "subscribe", "channel": "transactions"})
                await ws.receive_json()
                opened.append(ws)
        url = f"{pods[0].url}/api/v1/connections"
        # Both pods answer once their listeners are up; the first answers may lack the other pod.
        await _timed(session, f"{url}?customerId=C1&limit=1000", admin, 1, len(opened))
        by_customer = await _timed(session, f"{url}?customerId=C1&limit=1000", admin, requests, len(opened))
        by_user = await _timed(session, f"{url}?userId={pods[1].port}-u0", admin, requests, 1)
        print(f"{len(pods)} pods, {len(opened)} sockets of customer C1, {requests} requests each")
        print(f"  ?customerId=C1 (all {len(opened)} sockets): {by_customer}")
        print(f"  ?userId= (1 socket on the other pod):   {by_user}")
        for ws in opened:
            await ws.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=200, help="sockets per pod")
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    secret = secrets.token_hex(32)
    with tempfile.TemporaryDirectory() as directory:
        redis = RedisServer(Path(directory))
        redis.start()
        pods = [ServiceProcess(Path(directory), jwt_secret=secret, redis_url=redis.url) for _ in range(2)]
        try:
            for pod in pods:
                pod.start()
            asyncio.run(_measure(pods, secret, args.sockets, args.requests))
        finally:
            for pod in pods:
                pod.stop()
            redis.kill()


if __name__ == "__main__":
    main()
