"""The benchmark scenarios, each with size knobs and a tiny preset that runs in seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any, Final

import jwt

from bench import procstat
from bench.histogram import Histogram
from bench.ingest_publisher import WIRE_OF_SINK
from bench.targets import Running, Target
from bench.workers import Child, LoadGen

# Generous: under a connect burst a server's accept queue overflows and the kernel retries
# with backoff; a slow handshake is measured (storm), not counted as a failure.
CONNECT_TIMEOUT_S: Final = 60.0
# A step during which processes outside the run used more than this many cores is repeated once.
DISTURBED_CORES: Final = 0.3
QUIET_WAIT_S: Final = 10.0
# Loopback source addresses the clients spread over, so 20,000+ sockets never run out of ports.
SOURCE_IPS: Final = tuple(f"127.0.0.{i}" for i in range(2, 10))


@dataclass(slots=True)
class FanoutSize:
    subscribers: int = 1000
    start_rate: float = 5.0
    rate_factor: float = 1.6
    max_steps: int = 9
    step_s: float = 3.0
    p99_limit_ms: float = 50.0


@dataclass(slots=True)
class ChannelsSize:
    clients: int = 10_000
    customers: int = 1000
    start_rate: float = 250.0
    rate_factor: float = 1.6
    max_steps: int = 8
    step_s: float = 3.0
    p99_limit_ms: float = 50.0


@dataclass(slots=True)
class StormSize:
    clients: int = 3000
    customers: int = 100
    concurrency: int = 200


@dataclass(slots=True)
class IdleSize:
    # 20,000 is the goal; the default stays under a 20,000 open-file hard limit per process.
    clients: int = 19_500
    customers: int = 1000
    settle_s: float = 2.0


@dataclass(slots=True)
class SlowSize:
    readers: int = 10
    slow: int = 5
    # Low enough for every server to carry the readers with room to spare, so only the
    # stalled clients change between the two phases.
    rate: float = 500.0
    calm_s: float = 8.0
    # Long enough to push more than the kernel absorbs per stalled socket on loopback
    # (the sender's buffer grows to tcp_wmem max, 4 MiB by default) so the server must act.
    stalled_s: float = 30.0
    # After the stalled phase the clients read again for this long, to see whether the server closed them.
    resume_s: float = 3.0


@dataclass(slots=True)
class IngestSize:
    # Events round-robin over `channels`; clients 0..clients-1 each subscribe to their own
    # channel, the others have no subscriber on this pod.
    channels: int = 10_000
    clients: int = 5_000
    # Publisher processes, each with its own share of the channels (a channel's events stay in order).
    publishers: int = 2
    # Handshakes in flight while connecting: each one subscribes a channel of its own, so a burst is
    # thousands of SUBSCRIBEs at once, and on a busy shared machine some outlast the subscribe timeout.
    connect_concurrency: int = 50
    # Up to about 170,000 events/s: the pipelined publishers (see bench.ingest_publisher) offer that
    # from the client core, more than a pod on its own core takes (half the events are its channels').
    start_rate: float = 10_000.0
    rate_factor: float = 1.6
    max_steps: int = 7
    step_s: float = 3.0
    p99_limit_ms: float = 50.0


@dataclass(slots=True)
class PublishSize:
    # Events per POST /api/v1/publish and per Publisher.publish_prepared call (the API takes up to 1,000),
    # comma-separated: each size is measured, since every request and call also has a fixed cost.
    batches: str = "100,1000"
    # Requests (or library calls) in flight at once.
    concurrency: int = 4
    channels: int = 1000
    duration_s: float = 5.0
    # Each way of publishing is measured this many times, alternating; the report shows the median.
    runs: int = 3


@dataclass(slots=True)
class Sizes:
    fanout: FanoutSize = field(default_factory=FanoutSize)
    channels: ChannelsSize = field(default_factory=ChannelsSize)
    storm: StormSize = field(default_factory=StormSize)
    idle: IdleSize = field(default_factory=IdleSize)
    slow: SlowSize = field(default_factory=SlowSize)
    ingest: IngestSize = field(default_factory=IngestSize)
    publish: PublishSize = field(default_factory=PublishSize)

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(
            fanout=FanoutSize(subscribers=20, start_rate=50, rate_factor=2.0, max_steps=2, step_s=1.0),
            channels=ChannelsSize(clients=40, customers=10, start_rate=100, max_steps=1, step_s=1.0),
            storm=StormSize(clients=50, customers=5, concurrency=20),
            idle=IdleSize(clients=50, customers=5, settle_s=0.5),
            slow=SlowSize(readers=4, slow=1, rate=100, calm_s=1.0, stalled_s=1.0, resume_s=0.5),
            ingest=IngestSize(channels=40, clients=20, publishers=2, start_rate=200, max_steps=1, step_s=1.0),
            publish=PublishSize(batches="20", concurrency=2, channels=10, duration_s=0.5, runs=1),
        )

    def override(self, assignment: str) -> None:
        """Apply `scenario.knob=value`, e.g. `fanout.subscribers=500`."""
        path, _, raw = assignment.partition("=")
        scenario, _, knob = path.partition(".")
        section = getattr(self, scenario, None)
        names = {f.name: f for f in fields(section)} if section is not None else {}
        if knob not in names:
            raise ValueError(f"unknown size knob {path!r}")
        current = getattr(section, knob)
        setattr(section, knob, type(current)(raw))


def publisher_setup(target: Target, server: Running, *, redis_url: str, secret: str) -> dict[str, Any]:
    """The command that sets a bench.publisher process up for `target`'s own publish path."""
    return {
        "op": "setup",
        "kind": target.sink,
        "redis_url": redis_url,
        "http_url": f"http://127.0.0.1:{server.port}",
        "secret": secret,
    }


