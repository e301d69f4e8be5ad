"""The broker canary: a pod-private message sent through Redis and received back, proving live delivery end to end."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Final

import structlog

from service.broker.base import BrokerUnavailable
from service.redis_client import cancel_and_wait

log = structlog.get_logger("eva_ws.broker")

# The canary channel's name after the prefix. Subscription keys always start with a
# channel kind (`transactions:`, ...), so no client channel can ever be named like this.
CANARY_CHANNEL_PART: Final = "eva-ws-canary:"

CanaryPublish = Callable[[bytes], Awaitable[None]]
"""Sends one canary payload on the canary channel; raises BrokerUnavailable on failure."""


def new_instance(pod_id: str) -> str:
    """A name for this process: a pod restarted under the same id gets a different canary channel."""
    return f"{pod_id}/{secrets.token_hex(4)}"


class Canary:
    """Publishes a numbered canary every `interval_s` and measures how long ago one last came back.

    A subscriber connection can be connected, answer PINGs and still miss messages (a
    proxy that dropped the subscription, a server that lost it); only a message that went
    the whole way (command connection → Redis PUB/SUB → this pod's subscriber
    connection) proves that live delivery works. `lag_s` is the age of the newest canary
    that came back: about `interval_s` at most while healthy, growing without bound
    while the pod is deaf.
    """

    def __init__(self, *, publish: CanaryPublish, interval_s: float, max_lag_s: float) -> None:
        if not 0 < interval_s < max_lag_s:
            raise ValueError("the canary's max lag must be longer than its interval")
        self._publish = publish
        self._interval_s = interval_s
        self.max_lag_s = max_lag_s
        self._seq = 0
        # Send time of every canary on its way, by number; at most a few while healthy.
        self._in_flight: dict[int, float] = {}
        # Send time of the newest canary that came back; the start counts as one, so a
        # pod that never got a round trip turns lagging after `max_lag_s`.
        self._returned_sent_at = time.monotonic()
        self._kick = asyncio.Event()
        self._returned = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_s(self) -> float:
        """Seconds since the newest canary that came back was sent."""
        return time.monotonic() - self._returned_sent_at

    @property
    def lagging(self) -> bool:
        return self.lag_s > self.max_lag_s

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-broker-canary")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    def kick(self) -> None:
        """Send the next canary now (e.g. the subscriber just subscribed to the canary channel)."""
        self._kick.set()

    async def round_trip(self) -> None:
        """Send a canary now and wait until one comes back."""
        self._returned.clear()
        self.kick()
        await self._returned.wait()

    def received(self, data: bytes) -> None:
        """The subscriber got a message on the canary channel."""
        try:
            seq = int(data)
        except ValueError:
            log.warning("broker_canary_invalid", size=len(data))
            return
        sent_at = self._in_flight.get(seq)
        if sent_at is None:
            return  # from before a reconnect, already counted as lost
        for older in [s for s in self._in_flight if s <= seq]:
            del self._in_flight[older]
        self._returned_sent_at = max(self._returned_sent_at, sent_at)
        self._returned.set()

    async def _run(self) -> None:
        while True:
            self._kick.clear()
            self._seq += 1
            seq = self._seq
            self._in_flight[seq] = time.monotonic()
            try:
                await self._publish(b"%d" % seq)
            except BrokerUnavailable as exc:  # no round trip this time; the lag shows it
                self._in_flight.pop(seq, None)
                log.debug("broker_canary_not_sent", error=type(exc).__name__)
            # Canaries lost on the way are forgotten once they are older than the bound.
            horizon = time.monotonic() - self.max_lag_s
            for stale in [s for s, sent_at in self._in_flight.items() if sent_at < horizon]:
                del self._in_flight[stale]
            try:
                async with asyncio.timeout(self._interval_s):
                    await self._kick.wait()
            except TimeoutError:
                pass
