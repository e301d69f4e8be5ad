"""A token bucket: the per-connection limit on client messages."""

from __future__ import annotations

import time
from typing import Final

# What a replayed event costs, in messages: a resume reads, filters and writes every event
# it replays, so one `subscribe` with `since` must not cost the same as a ping. A resume of
# 1,000 events costs 40 messages (the default burst); sustained, a socket gets at most
# 25 times its message rate in replayed events.
REPLAYED_EVENTS_PER_MESSAGE: Final = 25


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

    def charge(self, messages: float) -> None:
        """Take the cost of work already done; a debt refuses messages until it is paid back."""
        self._tokens -= messages
