"""A connection's bounded send queue, which conflates superseded transaction updates."""

from __future__ import annotations

from typing import cast


class _Keyed:
    """A queued frame that a newer one may supersede; voided in place (frame None)."""

    __slots__ = ("frame", "key")

    def __init__(self, frame: bytes, key: str) -> None:
        self.frame: bytes | None = frame
        self.key = key


class Outbox:
    """Frames waiting to be written to one client, oldest first.

    Overflow policy: `put` returns False when `capacity` frames are already waiting;
    the caller closes the connection as a slow consumer (it resumes from its offsets
    on reconnect), because silently dropping events would break the no-loss promise.
    Before that, an entry with a conflation key (a transaction_update) replaces the
    still-queued entry with the same key: only the newest state of a transaction
    matters, and its offset tells the client it skipped versions.
    """

    __slots__ = ("_by_key", "_capacity", "_entries", "_live", "conflated")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # Plain bytes for frames that are never superseded (the common case: no allocation).
        # Both containers exist only while something is queued: most sockets are idle
        # most of the time, and a pod holds one outbox per socket.
        self._entries: list[bytes | _Keyed] | None = None
        self._by_key: dict[str, _Keyed] | None = None
        self._live = 0
        self.conflated = 0

    def __len__(self) -> int:
        """Frames still to be written (voided entries do not count)."""
        return self._live

    def put(self, frame: bytes, conflation_key: str | None = None) -> bool:
        if conflation_key is None:
            if self._live >= self._capacity:
                return False
            if self._entries is None:
                self._entries = [frame]
            else:
                self._entries.append(frame)
            self._live += 1
            return True
        by_key = self._by_key
        if by_key is None:
            by_key = self._by_key = {}
        previous = by_key.get(conflation_key)
        if previous is not None:
            # Void the older update; the newer one goes to the back to keep offsets increasing.
            previous.frame = None
            self._live -= 1
            self.conflated += 1
        if self._live >= self._capacity:
            return False
        entry = _Keyed(frame, conflation_key)
        if self._entries is None:
            self._entries = [entry]
        else:
            self._entries.append(entry)
        by_key[conflation_key] = entry
        self._live += 1
        return True

    def pop_all(self) -> list[bytes]:
        """Take every waiting frame, oldest first."""
        entries, by_key = self._entries, self._by_key
        self._entries = self._by_key = None
        self._live = 0
        if entries is None:
            return []
        if by_key is None:
            return cast(list[bytes], entries)  # nothing keyed was queued: all entries are bytes
        frames: list[bytes] = []
        for entry in entries:
            if isinstance(entry, bytes):
                frames.append(entry)
            elif entry.frame is not None:
                frames.append(entry.frame)
        return frames
