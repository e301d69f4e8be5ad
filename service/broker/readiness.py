"""Reports a broker's readiness over time: one log line per change (broker_deaf / broker_recovered) and the gauges."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

import structlog

from service import metrics
from service.redis_client import cancel_and_wait

log = structlog.get_logger("eva_ws.broker")

# How often readiness is re-evaluated for the log and the gauges (/readyz computes it on
# every request); short enough that a deaf pod shows up in the log within a second.
CHECK_INTERVAL_S: Final = 0.25


class ReadinessLog:
    """Turns readiness samples into events: `broker_deaf` once when live delivery stops being
    trustworthy, `broker_recovered` with `deaf_s` once when it is trusted again, and
    `broker_ready` the first time after start.

    Sampling alone would miss a reconnect that completed between two samples, so the
    caller also reports how many connections were lost so far and when the last one was.
    """

    def __init__(
        self,
        *,
        pod_id: str,
        reasons: Callable[[], list[str]],
        disconnects: Callable[[], tuple[int, float]],
        canary_lag_s: Callable[[], float],
        channels: Callable[[], int],
    ) -> None:
        self._pod_id = pod_id
        self._reasons = reasons
        self._disconnects = disconnects
        self._canary_lag_s = canary_lag_s
        self._channels = channels
        # When live delivery stopped being trustworthy (the start counts); None while ready.
        self._deaf_since: float | None = time.monotonic()
        self._deaf_logged = False
        self._seen_disconnects = 0
        self._task: asyncio.Task[None] | None = None

    def deaf_at_start(self) -> None:
        """The broker could not prove live delivery while starting."""
        self._deaf_logged = True
        log.error("broker_deaf", pod_id=self._pod_id, reasons=self._reasons(), at_start=True)

    def check(self) -> None:
        """Sample readiness once: update the gauges, log a change."""
        reasons = self._reasons()
        metrics.BROKER_READY.set(0 if reasons else 1)
        metrics.BROKER_CANARY_LAG.set(self._canary_lag_s())
        now = time.monotonic()
        disconnects, disconnected_at = self._disconnects()
        if disconnects != self._seen_disconnects:
            self._seen_disconnects = disconnects
            # Even a reconnect that was over before this sample lost live events.
            self._deaf(reasons or ["broker_not_ready"], since=disconnected_at)
        if reasons:
            self._deaf(reasons, since=now)
        elif self._deaf_since is not None:
            deaf_s = round(now - self._deaf_since, 3)
            if self._deaf_logged:
                log.info("broker_recovered", pod_id=self._pod_id, deaf_s=deaf_s, channels=self._channels())
            else:
                log.info("broker_ready", pod_id=self._pod_id, after_s=deaf_s)
            self._deaf_since = None
            self._deaf_logged = False

    def _deaf(self, reasons: list[str], *, since: float) -> None:
        if self._deaf_since is None:
            self._deaf_since = since
        if not self._deaf_logged:
            self._deaf_logged = True
            log.error("broker_deaf", pod_id=self._pod_id, reasons=reasons, channels=self._channels())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-broker-readiness")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(CHECK_INTERVAL_S)
