"""The pod-wide flusher: writes at once after a quiet spell, waits out its window under load."""

from __future__ import annotations

import asyncio

from fleet.waiting import eventually
from service.connection import Flusher


class _Recipient:
    """A Flushable that counts the flushes the Flusher asks for."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_connection_is_flushed_on_the_next_turn_after_a_quiet_spell() -> None:
    flusher = Flusher(window_s=60.0)
    conn = _Recipient()
    flusher.add(conn)
    await _turns(2)
    assert conn.flushes == 1


async def test_a_connection_queued_right_after_a_flush_waits_for_the_window() -> None:
    flusher = Flusher(window_s=0.3)
    first, second = _Recipient(), _Recipient()
    flusher.add(first)
    await _turns(2)
    flusher.add(second)
    await _turns(5)
    assert second.flushes == 0, "flushed inside the window"
    await eventually(lambda: second.flushes == 1, "flushed once the window passed")


async def test_every_connection_queued_in_a_window_is_flushed_once() -> None:
    flusher = Flusher(window_s=0.05)
    conns = [_Recipient() for _ in range(10)]
    flusher.add(conns[0])
    await _turns(2)
    for conn in conns[1:]:
        flusher.add(conn)
    await eventually(lambda: all(c.flushes == 1 for c in conns), "every connection flushed")
    await asyncio.sleep(0.1)
    assert [c.flushes for c in conns] == [1] * 10


async def test_a_zero_window_flushes_every_turn() -> None:
    flusher = Flusher(window_s=0.0)
    conn = _Recipient()
    for expected in (1, 2, 3):
        flusher.add(conn)
        await _turns(2)
        assert conn.flushes == expected
