"""Wait for a condition with a generous deadline instead of asserting on timings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

DEFAULT_DEADLINE_S = 20.0


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    message: str | Callable[[], str],
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
    interval_s: float = 0.02,
) -> None:
    """Return as soon as `condition()` holds; fail with `message` if it never does before the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            text = message() if callable(message) else message
            raise AssertionError(f"not true after {deadline_s:.0f}s: {text}")
        await asyncio.sleep(interval_s)
