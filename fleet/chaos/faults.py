"""The faults of a chaos run: a seeded schedule, and what injecting each kind does to the topology.

One fault at a time, each healed before the next: the run measures recovery from each, not a
pile-up. The schedule depends only on the seed, the duration and the kinds allowed.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from enum import StrEnum

from fleet.chaos.proxy import HoldingProxy
from fleet.chaos.topology import Topology


class FaultKind(StrEnum):
    REDIS_KILL = "redis_kill_restart"  # kill -9 of Redis (a node of a cluster), started again after a pause
    REDIS_PAUSE = "redis_sigstop"  # SIGSTOP, SIGCONT after a few seconds: a hung Redis
    WORKER_KILL = "worker_kill"  # kill -9 of a worker, restarted on its port
    ROLLING_RESTART = "rolling_restart"  # SIGTERM (drain) and restart, worker by worker
    REDIS_BLACKHOLE = "redis_link_blackhole"  # worker 1's Redis link forwards nothing for a few seconds
    NGINX_RELOAD = "nginx_reload"
    CLIENT_STALL = "client_stall"  # one client's link forwards nothing (the server's writes back up)
    POSTGRES_KILL = "postgres_kill_restart"  # outbox runs: kill -9 of PostgreSQL, started again after a pause


# (shortest, longest) seconds a fault lasts before it is healed.
DURATION_S: dict[FaultKind, tuple[float, float]] = {
    FaultKind.REDIS_KILL: (0.5, 3.0),
    FaultKind.REDIS_PAUSE: (1.0, 5.0),
    FaultKind.WORKER_KILL: (0.5, 3.0),
    FaultKind.ROLLING_RESTART: (0.0, 0.0),
    FaultKind.REDIS_BLACKHOLE: (2.0, 6.0),
    FaultKind.NGINX_RELOAD: (0.0, 0.0),
    FaultKind.CLIENT_STALL: (2.0, 12.0),
    FaultKind.POSTGRES_KILL: (0.5, 3.0),
}
GAP_S = (2.0, 6.0)  # quiet time before each fault


@dataclass(frozen=True)
class Step:
    kind: FaultKind
    target: int  # which worker, Redis node or client, modulo how many there are
    duration_s: float
    gap_s: float


@dataclass
class Fault:
    """A fault as injected: wall-clock times of injection and of healing."""

    kind: FaultKind
    detail: str
    started_at_s: float
    healed_at_s: float = 0.0


def schedule(seed: int, duration_s: float, kinds: list[FaultKind]) -> list[Step]:
    """Faults until their gaps and durations fill `duration_s`; the same arguments give the same list."""
    rng = random.Random(seed)
    steps: list[Step] = []
    total = 0.0
    while True:
        kind = rng.choice(kinds)
        low, high = DURATION_S[kind]
        step = Step(kind, rng.randrange(1 << 16), round(rng.uniform(low, high), 2), round(rng.uniform(*GAP_S), 2))
        total += step.gap_s + step.duration_s
        if total > duration_s:
            return steps
        steps.append(step)


async def inject(step: Step, topology: Topology, client_links: list[HoldingProxy]) -> Fault:
    """Break the part `step` names, wait its duration, heal it; blocking process work runs in threads."""
    kind = step.kind
    if kind is FaultKind.REDIS_KILL:
        node = topology.redis_nodes[step.target % len(topology.redis_nodes)]
        fault = Fault(kind, f"redis {node.port}", time.time())
        await asyncio.to_thread(node.kill)
        await asyncio.sleep(step.duration_s)
        await asyncio.to_thread(node.start)
    elif kind is FaultKind.REDIS_PAUSE:
        node = topology.redis_nodes[step.target % len(topology.redis_nodes)]
        fault = Fault(kind, f"redis {node.port}", time.time())
        node.pause()
        try:
            await asyncio.sleep(step.duration_s)
        finally:
            node.resume()
    elif kind is FaultKind.WORKER_KILL:
        worker = topology.workers[step.target % len(topology.workers)]
        fault = Fault(kind, worker.pod_id, time.time())
        assert worker.process is not None
        await asyncio.to_thread(worker.process.kill)
        await asyncio.sleep(step.duration_s)
        await asyncio.to_thread(topology.restart_worker, worker)
    elif kind is FaultKind.ROLLING_RESTART:
        fault = Fault(kind, "all workers", time.time())
        for worker in topology.workers:
            assert worker.process is not None
            worker.process.terminate()
            await asyncio.to_thread(worker.process.wait_exited)
            await asyncio.to_thread(topology.restart_worker, worker)
    elif kind is FaultKind.REDIS_BLACKHOLE:
        assert topology.redis_link is not None, "only with one Redis server"
        fault = Fault(kind, "worker-1", time.time())
        topology.redis_link.hold()
        await asyncio.sleep(step.duration_s)
        topology.redis_link.release()
    elif kind is FaultKind.POSTGRES_KILL:
        postgres = topology.postgres
        assert postgres is not None, "only in an outbox run"
        fault = Fault(kind, f"postgres {postgres.port}", time.time())
        await asyncio.to_thread(postgres.kill)
        await asyncio.sleep(step.duration_s)
        await asyncio.to_thread(postgres.start)
    elif kind is FaultKind.NGINX_RELOAD:
        fault = Fault(kind, "nginx", time.time())
        await asyncio.to_thread(topology.nginx.reload, [w.port for w in topology.workers])
    else:
        link = client_links[step.target % len(client_links)]
        fault = Fault(kind, f"client link {link.port}", time.time())
        link.hold()
        await asyncio.sleep(step.duration_s)
        link.release()
    fault.healed_at_s = time.time()
    return fault


def kinds_for(topology: Topology) -> list[FaultKind]:
    """Every kind the topology can take: a Redis Cluster has no link to black-hole, only an outbox run a PostgreSQL."""
    return [
        k
        for k in FaultKind
        if (k is not FaultKind.REDIS_BLACKHOLE or topology.redis_link is not None)
        and (k is not FaultKind.POSTGRES_KILL or topology.postgres is not None)
    ]