@dataclass(slots=True)
class Bench:
    """Everything a scenario drives for one target."""

    target: Target
    server: Running
    loadgen: LoadGen
    publisher: Child
    secret: str
    redis_pid: int
    # Longest wait for outside load to calm down before repeating a disturbed step (0: never repeat).
    quiet_wait_s: float = QUIET_WAIT_S
    # The command that set `publisher` up, for starting more publishers like it (see more_publishers).
    publisher_setup: dict[str, Any] = field(default_factory=dict)
    client_cpus: str | None = None
    # Publishers besides `publisher`; `publish` spreads the channels over all of them.
    extra_publishers: list[Child] = field(default_factory=list)
    # Counters the server reports about itself, read before and after each measured step (outside
    # its CPU window); the step records how much each moved. None: nothing to read.
    server_counters: Callable[[], Awaitable[dict[str, float]]] | None = None

    def tokens(self, customers: list[str]) -> list[tuple[str, str, bool]]:
        """(customer, token, slow=False) per client; one user per client, like browsers."""
        now = int(time.time())
        return [
            (
                c,
                jwt.encode(
                    {"sub": f"user-{i}", "customerIds": [c], "iat": now, "exp": now + 3600}, self.secret, "HS256"
                ),
                False,
            )
            for i, c in enumerate(customers)
        ]

    def server_sample(self) -> procstat.Sample:
        return procstat.sample(self.server.pid)

    def loadgen_cpu_s(self) -> float:
        return procstat.total_cpu_s(self.loadgen.pids)

    def own_cpu_s(self) -> float:
        """CPU seconds of every process of this run (server, load generator, publisher, Redis)."""
        return procstat.total_cpu_s(
            [self.server.pid, self.redis_pid, *(p.pid for p in self.publishers), *self.loadgen.pids]
        )

    async def connect(self, clients: list[tuple[str, str, bool]], *, concurrency: int = 200) -> dict[str, Any]:
        result = await self.loadgen.connect(
            dialect=self.target.dialect,
            base_url=f"ws://127.0.0.1:{self.server.port}",
            clients=clients,
            concurrency=concurrency,
            timeout_s=CONNECT_TIMEOUT_S,
            source_ips=SOURCE_IPS,
        )
        if result["failed"]:
            raise RuntimeError(f"{result['failed']} of {len(clients)} clients failed to subscribe: {result['errors']}")
        return result

    @property
    def publishers(self) -> list[Child]:
        return [self.publisher, *self.extra_publishers]

    async def publish(self, customers: list[str], rate: float, duration_s: float) -> dict[str, Any]:
        """`rate` events/s round-robin over `customers`, each publisher pacing its own share of them."""
        n = len(self.publishers)
        shares = [customers[i::n] for i in range(n)]
        replies = await asyncio.gather(
            *(
                p.call(
                    {
                        "op": "run",
                        "customers": share,
                        "rate": rate * len(share) / len(customers),
                        "duration_s": duration_s,
                    },
                    timeout_s=duration_s * 3 + 60,
                )
                for p, share in zip(self.publishers, shares, strict=True)
                if share
            )
        )
        published: dict[str, int] = {}
        for r in replies:
            published.update(r["published"])
        return {
            "sent": sum(r["sent"] for r in replies),
            "elapsed_s": max(r["elapsed_s"] for r in replies),
            "behind_max_s": max(r["behind_max_s"] for r in replies),
            "published": published,
        }

    async def restart_sequences(self) -> None:
        await asyncio.gather(*(p.call({"op": "restart_sequences"}, timeout_s=10.0) for p in self.publishers))

    @contextlib.asynccontextmanager
    async def more_publishers(self, count: int) -> AsyncIterator[None]:
        """`count` publishers set up like the first one, besides it, for the duration of the block."""
        try:
            for i in range(count):
                child = await Child.spawn(
                    f"publisher-{i + 1}", [sys.executable, "-m", "bench.publisher"], cpus=self.client_cpus
                )
                self.extra_publishers.append(child)
                await child.call(self.publisher_setup, timeout_s=30.0)
            yield
        finally:
            extra, self.extra_publishers = self.extra_publishers, []
            await asyncio.gather(*(child.stop() for child in extra))


