"""A token bucket: the per-connection limit on client messages."""

from __future__ import annotations

import time


class TokenBucket:
    """Allows `burst` messages at once and `rate_per_s` on average."""

    __slots__ = ("_burst", "_rate_per_s", "_tokens", "_updated")

    def __init__(self, *, rate_per_s: float, burst: int) -> None:
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate_per_s)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
