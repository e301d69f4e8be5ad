"""Start a Redis and two pods and measure how fast control commands take effect on every pod.

Run from the repository root: `.venv/bin/python -m fleet.measure_control [--rounds N] [--sockets N] [--cluster]`.
Each round opens `--sockets` sockets of one user, half on each pod, then times:
- disconnect: from sending POST /api/v1/disconnect to pod A until the last socket (on A and
  B) has its 4003 close frame, and until the 202;
- revoke: from sending POST /api/v1/revoke to pod A until pod B refuses the user's old token
  (401 token_revoked), polled back to back.
Prints the median and the worst of each, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from fleet.process import ServiceProcess
from fleet.redis_cluster import RedisCluster
from fleet.redis_server import RedisServer
from service.auth import mint_token
from service.config import load_settings

SECRET = "measure-control-" + "s" * 48


def _token(sub: str, roles: list[str] | None = None) -> str:
    settings = load_settings({"EVA_WS_JWT_SECRET": SECRET, "EVA_WS_MODE": "production"})
    return mint_token(settings, sub=sub, customers=["C1"], roles=roles or [])


async def _round(session: aiohttp.ClientSession, pods: list[ServiceProcess], user: str, sockets: int) -> list[float]:
    admin = {"Authorization": f"Bearer {_token('ops', ['admin'])}"}
    token = _token(user)
    opened = [await session.ws_connect(f"{pods[n % 2].url}/ws/transactions?token={token}") for n in range(sockets)]
    started = time.perf_counter()

    async def disconnect() -> float:
        async with session.post(f"{pods[0].url}/api/v1/disconnect", json={"userId": user}, headers=admin) as response:
            assert response.status == 202
        return time.perf_counter() - started

    post = asyncio.ensure_future(disconnect())
    for ws in opened:
        message = await ws.receive()
        assert message.data == 4003, message
    closed_s = time.perf_counter() - started
    answered_s = await post

    started = time.perf_counter()
    body = {"userId": user, "issuedBefore": int(time.time()) + 1}
    async with session.post(f"{pods[0].url}/api/v1/revoke", json=body, headers=admin) as response:
        assert response.status == 202
    while True:
        async with session.get(f"{pods[1].url}/ws/transactions?token={token}") as refused:
            if refused.status == 401:
                break
    revoked_s = time.perf_counter() - started
    return [closed_s, answered_s, revoked_s]


async def _measure(redis_url: str, directory: Path, rounds: int, sockets: int) -> None:
    pods = [ServiceProcess(directory, jwt_secret=SECRET, redis_url=redis_url) for _ in range(2)]
    for pod in pods:
        pod.start()
    try:
        async with aiohttp.ClientSession() as session:
            results = [await _round(session, pods, f"user-{n}", sockets) for n in range(rounds)]
    finally:
        for pod in pods:
            pod.stop()
    for index, name in enumerate(("disconnect: every socket closed", "disconnect: 202", "revoke: refused on pod B")):
        values_ms = [r[index] * 1000 for r in results]
        print(f"{name:34} median {statistics.median(values_ms):7.1f} ms   worst {max(values_ms):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sockets", type=int, default=20, help="sockets of the user per round, over both pods")
    parser.add_argument("--cluster", action="store_true", help="a three-master Redis Cluster instead of one Redis")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        if args.cluster:
            cluster = RedisCluster(directory / "cluster")
            cluster.start()
            try:
                asyncio.run(_measure(cluster.url, directory, args.rounds, args.sockets))
            finally:
                cluster.stop()
        else:
            server = RedisServer(directory / "redis")
            server.start()
            try:
                asyncio.run(_measure(server.url, directory, args.rounds, args.sockets))
            finally:
                server.kill()
        print(f"{args.rounds} rounds, {args.sockets} sockets each, {'Redis Cluster' if args.cluster else 'one Redis'}")


if __name__ == "__main__":
    main()