async def wait_for_quiet(
    max_wait_s: float, *, threshold_cores: float = DISTURBED_CORES, window_s: float = 1.0
) -> float:
    """Wait (bounded) until processes outside this run use less than `threshold_cores`; return the last reading.

    The machine may be shared: numbers taken while something else keeps a core busy say
    more about that than about the servers. Each step also records what it saw.
    """
    if max_wait_s <= 0:
        return 0.0
    deadline = time.monotonic() + max_wait_s
    own = os.getpid()
    while True:
        busy0, mine0 = procstat.machine_busy_s(), procstat.tree_cpu_s(own)
        await asyncio.sleep(window_s)
        other = max(0.0, procstat.machine_busy_s() - busy0 - (procstat.tree_cpu_s(own) - mine0)) / window_s
        if other < threshold_cores or time.monotonic() >= deadline:
            return other


def _latency_summary(h: Histogram) -> dict[str, float]:
    return {
        "p50_ms": h.quantile_us(0.50) / 1000,
        "p99_ms": h.quantile_us(0.99) / 1000,
        "p999_ms": h.quantile_us(0.999) / 1000,
        "max_ms": h.max_us / 1000,
    }


async def _measured_step(
    bench: Bench, customers: list[str], rate: float, duration_s: float, unique_before: int
) -> dict[str, Any]:
    """Publish at `rate`, wait for delivery, and account latency, losses and CPU for this step alone."""
    await bench.loadgen.reset()
    counters0 = await bench.server_counters() if bench.server_counters else {}
    server0, lg0, t0 = bench.server_sample(), bench.loadgen_cpu_s(), time.perf_counter()
    machine0, own0 = procstat.machine_busy_s(), bench.own_cpu_s()
    pub = await bench.publish(customers, rate, duration_s)
    drained = await bench.loadgen.drain(pub["published"], timeout_s=duration_s * 2 + 5)
    server1, lg1, t1 = bench.server_sample(), bench.loadgen_cpu_s(), time.perf_counter()
    machine1, own1 = procstat.machine_busy_s(), bench.own_cpu_s()
    counters1 = await bench.server_counters() if bench.server_counters else {}
    delivered = drained["unique"] - unique_before
    cpu_s = server1.cpu_s - server0.cpu_s
    wall_s = t1 - t0
    return {
        "rate": rate,
        "sent": pub["sent"],
        "publisher_behind_ms": pub["behind_max_s"] * 1000,
        # Below `rate` when the publishers (or Redis behind them) could not keep up.
        "published_per_s": pub["sent"] / pub["elapsed_s"] if pub["elapsed_s"] else 0.0,
        "delivered": delivered,
        "deliveries_per_s": delivered / wall_s,
        "server_cpu_s": cpu_s,
        "server_cpu_util": cpu_s / wall_s,
        "cpu_us_per_delivery": cpu_s * 1e6 / delivered if delivered else 0.0,
        # In cores: at the number of client CPUs the load generator, not the server, is the limit.
        "loadgen_cpu_util": (lg1 - lg0) / wall_s,
        # Cores used by processes outside this run while the step ran: non-zero means a shared machine.
        "other_cpu_util": max(0.0, (machine1 - machine0) - (own1 - own0)) / wall_s,
        "server_rss_mb": server1.rss_bytes / 2**20,
        **_latency_summary(drained["latency"]),
        "expected_total": drained["expected"],
        "unique_total": drained["unique"],
        "lost_total": drained["lost"],
        "dups_total": drained["dups"],
        "closed_total": drained["closed_reading"],
        "close_codes": drained["close_codes"],
        **({"server_counters": {k: counters1[k] - counters0[k] for k in counters1}} if counters1 else {}),
    }


