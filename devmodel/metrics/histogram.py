"""Latency histograms with log2 nanosecond buckets, cheap enough to fill on every access.

Buckets run from 256 ns to 8.6 s, then overflow: recording is one `bit_length()` and an
increment, there is nothing to configure, and a factor of two is the resolution that latency
questions ("microseconds or milliseconds?") need. The same buckets feed both `query-stats`
(`as_dict`, microseconds) and the Prometheus histograms (devmodel.metrics.exposition).
"""

from __future__ import annotations

from typing import Final

__all__ = ["BUCKETS", "MIN_BITS", "Histogram"]

_NO_MIN: Final = 1 << 62
MIN_BITS: Final = 8  # the first bucket holds everything under 2**8 ns = 256 ns
BUCKETS: Final = 26  # up to 2**33 ns (8.6 s); the last bucket is the overflow


class Histogram:
    """Counts of durations in log2 nanosecond buckets."""

    __slots__ = ("count", "counts", "max_ns", "min_ns", "name", "sum_ns")

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts = [0] * BUCKETS
        self.count = 0
        self.sum_ns = 0
        self.min_ns = _NO_MIN
        self.max_ns = 0

    def record(self, ns: int) -> None:
        i = ns.bit_length() - MIN_BITS
        if i < 0:
            i = 0
        elif i >= BUCKETS:
            i = BUCKETS - 1
        self.counts[i] += 1
        self.count += 1
        self.sum_ns += ns
        if ns > self.max_ns:  # noqa: PLR1730 (a compare is cheaper than a call to max())
            self.max_ns = ns
        if ns < self.min_ns:  # noqa: PLR1730
            self.min_ns = ns

    @staticmethod
    def upper_ns(i: int) -> int | None:
        """The exclusive upper bound of bucket i in ns; None for the overflow bucket."""
        return None if i >= BUCKETS - 1 else 1 << (MIN_BITS + i)

    def quantile_ns(self, q: float) -> int:
        """An upper estimate of the q-quantile: the bound of the bucket it falls in."""
        if not self.count:
            return 0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                bound = self.upper_ns(i)
                return min(bound, self.max_ns) if bound is not None else self.max_ns
        return self.max_ns

    def as_dict(self) -> dict[str, object]:
        """JSON for query-stats: summary figures in microseconds plus the non-empty buckets."""
        return {
            "count": self.count,
            "sum_us": round(self.sum_ns / 1000, 3),
            "min_us": round(self.min_ns / 1000, 3) if self.count else 0.0,
            "max_us": round(self.max_ns / 1000, 3),
            "mean_us": round(self.sum_ns / self.count / 1000, 3) if self.count else 0.0,
            "p50_us": round(self.quantile_ns(0.5) / 1000, 3),
            "p90_us": round(self.quantile_ns(0.9) / 1000, 3),
            "p99_us": round(self.quantile_ns(0.99) / 1000, 3),
            # [upper bound in ns (null: overflow), count] for every non-empty bucket.
            "buckets": [[self.upper_ns(i), n] for i, n in enumerate(self.counts) if n],
        }
