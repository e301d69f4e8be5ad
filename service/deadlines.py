"""One pod-wide timer for every socket's heartbeat and token expiry: a wheel of one-second slots."""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from service.log import get_logger

log = get_logger("eva_ws.deadlines")


class Timed(Protocol):
    """Something with at most one pending deadline, which the wheel tracks in `deadline_slot`."""

    deadline_slot: Slot | None

    def on_deadline(self) -> None:
        """The deadline has passed; schedule the next one here if there is one."""


class Slot(set[Timed]):
    """Everything due within one second."""

    __slots__ = ("second",)

    def __init__(self, second: int) -> None:
        super().__init__()
        self.second = second


class Deadlines:
    """Calls `on_deadline` of each scheduled item once its time (on the loop's clock) has passed.

    A pod holds tens of thousands of idle sockets, each with a heartbeat and a token
    expiry: one `loop.call_at` each costs about 550 bytes per timer and per socket. Here an
    item costs one entry in the set of its second, and a single timer runs once a second
    while anything is scheduled. Deadlines fire up to one second late, never early.
    """

    __slots__ = ("_done_through", "_handle", "_slots")

    def __init__(self) -> None:
        self._slots: dict[int, Slot] = {}
        self._handle: asyncio.TimerHandle | None = None
        # Every second up to this one has been handled (meaningful while the timer runs).
        self._done_through = 0

    def schedule(self, item: Timed, when: float) -> None:
        """Replace the item's pending deadline (if any) by `when`, in `loop.time()` seconds."""
        self.cancel(item)
        loop = asyncio.get_running_loop()
        if self._handle is None:
            self._done_through = math.floor(loop.time()) - 1
            self._handle = loop.call_at(self._done_through + 2, self._tick)
        # A deadline already past is handled by the next tick.
        second = max(math.ceil(when), self._done_through + 1)
        slot = self._slots.get(second)
        if slot is None:
            slot = self._slots[second] = Slot(second)
        slot.add(item)
        item.deadline_slot = slot

    def cancel(self, item: Timed) -> None:
        slot = item.deadline_slot
        if slot is None:
            return
        item.deadline_slot = None
        slot.discard(item)
        if not slot and self._slots.get(slot.second) is slot:
            del self._slots[slot.second]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for slot in self._slots.values():
            for item in slot:
                item.deadline_slot = None
        self._slots.clear()

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = math.floor(loop.time())
        while self._done_through < now:
            self._done_through += 1
            slot = self._slots.pop(self._done_through, None)
            if slot is None:
                continue
            for item in slot:
                item.deadline_slot = None
            for item in slot:
                # An earlier item's callback may have rescheduled this one already.
                if item.deadline_slot is None:
                    try:
                        item.on_deadline()
                    except Exception:  # one failing socket must not stop every other socket's timer
                        log.exception("deadline_failed")
        self._handle = loop.call_at(now + 1, self._tick) if self._slots else None