async def _ladder(bench: Bench, customers: list[str], subscribers: int, start_rate: float, factor: float,
                  max_steps: int, step_s: float, p99_limit_ms: float, *, stop_when_publishers_behind: bool = False,
                  stop_on_latency: bool = True) -> dict[str, Any]:  # fmt: skip
    steps: list[dict[str, Any]] = []
    disturbed: list[dict[str, Any]] = []
    unique = 0
    for i in range(max_steps):
        step = await _measured_step(bench, customers, start_rate * factor**i, step_s, unique)
        unique = step["unique_total"]
        if step["other_cpu_util"] > DISTURBED_CORES and bench.quiet_wait_s > 0:
            # Something outside the run took CPU during the step: keep it on record, measure again.
            disturbed.append(step)
            await wait_for_quiet(bench.quiet_wait_s)
            step = await _measured_step(bench, customers, start_rate * factor**i, step_s, unique)
            unique = step["unique_total"]
        steps.append(step)
        if step["lost_total"] or step["closed_total"]:
            break
        # One step over the limit can be a stray stall; two in a row mean the server is past it.
        if stop_on_latency and len(steps) >= 2 and min(s["p99_ms"] for s in steps[-2:]) > p99_limit_ms:
            break
        # Publishers that fell a whole step behind cannot offer more: a higher rate measures nothing new.
        if stop_when_publishers_behind and step["publisher_behind_ms"] > step_s * 1000:
            break
    within = [s for s in steps if s["p99_ms"] <= p99_limit_ms and not s["lost_total"]]
    best = max(within, key=lambda s: s["deliveries_per_s"]) if within else None
    last = steps[-1]
    return {
        "subscribers": subscribers,
        "steps": steps,
        "max_deliveries_per_s_within_limit": best["deliveries_per_s"] if best else 0.0,
        "p99_limit_ms": p99_limit_ms,
        "lost": last["lost_total"],
        "dups": last["dups_total"],
        "expected": last["expected_total"],
        "unique": last["unique_total"],
        "delivered_sum": sum(s["delivered"] for s in steps + disturbed),
        "server_cpu_s": sum(s["server_cpu_s"] for s in steps + disturbed),
        "disturbed_steps": disturbed,
    }


async def fanout(bench: Bench, size: Sizes) -> dict[str, Any]:
    """Many subscribers on one customer channel; the publish rate climbs until p99 passes the limit."""
    s = size.fanout
    await bench.restart_sequences()
    await bench.connect(bench.tokens(["C0"] * s.subscribers))
    try:
        return await _ladder(
            bench, ["C0"], s.subscribers, s.start_rate, s.rate_factor, s.max_steps, s.step_s, s.p99_limit_ms
        )
    finally:
        await bench.loadgen.close_all()


async def channels(bench: Bench, size: Sizes) -> dict[str, Any]:
    """Clients spread over many customer channels; events round-robin over the customers."""
    s = size.channels
    customers = [f"C{i}" for i in range(s.customers)]
    wire = await publish_pre_encoded(bench)
    await bench.restart_sequences()
    await bench.connect(bench.tokens([customers[i % s.customers] for i in range(s.clients)]))
    try:
        result = await _ladder(
            bench, customers, s.clients, s.start_rate, s.rate_factor, s.max_steps, s.step_s, s.p99_limit_ms
        )
        result["customers"] = s.customers
        result["publisher_wire"] = wire or bench.target.sink
        return result
    finally:
        await bench.loadgen.close_all()


