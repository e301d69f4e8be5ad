"""The per-user resume budget: history events one user's sockets together may make a pod read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

from service import metrics

# The longest a resume waits for its user's budget. A browser back after a pod drain gets its
# replay this much later at worst instead of an error; beyond it the resume is refused at once
# (`rate_limited`) and the client retries with backoff. Long enough to cover one whole-history
# read at the default rate, short enough that a socket's next messages are not held for long:
# a session handles its messages one at a time.
MAX_WAIT_S: Final = 3.0
# Forgetting the users whose bucket is full again is done at most this often: a full bucket is
# the same as none, so dropping it loses nothing, and one pass costs a look at each entry.
_SWEEP_INTERVAL_S: Final = 1.0


class ResumeRefused(Exception):
    """The user's budget is in debt for longer than MAX_WAIT_S; `retry_after_s` until it is paid."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class UserBudget:
    """One user's token bucket of history events; reads are taken one at a time (`turn`)."""

    __slots__ = ("_tokens", "_updated", "in_use", "turn")

    def __init__(self, *, burst: int, now: float) -> None:
        self._tokens = float(burst)
        self._updated = now
        # Held from the wait through the read until it is charged: the next read of the same
        # user starts only once the previous one's cost is known, so the user's debt is never
        # more than one read (at most a whole history, or a channel's state).
        self.turn = asyncio.Lock()
        # Resumes waiting or reading on it: an entry in use is never forgotten.
        self.in_use = 0

    def tokens(self, now: float, *, rate_per_s: float, burst: int) -> float:
        self._tokens = min(float(burst), self._tokens + (now - self._updated) * rate_per_s)
        self._updated = now
        return self._tokens

    def charge(self, events: int, now: float, *, rate_per_s: float, burst: int) -> None:
        self._tokens = self.tokens(now, rate_per_s=rate_per_s, burst=burst) - events


class ResumeBudgets:
    """The pod's per-user resume budgets: `events_per_s` on average, `burst` at once, per user.

    Every socket has its own message budget (service/ratelimit.py), which a resume also draws
    on; this one is shared by all the sockets of one user on this pod, so opening more sockets
    (up to EVA_WS_MAX_CONNECTIONS_PER_USER) does not multiply what a user can make the pod and
    Redis read. A read is admitted once the user's bucket is out of debt and charged with what
    it read, so over any span a user reads at most `events_per_s` x span + `burst` + one read.

    Bounded: a user has an entry only while a resume of theirs waits or reads, or until their
    bucket is full again (at most (burst + one read) / events_per_s after their last resume,
    also after their last socket closed: closing every socket does not wipe a debt).
    """

    def __init__(
        self,
        *,
        events_per_s: float,
        burst: int,
        max_wait_s: float = MAX_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate_per_s = events_per_s
        self._burst = burst
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._users: dict[str, UserBudget] = {}
        self._swept_at = clock()

    def __len__(self) -> int:
        """Users with an entry (a bucket not full again yet, or a resume in progress)."""
        return len(self._users)

    @asynccontextmanager
    async def read(self, user_id: str) -> AsyncIterator[Callable[[int], None]]:
        """Wait for the user's turn and budget, then yield `charge(events)` for what was read.

        Raises ResumeRefused, without waiting, when the debt alone outlasts `max_wait_s`, and
        after waiting when the other resumes of the user ahead of this one took the time up.
        """
        now = self._clock()
        self._sweep(now)
        budget = self._users.get(user_id)
        if budget is None:
            budget = self._users[user_id] = UserBudget(burst=self._burst, now=now)
        budget.in_use += 1
        try:
            await self._wait(budget, deadline=now + self._max_wait_s)
            try:
                yield lambda events: budget.charge(
                    events, self._clock(), rate_per_s=self._rate_per_s, burst=self._burst
                )
            finally:
                budget.turn.release()
        finally:
            budget.in_use -= 1

    async def _wait(self, budget: UserBudget, *, deadline: float) -> None:
        """Return holding the user's turn with the bucket out of debt, or raise ResumeRefused."""
        if (wait_s := self._debt_s(budget)) > self._max_wait_s:
            raise ResumeRefused(wait_s)
        try:
            # The user's other resumes ahead of this one: each waits and reads in turn.
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                await budget.turn.acquire()
        except TimeoutError:
            raise ResumeRefused(self._max_wait_s) from None
        wait_s = self._debt_s(budget)
        if self._clock() + wait_s > deadline:
            budget.turn.release()
            raise ResumeRefused(wait_s)
        if wait_s > 0:
            metrics.RESUME_BUDGET_WAITS.inc()
            try:
                await asyncio.sleep(wait_s)
            except BaseException:
                budget.turn.release()
                raise

    def _debt_s(self, budget: UserBudget) -> float:
        """How long until the user's bucket is out of debt (0 when it is not in debt)."""
        tokens = budget.tokens(self._clock(), rate_per_s=self._rate_per_s, burst=self._burst)
        return max(0.0, -tokens / self._rate_per_s)

    def _sweep(self, now: float) -> None:
        if now - self._swept_at < _SWEEP_INTERVAL_S:
            return
        self._swept_at = now
        full = [
            user
            for user, budget in self._users.items()
            if not budget.in_use and budget.tokens(now, rate_per_s=self._rate_per_s, burst=self._burst) >= self._burst
        ]
        for user in full:
            del self._users[user]
