"""The metrics in Prometheus text format, rendered by prometheus_client at scrape time.

devmodel keeps its own counters (`DeviceCounters`, bumped on the hot path as plain attribute
increments) and its own log2 histograms; nothing of prometheus_client runs while the guest
accesses memory. `DevmodelCollector` turns those figures into metric families when asked, and
prometheus_client's `generate_latest` writes the text (escaping, number formatting, ordering),
so the format is the library's, not a hand-written approximation of it. prometheus_client is
imported at the first rendering, not at start-up: an instance nobody scrapes never loads it
(about 3 MB of memory and 20 ms of start-up).

Names: counters are `devmodel_<counter>_total`, gauges `devmodel_<name>`, histograms
`devmodel_<name>_seconds`; every sample carries the instance labels (the guest's `domid`), and
the windows-per-state gauge adds `state`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final, TypeAlias, cast

from devmodel.counters import DeviceCounters
from devmodel.metrics.histogram import Histogram

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "CONTENT_TYPE",
    "COUNTER_HELP",
    "HISTOGRAM_HELP",
    "DevmodelCollector",
    "Gauge",
    "exposition",
]

# The text format every Prometheus version reads; what the endpoint declares it serves
# (prometheus_client's CONTENT_TYPE_PLAIN_0_0_4, checked by tests/unit/test_control_metrics.py).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

COUNTER_HELP: Final = {
    "trapped_reads": "BAR accesses (reads) served by the device model",
    "trapped_writes": "BAR accesses (writes) served by the device model",
    "bad_accesses": "accesses refused for their shape (range, alignment, size, region)",
    "protocol_errors": "malformed or unsupported transport messages",
    "page_ins": "page-in requests sent to the lender",
    "failed_accesses": "accesses answered with the failure policy",
    "resets": "device resets",
    "client_connects": "transport clients that connected",
    "grants": "leases granted",
    "grant_nacks": "grants refused",
    "revokes": "revokes performed",
    "faults": "accesses that waited for a page-in or a revoke",
    "lender_losses": "times the lender connection was lost",
    "poll_hits": "transport socket polls that caught a message without parking",
    "poll_misses": "transport socket polls that ran out of budget (then parked)",
    "poll_ns": "CPU time spent polling the transport socket, in nanoseconds",
    "page_in_poll_hits": "page-in waits whose GRANT a poll of the lender socket caught",
    "page_in_poll_misses": "page-in waits that ran out of polling budget (then parked)",
    "page_in_poll_ns": "CPU time spent polling the lender socket for a GRANT, in nanoseconds",
    "interrupts": "interrupts the device raised (MSI/MSI-X messages, INTx assertions)",
}

HISTOGRAM_HELP: Final = {
    "access": "time the device model spent on a trapped access to lent memory",
    "fault": "time a faulting access took, page-in or revoke wait included (one whose grant "
    "came before it reached the wait is in faults, not timed here)",
    "revoke": "time from a revoke's start to its acknowledgement",
}

Gauge: TypeAlias = tuple[str, float | dict[str, float]]
"""(help, value): a number, or {state: number} for a gauge labelled by window state."""


class DevmodelCollector:
    """devmodel's own figures as Prometheus metric families, read afresh at every collect.

    A collector as prometheus_client's registry and `generate_latest` take it (they call
    `collect`); not a subclass of its `Collector`, so that building one imports nothing.

    `gauges` is called at each scrape: gauges are read from the live objects (engine, lender,
    transport, control server) when asked, never pushed.
    """

    def __init__(
        self,
        counters: DeviceCounters,
        histograms: Sequence[Histogram],
        gauges: Callable[[], Mapping[str, Gauge]],
        labels: Mapping[str, str],
    ) -> None:
        self._counters = counters
        self._histograms = list(histograms)
        self._gauges = gauges
        self._label_names = list(labels)
        self._label_values = list(labels.values())

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import (  # noqa: PLC0415 (lazy: see the docstring)
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        names, values = self._label_names, self._label_values
        for name, value in self._counters.as_dict().items():
            counter = CounterMetricFamily(
                f"devmodel_{name}", COUNTER_HELP.get(name, name), labels=names
            )
            counter.add_metric(values, value)
            yield counter
        for name, (help_text, gauge) in self._gauges().items():
            if isinstance(gauge, dict):
                family = GaugeMetricFamily(f"devmodel_{name}", help_text, labels=[*names, "state"])
                for state, v in gauge.items():
                    family.add_metric([*values, state], v)
            else:
                family = GaugeMetricFamily(f"devmodel_{name}", help_text, labels=names)
                family.add_metric(values, gauge)
            yield family
        for h in self._histograms:
            histogram = HistogramMetricFamily(
                f"devmodel_{h.name}_seconds", HISTOGRAM_HELP.get(h.name, h.name), labels=names
            )
            histogram.add_metric(values, _buckets(h), sum_value=h.sum_ns / 1e9)
            yield histogram

    def render(self) -> bytes:
        """The text exposition of everything this collector holds (CONTENT_TYPE)."""
        from prometheus_client.exposition import generate_latest  # noqa: PLC0415

        return generate_latest(self)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    """Cumulative (le in seconds, count) pairs, ending with +Inf, as Prometheus wants them."""
    from prometheus_client.utils import floatToGoString  # noqa: PLC0415

    # How Prometheus writes a float (Go's formatting); the library leaves it untyped.
    go_float = cast(Callable[[float], str], floatToGoString)
    out: list[tuple[str, float]] = []
    cumulative = 0
    for i, n in enumerate(h.counts):
        bound = h.upper_ns(i)
        if bound is None:
            break
        cumulative += n
        out.append((go_float(bound / 1e9), cumulative))
    out.append(("+Inf", h.count))
    return out


def exposition(
    counters: DeviceCounters,
    histograms: Iterable[Histogram],
    gauges: Mapping[str, Gauge],
    labels: Mapping[str, str],
) -> str:
    """One rendering of fixed figures (a collector whose gauges are `gauges`)."""
    fixed = dict(gauges)
    return DevmodelCollector(counters, list(histograms), lambda: fixed, labels).render().decode()
