"""Lossless, staggered drain on SIGTERM: stop taking work, then close sockets in jittered batches."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from typing import Final

from service.keys import Lifecycle
from service.log import get_logger
from service.protocol import CloseCode

log = get_logger("eva_ws.drain")

# Batches are at least this far apart, so a drain of a few sockets is not a burst either.
MIN_BATCH_INTERVAL_S: Final = 0.05


async def drain(
    lifecycle: Lifecycle,
    *,
    delay_s: float,
    spread_s: float,
    code: CloseCode = CloseCode.SERVICE_RESTART,
    hurry: asyncio.Event | None = None,
) -> int:
    """Refuse new work, wait for the load balancer to notice, then close every socket.

    Closing all sockets at once would make every client reconnect in the same second;
    spreading the closes over `spread_s` lets the other pods absorb them. Clients
    resume from their offsets, so nothing is lost. Once `hurry` is set (a second
    Ctrl-C), the delay and the spreading end and the remaining sockets close at once,
    each still with its close frame. Returns how many sockets were closed.
    """
    lifecycle.draining = True
    log.info("drain_started", connections=len(lifecycle.connections), delay_s=delay_s, spread_s=spread_s)
    await _pause(delay_s, hurry)
    closed = 0
    while lifecycle.connections:
        connections = [c for c in lifecycle.connections if not c.closing]
        if not connections:
            break
        random.shuffle(connections)
        batches = max(1, min(len(connections), math.floor(spread_s / MIN_BATCH_INTERVAL_S)))
        size = math.ceil(len(connections) / batches)
        interval_s = spread_s / batches
        for start in range(0, len(connections), size):
            batch = connections[start : start + size]
            await asyncio.gather(*(c.close(code, "service restart") for c in batch))
            closed += len(batch)
            if start + size < len(connections) and not (hurry is not None and hurry.is_set()):
                await _pause(random.uniform(0.5, 1.5) * interval_s, hurry)
        # Sockets that opened while draining (they should not) are closed in the next round.
        spread_s = 0
        await asyncio.sleep(0)
    log.info("drain_finished", closed=closed)
    return closed


async def _pause(seconds: float, hurry: asyncio.Event | None) -> None:
    """Sleep for `seconds`, or less if `hurry` is set meanwhile."""
    if hurry is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await hurry.wait()
