"""Resume flood: an unrelated client's ping latency, idle and while one user resumes as fast as it may.

    scripts/bench resume                 # embedded broker, 100 sockets (the per-user cap), ~1 min
    scripts/bench resume --redis         # the same through a redis-server
    scripts/bench resume --help

One server process (pinned to the first CPU when there are two or more); a bystander client
on another user pings it 15 times a second (under the rate limit) through two phases: idle,
then while one user holds `--sockets` sockets, each resuming a channel's whole history
(`subscribe` with `since` at offset 0, then `unsubscribe`) as often as the rate limit lets
it: the attacker keeps the server's token bucket in step on its side, charging a resume
1 message plus one per `--replay-events-per-message` events read (0: one message, as a
server that does not charge replays counts it), so its messages are never refused and it is
never closed. Above that, the user's resume budget (EVA_WS_RESUME_EVENTS_PER_USER_S, shared by
all the user's sockets) makes a resume wait or refuses it with `rate_limited`: the socket then
asks again at once, so every socket always has a resume waiting or reading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from fleet.process import ServiceProcess
from fleet.redis_server import RedisServer
from service.auth import mint_token
from service.config import load_settings

PINGS_PER_S = 15.0
CHANNEL_CUSTOMER = "C1"


@dataclass(frozen=True)
class Latency:
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class Flood:
    resumes: int
    replayed_events: int
    rate_limited: int
    closed: int


def _latency(rtts_s: list[float]) -> Latency:
    ordered = sorted(rtts_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Latency(len(ordered), statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000)


class ClientBucket:
    """The server's token bucket, kept by the client so that it never sends what would be refused."""

    def __init__(self, *, rate_per_s: float, burst: int) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self.tokens, self.updated = float(burst), time.monotonic()

    async def take(self, messages: float) -> None:
        # A little more than one token: the server counts its refill from when it handled the
        # previous message, a moment after this side reckons it was sent.
        needed = 1.1
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now
            if self.tokens >= needed:
                self.tokens -= messages
                return
            await asyncio.sleep((needed - self.tokens) / self.rate_per_s)


async def _ping_for(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> list[float]:
    rtts: list[float] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        sent = time.perf_counter()
        await ws.send_str(json.dumps({"type": "ping", "correlationId": str(n)}))
        while True:
            message = await ws.receive(timeout=30)
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"bystander socket ended: {message.type} {message.data}")
            if json.loads(message.data).get("type") == "pong":
                break
        rtts.append(time.perf_counter() - sent)
        await asyncio.sleep(max(0.0, 1 / PINGS_PER_S - (time.perf_counter() - sent)))
    return rtts


async def _resume_loop(ws: aiohttp.ClientWebSocketResponse, options: dict[str, Any], until: float) -> Flood:
    since, per_message, history = options["since"], options["per_message"], options["history"]
    bucket = ClientBucket(rate_per_s=options["rate_per_s"], burst=options["burst"])
    filters: dict[str, Any] = {"customerId": CHANNEL_CUSTOMER}
    if not options["deliver"]:
        # The server reads and decodes the whole history, and its filter then drops all of it.
        filters["transactionIds"] = ["none-of-these"]
    resumes = replayed = rate_limited = 0
    while time.monotonic() < until:
        await bucket.take(1)
        await ws.send_str(
            json.dumps({"type": "subscribe", "channel": "transactions", "filters": filters, "since": since})
        )
        ack = await ws.receive(timeout=30)
        if ack.type is not aiohttp.WSMsgType.TEXT:
            return Flood(resumes, replayed, rate_limited, 1)
        reply = json.loads(ack.data)
        if reply["type"] == "error":
            rate_limited += reply.get("code") == "rate_limited"
            continue
        count = reply["replayed"]
        for _ in range(count):  # counted, not parsed: the attacker spends little CPU per event
            if (await ws.receive(timeout=30)).type is not aiohttp.WSMsgType.TEXT:
                return Flood(resumes, replayed, rate_limited, 1)
        resumes += 1
        replayed += count
        if per_message:
            bucket.tokens -= history / per_message  # read, delivered or not
        await bucket.take(1)
        await ws.send_str(json.dumps({"type": "unsubscribe", "channel": "transactions", "filters": filters}))
        if (await ws.receive(timeout=30)).type is not aiohttp.WSMsgType.TEXT:
            return Flood(resumes, replayed, rate_limited, 1)
    return Flood(resumes, replayed, rate_limited, 0)


