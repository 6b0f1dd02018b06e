"""Metrics: what the device model measures, and how it leaves the process.

- `histogram`: log2 nanosecond latency histograms, cheap enough for every access.
- `timing`: `AccessTiming`, the lease engine's timing hook (access, fault, revoke latency).
- `trace`: the engine's tracer hook behind the control command `trace`.
- `exposition`: a prometheus_client collector over devmodel's counters, gauges and
  histograms, rendered as Prometheus text at scrape time.
- `http_endpoint`: `--metrics-listen`, a bounded trio HTTP endpoint serving `/metrics`.

Metrics also leave through the control command `query-metrics` (the same text).
"""

from __future__ import annotations

from devmodel.metrics.exposition import DevmodelCollector, exposition
from devmodel.metrics.histogram import BUCKETS, Histogram
from devmodel.metrics.timing import AccessTiming

__all__ = [
    "BUCKETS",
    "AccessTiming",
    "DevmodelCollector",
    "Histogram",
    "exposition",
]

