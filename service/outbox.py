"""A connection's bounded send queue, which conflates superseded transaction updates."""

from __future__ import annotations

from service import metrics


class Outbox:
    """Frames waiting to be written to one client, oldest first.

    Overflow policy: `put` returns False when `capacity` frames are already waiting and
    none of them is superseded; the caller closes the connection as a slow consumer (it
    resumes from its offsets on reconnect), because silently dropping events would break
    the no-loss promise.

    Conflation: a frame queued with a conflation key (a transaction_update) is superseded
    by a newer frame with the same key, since only the newest state of a transaction
    matters and its offset tells the client it skipped versions. Superseded frames are
    dropped only once the queue backs up, when it is full or when more than one frame
    is taken at once, so a client that keeps up pays nothing for it: queueing a frame
    is two list appends.
    """

    __slots__ = ("_capacity", "_frames", "_keys", "conflated")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._frames: list[bytes] = []
        self._keys: list[str | None] = []  # parallel to _frames
        self.conflated = 0

    def __len__(self) -> int:
        """Frames waiting, superseded ones included until they are dropped."""
        return len(self._frames)

    def put(self, frame: bytes, conflation_key: str | None = None) -> bool:
        self._frames.append(frame)
        self._keys.append(conflation_key)
        if len(self._frames) > self._capacity and not self._conflate():
            self._frames.pop()
            self._keys.pop()
            return False
        return True

    def pop_all(self) -> list[bytes]:
        """Take every waiting frame that no newer one supersedes, oldest first."""
        if len(self._frames) > 1:
            self._conflate()
        frames = self._frames
        self._frames = []
        self._keys = []
        return frames

    def _conflate(self) -> bool:
        """Drop every frame superseded by a newer one with the same key; False if none was."""
        keys = self._keys
        if len(set(keys)) == len(keys):
            return False  # the common case, every key distinct: one C-level check
        newest: dict[str, int] = {}
        keyed = 0
        for i, key in enumerate(keys):
            if key is not None:
                newest[key] = i
                keyed += 1
        dropped = keyed - len(newest)
        if not dropped:
            return False
        # The newest frame of a key stays where it was queued: later than every frame
        # before it, so offsets still increase.
        keep = [i for i, key in enumerate(keys) if key is None or newest[key] == i]
        frames = self._frames
        self._frames = [frames[i] for i in keep]
        self._keys = [keys[i] for i in keep]
        self.conflated += dropped
        metrics.EVENTS_CONFLATED.inc(dropped)
        return True
