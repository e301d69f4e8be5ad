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
        # Both lists exist only while something is queued: most sockets are idle most of
        # the time, and a pod holds one outbox per socket. _keys runs parallel to _frames.
        self._frames: list[bytes] | None = None
        self._keys: list[str | None] | None = None
        self.conflated = 0

    def __len__(self) -> int:
        """Frames waiting, superseded ones included until they are dropped."""
        return 0 if self._frames is None else len(self._frames)

    def put(self, frame: bytes, conflation_key: str | None = None) -> bool:
        frames, keys = self._frames, self._keys
        if frames is None or keys is None:
            self._frames, self._keys = [frame], [conflation_key]
            return True
        frames.append(frame)
        keys.append(conflation_key)
        if len(frames) > self._capacity and not self._conflate(frames, keys):
            frames.pop()
            keys.pop()
            return False
        return True

    def pop_all(self) -> list[bytes]:
        """Take every waiting frame that no newer one supersedes, oldest first."""
        frames, keys = self._frames, self._keys
        self._frames = self._keys = None
        if frames is None or keys is None:
            return []
        if len(frames) > 1:
            self._conflate(frames, keys)
        return frames

    def _conflate(self, frames: list[bytes], keys: list[str | None]) -> bool:
        """Drop, in place, every frame superseded by a newer one with the same key; False if none was."""
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
        frames[:] = [frames[i] for i in keep]
        keys[:] = [keys[i] for i in keep]
        self.conflated += dropped
        metrics.EVENTS_CONFLATED.inc(dropped)
        return True