async def storm(bench: Bench, size: Sizes) -> dict[str, Any]:
    """Authenticated, subscribed handshakes per second with a bounded number in flight."""
    s = size.storm
    clients = bench.tokens([f"C{i % s.customers}" for i in range(s.clients)])
    cpu0 = bench.server_sample().cpu_s
    try:
        result = await bench.connect(clients, concurrency=s.concurrency)
        cpu_s = bench.server_sample().cpu_s - cpu0
    finally:
        await bench.loadgen.close_all()
    handshake: Histogram = result["handshake"]
    return {
        "clients": s.clients,
        "concurrency": s.concurrency,
        "ok": result["ok"],
        "failed": result["failed"],
        "elapsed_s": result["elapsed_s"],
        "handshakes_per_s": result["ok"] / result["elapsed_s"],
        "server_cpu_s": cpu_s,
        "cpu_us_per_handshake": cpu_s * 1e6 / max(1, result["ok"]),
        "handshake_p50_ms": handshake.quantile_us(0.5) / 1000,
        "handshake_p99_ms": handshake.quantile_us(0.99) / 1000,
    }


async def idle(bench: Bench, size: Sizes) -> dict[str, Any]:
    """Resident memory per idle authenticated, subscribed connection."""
    s = size.idle
    before = bench.server_sample()
    clients = bench.tokens([f"C{i % s.customers}" for i in range(s.clients)])
    try:
        result = await bench.connect(clients)
        await asyncio.sleep(s.settle_s)
        settled = bench.server_sample()
        # CPU spent while nothing is published: heartbeats, timers, bookkeeping.
        await asyncio.sleep(s.settle_s)
        after = bench.server_sample()
    finally:
        await bench.loadgen.close_all()
    return {
        "clients": result["ok"],
        "rss_before_mb": before.rss_bytes / 2**20,
        "rss_after_mb": after.rss_bytes / 2**20,
        "kib_per_connection": (after.rss_bytes - before.rss_bytes) / 1024 / max(1, result["ok"]),
        "idle_cpu_util": (after.cpu_s - settled.cpu_s) / s.settle_s,
        "connect_elapsed_s": result["elapsed_s"],
    }


async def slow(bench: Bench, size: Sizes) -> dict[str, Any]:
    """Readers and stalled clients on one channel: does the readers' p99 move when the others stop reading?"""
    s = size.slow
    await bench.restart_sequences()
    readers = bench.tokens(["S0"] * s.readers)
    stalled = [(c, t, True) for c, t, _ in bench.tokens(["S0"] * s.slow)]
    await bench.connect(readers + stalled)
    try:
        calm = await _measured_step(bench, ["S0"], s.rate, s.calm_s, 0)
        paused = await bench.loadgen.pause_slow()
        rss0 = bench.server_sample().rss_bytes
        stalled_step = await _measured_step(bench, ["S0"], s.rate, s.stalled_s, calm["unique_total"])
        rss1 = bench.server_sample().rss_bytes
        # A paused socket never reports the server's close: read what is buffered, then count.
        await bench.loadgen.resume_slow()
        await asyncio.sleep(s.resume_s)
        drained = await bench.loadgen.drain({}, timeout_s=0.1)
    finally:
        await bench.loadgen.close_all()
    return {
        "readers": s.readers,
        "slow": s.slow,
        "paused": paused,
        "rate": s.rate,
        "calm_s": s.calm_s,
        "stalled_s": s.stalled_s,
        "p99_calm_ms": calm["p99_ms"],
        "p99_with_slow_ms": stalled_step["p99_ms"],
        "p50_calm_ms": calm["p50_ms"],
        "p50_with_slow_ms": stalled_step["p50_ms"],
        "rss_growth_mb": (rss1 - rss0) / 2**20,
        "slow_closed_by_server": drained["closed_slow"],
        "slow_received": drained["slow_received"],
        "close_codes": drained["close_codes"],
        "lost": stalled_step["lost_total"],
        "dups": stalled_step["dups_total"],
        "expected": stalled_step["expected_total"],
        "unique": stalled_step["unique_total"],
        "cpu_us_per_delivery_calm": calm["cpu_us_per_delivery"],
        "cpu_us_per_delivery_with_slow": stalled_step["cpu_us_per_delivery"],
    }


