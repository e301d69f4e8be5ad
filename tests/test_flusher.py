"""The pod-wide flusher: writes on the next turn, and holds back only the clients of a long round, up to its window."""

from __future__ import annotations

import asyncio
import time

from fleet.waiting import eventually
from service.connection import Flusher, FlushRound

# Long enough for the round that flushes it to stand for a round to many clients.
_SLOW_FLUSH_S = 0.05


class _Recipient:
    """A Flushable that counts the flushes the Flusher asks for."""

    def __init__(self, *, flush_s: float = 0.0) -> None:
        self.flushes = 0
        self.flush_round: FlushRound | None = None
        self._flush_s = flush_s

    def flush(self) -> None:
        self.flushes += 1
        if self._flush_s:
            time.sleep(self._flush_s)  # the writes of a round to many clients hold the loop


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_connection_is_flushed_on_the_next_turn_after_a_quiet_spell() -> None:
    flusher = Flusher(window_s=60.0)
    conn = _Recipient()
    flusher.add(conn)
    await _turns(2)
    assert conn.flushes == 1


async def test_a_connection_queued_again_right_after_a_short_round_does_not_wait_for_the_window() -> None:
    flusher = Flusher(window_s=60.0)
    conn = _Recipient()
    flusher.add(conn)
    await _turns(2)
    flusher.add(conn)
    await _turns(2)
    assert conn.flushes == 2


async def test_a_connection_queued_again_right_after_a_long_round_waits() -> None:
    flusher = Flusher(window_s=0.3)
    first, second = _Recipient(flush_s=_SLOW_FLUSH_S), _Recipient()
    flusher.add(first)
    flusher.add(second)
    await _turns(2)
    assert (first.flushes, second.flushes) == (1, 1)
    flusher.add(second)
    await _turns(5)
    assert second.flushes == 1, "written again right after a long round"
    await eventually(lambda: second.flushes == 2, "written once the pause passed")


async def test_a_connection_not_in_the_long_round_is_written_at_once() -> None:
    flusher = Flusher(window_s=60.0)
    slow, other = _Recipient(flush_s=_SLOW_FLUSH_S), _Recipient()
    flusher.add(slow)
    await _turns(2)
    flusher.add(other)
    await _turns(2)
    assert other.flushes == 1


async def test_every_connection_queued_during_a_pause_is_flushed_once() -> None:
    flusher = Flusher(window_s=0.05)
    slow = _Recipient(flush_s=_SLOW_FLUSH_S)
    conns = [_Recipient() for _ in range(10)]
    flusher.add(slow)
    for conn in conns:
        flusher.add(conn)
    await _turns(2)
    for conn in conns:
        flusher.add(conn)
    await eventually(lambda: all(c.flushes == 2 for c in conns), "every connection flushed again")
    await asyncio.sleep(0.1)
    assert [c.flushes for c in conns] == [2] * 10


async def test_a_zero_window_flushes_every_turn_however_long_the_rounds() -> None:
    flusher = Flusher(window_s=0.0)
    conn = _Recipient(flush_s=_SLOW_FLUSH_S)
    for expected in (1, 2, 3):
        flusher.add(conn)
        await _turns(2)
        assert conn.flushes == expected
