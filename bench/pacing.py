"""Open-loop pacing for the benchmark's publishers: events go out at the asked rate, late or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Paced:
    sent: int
    behind_max_s: float  # how far the publisher fell behind its schedule at worst
    started: float  # time.perf_counter() at the start


async def open_loop(
    rate: float, duration_s: float, chunk_max: int, publish: Callable[[int, int], Awaitable[None]]
) -> Paced:
    """Call `publish(first, count)` with the events due so far (at most `chunk_max` at once), `rate`
    a second for `duration_s`. A receiver that cannot keep up does not stretch the run: it stops
    after three times `duration_s` (plus 5 s) with what was sent."""
    total = max(1, int(rate * duration_s))
    deadline_s = duration_s * 3 + 5
    sent = 0
    behind_max_s = 0.0
    start = time.perf_counter()
    while sent < total:
        now = time.perf_counter() - start
        if now > deadline_s:
            break
        due = min(total, int(now * rate) + 1) - sent
        if due <= 0:
            await asyncio.sleep(max(0.0, min(0.001, sent / rate - now)))
            continue
        behind_max_s = max(behind_max_s, now - sent / rate)
        due = min(due, chunk_max)
        await publish(sent, due)
        sent += due
    return Paced(sent, behind_max_s, start)
