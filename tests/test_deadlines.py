"""The pod-wide deadline wheel behind every socket's heartbeat and token expiry."""

from __future__ import annotations

import asyncio

from fleet.waiting import eventually
from service.deadlines import Deadlines, Slot


class _Item:
    """A Timed that counts its deadlines; `fail` makes its callback raise."""

    def __init__(self, *, fail: bool = False) -> None:
        self.deadline_slot: Slot | None = None
        self.fired = 0
        self.fired_at = 0.0
        self.fail = fail

    def on_deadline(self) -> None:
        self.fired += 1
        self.fired_at = _now()
        if self.fail:
            raise RuntimeError("a bug in one socket's callback")


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _fires_once_not_before(item: _Item, due: float) -> None:
    await eventually(lambda: item.fired == 1, "the deadline never fired")
    assert item.fired_at >= due, "fired early"
    await asyncio.sleep(1.2)  # a second tick passes
    assert item.fired == 1, "fired again"


async def test_an_item_fires_once_after_its_deadline_and_not_before() -> None:
    wheel = Deadlines()
    item = _Item()
    due = _now() + 1.2
    wheel.schedule(item, due)
    await _fires_once_not_before(item, due)
    wheel.close()


async def test_rescheduling_replaces_the_pending_deadline() -> None:
    wheel = Deadlines()
    item = _Item()
    wheel.schedule(item, _now() + 0.5)
    later = _now() + 2.0
    wheel.schedule(item, later)
    await _fires_once_not_before(item, later)
    wheel.close()


async def test_a_cancelled_deadline_does_not_fire() -> None:
    wheel = Deadlines()
    cancelled, kept = _Item(), _Item()
    wheel.schedule(cancelled, _now() + 0.5)
    wheel.schedule(kept, _now() + 0.5)
    wheel.cancel(cancelled)
    await eventually(lambda: kept.fired == 1, "the kept deadline never fired")
    assert cancelled.fired == 0
    assert cancelled.deadline_slot is None
    wheel.close()


async def test_a_failing_callback_does_not_stop_the_others_or_the_wheel() -> None:
    wheel = Deadlines()
    broken, neighbour = _Item(fail=True), _Item()
    wheel.schedule(broken, _now() + 0.5)
    wheel.schedule(neighbour, _now() + 0.5)
    await eventually(lambda: neighbour.fired == 1 and broken.fired == 1, "a deadline did not fire")
    after = _Item()
    wheel.schedule(after, _now() + 0.5)
    await eventually(lambda: after.fired == 1, "the wheel stopped after a failing callback")
    wheel.close()


async def test_a_callback_may_schedule_its_own_next_deadline() -> None:
    wheel = Deadlines()

    class _Repeating(_Item):
        def on_deadline(self) -> None:
            super().on_deadline()
            if self.fired < 3:
                wheel.schedule(self, _now() + 0.1)

    item = _Repeating()
    wheel.schedule(item, _now() + 0.1)
    await eventually(lambda: item.fired == 3, "the item did not fire three times")
    wheel.close()