async def _flood(url: str, token: str, options: dict[str, Any], results: Any, ready: Any) -> None:
    async with aiohttp.ClientSession() as session:
        sockets = [
            await session.ws_connect(f"{url}/ws/transactions?token={token}", max_msg_size=0)
            for _ in range(options["sockets"])
        ]
        ready.set()  # the measured phase starts now, with every socket open
        started = time.monotonic()
        until = started + options["seconds"]
        floods = await asyncio.gather(*(_resume_loop(ws, options, until) for ws in sockets))
        active_s = time.monotonic() - started
        for ws in sockets:
            await ws.close()
    total = {name: sum(getattr(f, name) for f in floods) for name in Flood.__dataclass_fields__}
    results.put({**total, "active_s": round(active_s, 2)})


def _attacker(url: str, token: str, options: dict[str, Any], results: Any, ready: Any, cpus: set[int]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    os.nice(10)  # the bystander shares its CPU: its pings go first, so they measure the server
    asyncio.run(_flood(url, token, options, results, ready))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _publish_history(url: str, token: str, count: int) -> dict[str, Any]:
    events = [
        {
            "type": "transaction_update",
            "data": {
                "id": f"TXN-{n:06d}",
                "customerId": CHANNEL_CUSTOMER,
                "status": "approved",
                "stage": "funding",
                "amount": "1250.00",
                "currency": "EUR",
                "updatedBy": "ops-bot",
                "note": "x" * 120,
            },
        }
        for n in range(count)
    ]
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.post(f"{url}/api/v1/publish", json={"events": events}, headers=headers) as response:
            if response.status != 202:
                raise RuntimeError(f"publish failed: {response.status} {await response.text()}")
            body: dict[str, Any] = await response.json()
            first: dict[str, Any] = body["events"][0]
            return first


async def _run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else (set(), set())
    secret = secrets.token_hex(32)
    redis = RedisServer(directory) if args.redis else None
    env = {"history_size": str(args.history), "log_level": "warning", "demo_publisher": "false"}
    if args.write_window_ms is not None:
        env["write_window_ms"] = str(args.write_window_ms)
    if args.resume_events_per_user_s is not None:
        env["resume_events_per_user_s"] = str(args.resume_events_per_user_s)
    if redis is not None:
        redis.start()
        env["redis_url"] = redis.url
    pod = ServiceProcess(directory, jwt_secret=secret, **env)
    settings = load_settings({k: v for k, v in pod.env.items() if k.startswith("EVA_WS_")})
    try:
        pod.start()
        assert pod.proc is not None
        if server_cpus:
            os.sched_setaffinity(pod.proc.pid, server_cpus)
            os.sched_setaffinity(0, client_cpus)
        if os.geteuid() == 0:
            # Less noise from whatever else runs on the machine (as scripts/bench does).
            os.setpriority(os.PRIO_PROCESS, pod.proc.pid, -15)
            os.setpriority(os.PRIO_PROCESS, 0, -15)
        publisher = mint_token(settings, sub="backend", customers=[], roles=["publisher"], ttl_s=3600)
        first = await _publish_history(pod.url, publisher, args.history)
        since = {"offset": 0, "epoch": first["epoch"]}
        bystander_token = mint_token(settings, sub="bystander", customers=["C2"], ttl_s=3600)
        attacker_token = mint_token(settings, sub="mallory", customers=[CHANNEL_CUSTOMER], ttl_s=3600)
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{pod.url}/ws/transactions?token={bystander_token}")
            await _ping_for(ws, 2.0)  # warm-up
            cpu0 = _cpu_s(pod.proc.pid)
            idle = _latency(await _ping_for(ws, args.seconds))
            idle_cpu = (_cpu_s(pod.proc.pid) - cpu0) / args.seconds
            options = {
                "seconds": args.seconds + 1.0,
                "sockets": args.sockets,
                "since": since,
                "rate_per_s": settings.rate_limit_per_s,
                "burst": settings.rate_limit_burst,
                "per_message": args.replay_events_per_message,
                "history": args.history,
                "deliver": args.deliver,
            }
            context = multiprocessing.get_context("spawn")
            results, ready = context.Queue(), context.Event()
            attacker = context.Process(
                target=_attacker, args=(pod.url, attacker_token, options, results, ready, client_cpus), daemon=True
            )
            attacker.start()
            if not await asyncio.to_thread(ready.wait, 120):
                raise RuntimeError("the attacker's sockets did not open")
            await asyncio.sleep(0.5)  # past the first burst of resumes, into the sustained rate
            cpu0 = _cpu_s(pod.proc.pid)
            flooded = _latency(await _ping_for(ws, args.seconds))
            flood_cpu = (_cpu_s(pod.proc.pid) - cpu0) / args.seconds
            flood = await asyncio.to_thread(results.get, True, args.seconds + 120)
            attacker.join(timeout=30)
            await ws.close()
    finally:
        pod.stop()
        if redis is not None:
            redis.stop()
    return {
        "broker": "redis" if args.redis else "embedded",
        "sockets": args.sockets,
        "history": args.history,
        "replay_events_per_message": args.replay_events_per_message,
        "delivered": args.deliver,
        "write_window_ms": settings.write_window_ms,
        "resume_events_per_user_s": settings.resume_events_per_user_s,
        "resume_events_per_user_burst": settings.resume_events_per_user_burst,
        "idle": asdict(idle),
        "idle_server_cpu": round(idle_cpu, 3),
        "flood": asdict(flooded),
        "flood_server_cpu": round(flood_cpu, 3),
        "attacker": flood,
        "p99_ratio": round(flooded.p99_ms / idle.p99_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench resume", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--redis", action="store_true", help="run the server on a redis-server it starts")
    parser.add_argument("--sockets", type=int, default=100, help="the resuming user's sockets (default: the cap)")
    parser.add_argument(
        "--history", type=int, default=1000, help="events in the channel's history (EVA_WS_HISTORY_SIZE)"
    )
    parser.add_argument(
        "--deliver",
        action="store_true",
        help="resume without a filter, so the replayed events are sent (default: a filter drops them all)",
    )
    parser.add_argument(
        "--write-window-ms",
        type=float,
        help="EVA_WS_WRITE_WINDOW_MS for the server (default: its default, 8): a pong waits for the window "
        "as soon as anything else is being written",
    )
    parser.add_argument(
        "--resume-events-per-user-s",
        type=float,
        help="EVA_WS_RESUME_EVENTS_PER_USER_S for the server (default: its default, 5000); 10000000 leaves only "
        "the per-socket limit",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument(
        "--replay-events-per-message",
        type=int,
        default=25,
        help="what the server charges for replayed events (service.ratelimit); 0 for a server that does not",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eva-ws-resume-") as directory:
        result = asyncio.run(_run(args, Path(directory)))
    print(json.dumps(result, indent=2))
    idle, flood = result["idle"], result["flood"]
    cells = [
        result["broker"],
        f"{result['write_window_ms']:g} ms",
        str(args.sockets),
        f"{idle['p50_ms']:.2f} / {idle['p99_ms']:.2f}",
        f"{flood['p50_ms']:.2f} / {flood['p99_ms']:.2f}",
        f"{result['p99_ratio']}x",
        f"{result['attacker']['resumes'] * args.history / result['attacker']['active_s']:,.0f}",
        f"{result['flood_server_cpu']:.0%}",
    ]
    print("\n| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