# What tells that an eva-ws pod repaired or resynced a channel, or dropped a message, while it took
# pre-encoded envelopes (ingest, many-channels): with the publish script left out, these must not
# move (see bench.ingest_publisher). Metrics, then the log's channel resyncs (warnings, so logged at
# the benchmark's level): a resync that finds the subscribers already past the restart position
# moves no metric.
POD_COUNTER_METRICS: Final = (
    "eva_ws_events_replayed_total",
    'eva_ws_resumes_total{outcome="unrecovered"}',
    "eva_ws_broker_invalid_messages_total",
    'eva_ws_broker_connects_total{outcome="ok"}',
)
POD_COUNTER_LOG_EVENTS: Final = ("channel_resync",)


async def _pod_counters(bench: Bench) -> dict[str, float]:
    """POD_COUNTER_METRICS as the eva-ws pod's /metrics reports them now (missing ones as 0), and
    how many times its log holds each of POD_COUNTER_LOG_EVENTS."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{bench.server.port}/metrics") as response,
    ):
        text = await response.text()
    values = dict.fromkeys(POD_COUNTER_METRICS, 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in values:
            values[name] = float(value)
    log = bench.server.log_path.read_text(errors="replace")
    for event in POD_COUNTER_LOG_EVENTS:
        values[event] = float(log.count(f'"event": "{event}"'))
    return values


async def publish_pre_encoded(bench: Bench) -> str | None:
    """Set the publisher up for pre-encoded messages in pipelined PUBLISH (bench.ingest_publisher) where
    the target has such a wire; return it (None: the target keeps its own publish path). An eva-ws
    pod's steps then record its counters (POD_COUNTER_METRICS): all 0 when it took every envelope as
    the next event of its channel.

    Through eva-ws's publish script Redis spends tens of µs per event on the client core, which the
    load generator shares: at thousands of events a second that core, not the pod, sets the latency.
    """
    wire = WIRE_OF_SINK.get(bench.target.sink)
    if wire is not None:
        bench.publisher_setup = {"op": "setup_ingest", "wire": wire, "redis_url": bench.publisher_setup["redis_url"]}
        await bench.publisher.call(bench.publisher_setup, timeout_s=30.0)
    if bench.target.name == "eva-ws":
        # Each step records whether the pod repaired, resynced or dropped anything meanwhile.
        bench.server_counters = lambda: _pod_counters(bench)
    return wire


async def ingest(bench: Bench, size: Sizes) -> dict[str, Any]:
    """Events round-robin over many channels, one subscriber on some, none on the rest: the per-event cost."""
    s = size.ingest
    channels = [f"I{i}" for i in range(s.channels)]
    wire = await publish_pre_encoded(bench)
    is_eva_ws = bench.target.name == "eva-ws"
    counters_before = await _pod_counters(bench) if is_eva_ws else {}
    async with bench.more_publishers(s.publishers - 1):
        await bench.restart_sequences()
        # Client i subscribes to channel i: channels past `clients` have no subscriber on the pod.
        await bench.connect(bench.tokens(channels[: s.clients]), concurrency=s.connect_concurrency)
        try:
            result = await _ladder(
                bench, channels, s.clients, s.start_rate, s.rate_factor, s.max_steps, s.step_s, s.p99_limit_ms,
                # CPU per event is what this scenario is about: climb past the latency limit (each
                # step still reports its latency) until the publishers cannot offer more.
                stop_when_publishers_behind=True, stop_on_latency=False,
            )  # fmt: skip
        finally:
            await bench.loadgen.close_all()
    result["channels"] = s.channels
    result["publishers"] = s.publishers
    result["publisher_wire"] = wire or bench.target.sink
    if is_eva_ws:
        after = await _pod_counters(bench)
        # Repairs, resyncs, invalid messages and reconnects during the ladder (each step has its
        # own as `server_counters`): 0 each when the pod took every pre-encoded envelope as the
        # next event of its channel.
        result["pod_counters"] = {k: after[k] - counters_before[k] for k in after}
    return result


# Only eva-ws has a publish API that assigns offsets, keeps history and honours idempotency keys.
PUBLISH_SKIPPED: Final = "no publish API with offsets, history and idempotency keys to compare (eva-ws only)"
PUBLISH_FIGURES: Final = (
    "events_per_s",
    "events_per_core_s",
    "publishing_cpu_us_per_event",
    "redis_cpu_us_per_event",
    "publisher_cpu_us_per_event",
    "redis_cpu_util",
)


async def _publish_run(bench: Bench, s: PublishSize, via: str, batch: int, run: int) -> dict[str, Any]:
    """One timed burst of batches through one way of publishing, with the CPU of the pod, Redis and publisher."""
    setup = bench.publisher_setup
    pids = [bench.server.pid, bench.redis_pid, bench.publisher.pid]
    machine0, own0 = procstat.machine_busy_s(), bench.own_cpu_s()
    pod0, redis0, client0 = (procstat.sample(pid).cpu_s for pid in pids)
    reply = await bench.publisher.call(
        {
            "op": "throughput",
            "via": via,
            "http_url": setup.get("http_url", ""),
            "secret": setup.get("secret", ""),
            "redis_url": setup.get("redis_url", ""),
            "batch": batch,
            "concurrency": s.concurrency,
            "channels": s.channels,
            "duration_s": s.duration_s,
            "key_prefix": f"{via}-{batch}-{run}",
        },
        timeout_s=s.duration_s * 3 + 60,
    )
    pod1, redis1, client1 = (procstat.sample(pid).cpu_s for pid in pids)
    machine1, own1 = procstat.machine_busy_s(), bench.own_cpu_s()
    events, wall_s = reply["events"], reply["elapsed_s"]
    pod_cpu_s, redis_cpu_s, client_cpu_s = pod1 - pod0, redis1 - redis0, client1 - client0
    # The HTTP API's cost is the pod's; the library's is the process that calls it.
    publishing_cpu_s = pod_cpu_s if via == "http" else client_cpu_s
    return {
        "via": via,
        "batch": batch,
        "run": run,
        "events": events,
        "calls": reply["calls"],
        "duplicates": reply.get("duplicates", 0),
        "errors": reply["errors"],
        "elapsed_s": wall_s,
        "events_per_s": events / wall_s if wall_s else 0.0,
        "pod_cpu_s": pod_cpu_s,
        "redis_cpu_s": redis_cpu_s,
        "publisher_cpu_s": client_cpu_s,
        "events_per_core_s": events / publishing_cpu_s if publishing_cpu_s else 0.0,
        "publishing_cpu_us_per_event": publishing_cpu_s * 1e6 / events if events else 0.0,
        "redis_cpu_us_per_event": redis_cpu_s * 1e6 / events if events else 0.0,
        "publisher_cpu_us_per_event": client_cpu_s * 1e6 / events if events else 0.0,
        "redis_cpu_util": redis_cpu_s / wall_s if wall_s else 0.0,
        "other_cpu_util": max(0.0, (machine1 - machine0) - (own1 - own0)) / wall_s if wall_s else 0.0,
    }


async def publish(bench: Bench, size: Sizes) -> dict[str, Any]:
    """Keyed events in batches through POST /api/v1/publish and the Publisher library, as fast as accepted."""
    if bench.target.name != "eva-ws":
        return {"skipped": PUBLISH_SKIPPED}
    s = size.publish
    batches = [int(b) for b in s.batches.split(",") if b.strip()]
    runs: list[dict[str, Any]] = []
    # Alternating, so a disturbance of the shared machine does not fall on one way only.
    for run in range(s.runs):
        for batch in batches:
            for via in ("http", "library"):
                runs.append(await _publish_run(bench, s, via, batch, run))
    offsets = await bench.publisher.call(
        {"op": "offsets_total", "redis_url": bench.publisher_setup.get("redis_url", ""), "channels": s.channels},
        timeout_s=30.0,
    )
    ways = []
    for batch in batches:
        for via in ("http", "library"):
            mine = [r for r in runs if r["via"] == via and r["batch"] == batch]
            ways.append(
                {"via": via, "batch": batch} | {k: statistics.median(r[k] for r in mine) for k in PUBLISH_FIGURES}
            )
    return {
        "concurrency": s.concurrency,
        "channels": s.channels,
        "runs": runs,
        # Medians over the runs, per way of publishing and batch size.
        "ways": ways,
        "events": sum(r["events"] for r in runs),
        # Every accepted event has its own key, so each took one offset: the totals agree unless a
        # call timed out after Redis stored its events (see the runs' errors).
        "offsets_total": offsets["total"],
    }


ScenarioFn = Callable[[Bench, Sizes], Awaitable[dict[str, Any]]]
SCENARIOS: Final[dict[str, ScenarioFn]] = {
    "fanout": fanout,
    "channels": channels,
    "storm": storm,
    "idle": idle,
    "slow": slow,
    "ingest": ingest,
    "publish": publish,
}
