"""A mergeable log-linear latency histogram (bounded memory, <1% relative error on quantiles)."""

from __future__ import annotations

from typing import Final

# Values are microseconds. Below 2**_SUB_BITS they are exact; above, each power of two is
# cut into 2**_SUB_BITS buckets, so a bucket's width is under 1/128 of its value.
_SUB_BITS: Final = 7
_SUB: Final = 1 << _SUB_BITS


def _bucket_floor(index: int) -> int:
    if index < _SUB:
        return index
    shift = (index >> _SUB_BITS) - 1
    return (_SUB + (index & (_SUB - 1))) << shift


class Histogram:
    """Counts of latencies in microseconds; `merge` adds another process's counts."""

    __slots__ = ("counts", "max_us", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_us = 0

    def record(self, value_us: int) -> None:
        # The bucket: exact below _SUB, else the top _SUB_BITS + 1 bits (runs once per received frame).
        if value_us < _SUB:
            b = max(value_us, 0)
        else:
            shift = value_us.bit_length() - _SUB_BITS - 1
            b = ((shift + 1) << _SUB_BITS) + ((value_us >> shift) - _SUB)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.total += 1
        if value_us > self.max_us:
            self.max_us = value_us

    def merge(self, other: Histogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n
        self.total += other.total
        self.max_us = max(self.max_us, other.max_us)

    def quantile_us(self, q: float) -> float:
        """The q-quantile (0..1) in microseconds, 0.0 when empty; reports the bucket's lower edge."""
        if self.total == 0:
            return 0.0
        rank = max(1, round(q * self.total))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return float(min(_bucket_floor(b), self.max_us))
        return float(self.max_us)

    def to_json(self) -> dict[str, object]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "total": self.total, "max_us": self.max_us}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Histogram:
        h = cls()
        counts = data["counts"]
        assert isinstance(counts, dict)
        h.counts = {int(k): int(v) for k, v in counts.items()}
        total, max_us = data["total"], data["max_us"]
        assert isinstance(total, int)
        assert isinstance(max_us, int)
        h.total, h.max_us = total, max_us
        return h
