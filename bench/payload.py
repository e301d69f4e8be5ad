"""The benchmark event: a fixed-size JSON object carrying a sequence number and a publish timestamp."""

from __future__ import annotations

import re
import time
from typing import Final

PAYLOAD_BYTES: Final = 250

# Publish time is time.time_ns() // 1000 (microseconds): every process runs on this one machine,
# so wall clocks agree and receive time minus it is the delivery latency. Microseconds, not
# nanoseconds, because the Node.js peer carries numbers as doubles (exact only below 2**53).
_MARK: Final = re.compile(rb'"seq":\s*(\d+),\s*"ts":\s*(\d+)')
_MARK_STR: Final = re.compile(r'"seq":\s*(\d+),\s*"ts":\s*(\d+)')


def event_payload(*, customer_id: str, seq: int, ts_us: int | None = None, size: int = PAYLOAD_BYTES) -> bytes:
    """A transaction update of exactly `size` bytes (padding absorbs the varying digit counts)."""
    ts = time.time_ns() // 1000 if ts_us is None else ts_us
    head = (
        f'{{"id":"tx-{seq}","status":"pending","stage":"review","updatedAt":"2026-01-01T00:00:00Z",'
        f'"updatedBy":"bench","changedFields":["status"],"customerId":"{customer_id}","pad":"'
    )
    tail = f'","seq":{seq},"ts":{ts}}}'
    pad = size - len(head) - len(tail)
    if pad < 0:
        raise ValueError(f"payload needs at least {len(head) + len(tail)} bytes, {size} asked")
    return (head + "x" * pad + tail).encode()


def parse_mark(frame: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(seq, publish time in µs) from any frame that wraps the payload; None for control frames."""
    m = _MARK.search(frame)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def parse_mark_str(frame: str) -> tuple[int, int] | None:
    """`parse_mark` for clients that hand over decoded text."""
    m = _MARK_STR.search(frame)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))
