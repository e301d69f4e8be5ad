"""Concurrent Redis requests coalesced into one round trip, each caller still awaiting its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")

# Bounds one script's run: Redis serves nothing else while it runs.
DEFAULT_MAX_BATCH: Final = 256


class Batcher(Generic[Item, Answer]):
    """Sends the requests that arrive while a round trip is in flight together, in the next one.

    `send(items)` answers every item, in order, in one round trip; when it raises, every
    caller of that batch gets the exception. One batch is in flight at a time: an idle
    batcher sends a lone request on the next loop turn (no added wait), a busy one carries
    everything that queued during the previous round trip. A request whose caller was
    cancelled is still sent, as it would have been without the batcher.
    """

    def __init__(
        self, send: Callable[[list[Item]], Awaitable[list[Answer]]], *, max_batch: int = DEFAULT_MAX_BATCH
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        # Unbounded by design: it holds one entry per caller awaiting it, so its length is the
        # number of concurrent callers, which the connection caps and handshake timeouts bound.
        self._queue: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all(), name="redis-batch")
        return await future

    async def wait_idle(self) -> None:
        """Until every request submitted so far has been answered."""
        while self._sender is not None:
            await asyncio.wait({self._sender})

    async def _send_all(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Answer]]] = []
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    answers = await self._send([item for item, _ in batch])
                    if len(answers) != len(batch):
                        raise RuntimeError(f"{len(answers)} answers to {len(batch)} requests")
                except Exception as exc:  # noqa: BLE001  # forwarded, not swallowed: each caller decides
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        except asyncio.CancelledError:
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue.clear()
            raise
        finally:
            self._sender = None
