"""How late the event loop runs and how long the cycle collector stops it: latency that no single request explains.

Every socket of a pod shares one event loop, so anything that holds it (a long collection,
a burst of handshakes, a slow callback) delays every delivery at once. These two metrics
tell such a stall apart from a slow Redis or network (see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from typing import Any, Final

from service import metrics
from service.log import get_logger

log = get_logger("eva_ws.loop_health")

SAMPLE_INTERVAL_S: Final = 0.1
# A stall this long is logged as well as counted: every socket of the pod waited that long.
STALL_LOG_S: Final = 0.5

_GC_PAUSES: Final = tuple(metrics.GC_PAUSE.labels(str(generation)) for generation in range(3))


class _GcTimer:
    """A gc.callbacks entry that times each collection."""

    __slots__ = ("_started",)

    def __init__(self) -> None:
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:  # not a collection that began before this timer was installed
            _GC_PAUSES[info["generation"]].observe(time.perf_counter() - self._started)
            self._started = 0.0


async def _sample_lag(interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        lag = max(0.0, loop.time() - asked)
        metrics.EVENT_LOOP_LAG.observe(lag)
        if lag >= STALL_LOG_S:
            log.warning("event_loop_stalled", lag_s=round(lag, 3))


@contextlib.asynccontextmanager
async def watching(interval_s: float = SAMPLE_INTERVAL_S) -> AsyncIterator[None]:
    """Record loop lag and collector pauses while the block runs."""
    timer = _GcTimer()
    gc.callbacks.append(timer)
    sampler = asyncio.create_task(_sample_lag(interval_s), name="loop-lag")
    try:
        yield
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        gc.callbacks.remove(timer)
