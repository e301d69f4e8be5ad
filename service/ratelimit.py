"""A token bucket: the per-connection limit on client messages."""

from __future__ import annotations

import time


class TokenBucket:
    """Allows `burst` messages at once and `rate_per_s` on average.

    The limits are the same for every connection and passed to `allow`: a pod holds one
    bucket per socket, so a bucket keeps only its own state.
    """

    __slots__ = ("_tokens", "_updated")

    def __init__(self, *, burst: int) -> None:
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def allow(self, *, rate_per_s: float, burst: int) -> bool:
        now = time.monotonic()
        self._tokens = min(burst, self._tokens + (now - self._updated) * rate_per_s)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
