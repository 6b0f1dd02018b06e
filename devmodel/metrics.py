"""Latency histograms, the timing hooks that fill them, and Prometheus text exposition.

What only the device model does is what must be measured (shared/DESIGN.md, "Performance"):
the trapped access, the fault (an access that had to wait for a page-in or a revoke) and the
revoke. `InstrumentedEngine` is the lease engine with those three timed; it adds two
`perf_counter_ns` calls and a `bit_length` per access (well under a microsecond), so it is
always on, and it keeps the number of accesses in flight, which a graceful stop waits on.

A histogram has log2 buckets in nanoseconds (256 ns to 8.6 s, then overflow): recording is one
`bit_length()` and an increment, there is nothing to configure, and a factor of two is the
resolution that latency questions ("microseconds or milliseconds?") need.

Metrics leave the process two ways: the control command `query-metrics` and, with
`--metrics-listen`, a tiny HTTP endpoint serving `/metrics` (loopback unless told otherwise).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

import trio

from devmodel.counters import DeviceCounters
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.leases.states import WindowState
from devmodel_wire.lease.constants import RevokeMode

log = logging.getLogger("devmodel.metrics")
trace_log = logging.getLogger("devmodel.trace")

_NO_MIN: Final = 1 << 62
_now = time.perf_counter_ns
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


_engine_read = LeaseEngine.read
_engine_write = LeaseEngine.write


class InstrumentedEngine(LeaseEngine):
    """The lease engine with its accesses and revokes timed, traced on request, and counted
    while in flight. Transports see it as the aperture; nothing else changes."""

    def __init__(
        self,
        size: int,
        granule: int,
        counters: DeviceCounters,
        config: EngineConfig | None = None,
    ) -> None:
        super().__init__(size, granule, counters, config)
        self.access_latency = Histogram("access")
        self.fault_latency = Histogram("fault")
        self.revoke_latency = Histogram("revoke")
        # Accesses inside the engine right now; only waiting ones can be seen from outside.
        self.in_flight = 0
        # `trace on`: log every access at debug level (the control socket's `trace` command).
        self.trace = False

    async def read(self, offset: int, size: int) -> bytes:
        c = self.counters
        mark = c.page_ins + c.faults
        self.in_flight += 1
        start = _now()
        try:
            data = await _engine_read(self, offset, size)
        finally:
            self.in_flight -= 1
        ns = _now() - start
        self.access_latency.record(ns)
        # A page-in asked or a wait taken while this access ran: it was a fault. (With
        # concurrent accesses, as under Xen, another access's fault can be counted here too;
        # the histogram is an estimate of what guests wait, not an audit.)
        if c.page_ins + c.faults != mark:
            self.fault_latency.record(ns)
        if self.trace:
            trace_log.debug("read %d at %#x = %s (%d ns)", size, offset, data.hex(), ns)
        return data

    async def write(self, offset: int, data: bytes) -> None:
        c = self.counters
        mark = c.page_ins + c.faults
        self.in_flight += 1
        start = _now()
        try:
            await _engine_write(self, offset, data)
        finally:
            self.in_flight -= 1
        ns = _now() - start
        self.access_latency.record(ns)
        if c.page_ins + c.faults != mark:
            self.fault_latency.record(ns)
        if self.trace:
            trace_log.debug("write %d at %#x <- %s (%d ns)", len(data), offset, data.hex(), ns)

    async def revoke(self, lease_id: int, mode: RevokeMode) -> None:
        start = time.perf_counter_ns()
        try:
            await super().revoke(lease_id, mode)
        finally:
            self.revoke_latency.record(time.perf_counter_ns() - start)

    async def drain(self, timeout: float) -> bool:
        """Wait (up to `timeout`) until no access is inside the engine; True if none is.

        A waiting access ends by itself within the page-in deadline (served, or given the
        failure policy), so a graceful stop that waits here never cuts one off half-done.
        """
        with trio.move_on_after(timeout):
            while self.in_flight:
                await trio.sleep(0.005)
        return not self.in_flight

    def histograms(self) -> list[Histogram]:
        return [self.access_latency, self.fault_latency, self.revoke_latency]

    def state_counts(self) -> dict[str, int]:
        """Windows per state (a walk over the table: for queries, never the hot path)."""
        counts = {s.value: 0 for s in WindowState if s is not WindowState.VACANT}
        for w in self.windows():
            counts[w.state.value] += 1
        return counts


# ---------------------------------------------------------------------------- Prometheus

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
}

HISTOGRAM_HELP: Final = {
    "access": "time the device model spent on a trapped access to lent memory",
    "fault": "time a faulting access took, page-in or revoke wait included",
    "revoke": "time from a revoke's start to its acknowledgement",
}


def _labels(base: dict[str, str], **extra: str) -> str:
    merged = {**base, **extra}
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in merged.items())
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def exposition(
    counters: DeviceCounters,
    histograms: Iterable[Histogram],
    gauges: dict[str, tuple[str, float | dict[str, float]]],
    labels: dict[str, str],
) -> str:
    """Prometheus text format 0.0.4.

    `gauges` maps a name to (help, value) where value is a number or {label value: number}
    (the label is called `state`, the only labelled gauge being windows per state).
    """
    lines: list[str] = []
    for name, value in counters.as_dict().items():
        metric = f"devmodel_{name}_total"
        lines.append(f"# HELP {metric} {COUNTER_HELP.get(name, name)}")
        lines.append(f"# TYPE {metric} counter")
        lines.append(f"{metric}{_labels(labels)} {value}")
    for name, (help_text, gauge) in gauges.items():
        metric = f"devmodel_{name}"
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} gauge")
        if isinstance(gauge, dict):
            for key, v in gauge.items():
                lines.append(f"{metric}{_labels(labels, state=key)} {_number(v)}")
        else:
            lines.append(f"{metric}{_labels(labels)} {_number(gauge)}")
    for h in histograms:
        metric = f"devmodel_{h.name}_seconds"
        lines.append(f"# HELP {metric} {HISTOGRAM_HELP.get(h.name, h.name)}")
        lines.append(f"# TYPE {metric} histogram")
        cumulative = 0
        for i, n in enumerate(h.counts):
            cumulative += n
            bound = h.upper_ns(i)
            if bound is None:
                break
            lines.append(f"{metric}_bucket{_labels(labels, le=f'{bound / 1e9:.9g}')} {cumulative}")
        lines.append(f"{metric}_bucket{_labels(labels, le='+Inf')} {h.count}")
        lines.append(f"{metric}_sum{_labels(labels)} {h.sum_ns / 1e9:.9f}")
        lines.append(f"{metric}_count{_labels(labels)} {h.count}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- HTTP

HTTP_MAX_REQUEST: Final = 8 << 10
HTTP_TIMEOUT: Final = 5.0
HTTP_MAX_CONNECTIONS: Final = 8


async def open_metrics(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the metrics endpoint (before the service starts, so a busy port fails startup)."""
    return await trio.open_tcp_listeners(port, host=host)


def bound_address(listeners: list[trio.SocketListener]) -> tuple[str, int]:
    name = listeners[0].socket.getsockname()
    return str(name[0]), int(name[1])


async def serve_metrics(
    listeners: list[trio.SocketListener],
    render: Callable[[], str],
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `render()` at GET /metrics over HTTP/1.0 until cancelled.

    Deliberately minimal (one request per connection, a deadline on each, a cap on concurrent
    connections): a scraper is the only expected peer, and nothing it does may cost the
    device more than a bounded amount of work.
    """
    limiter = trio.CapacityLimiter(HTTP_MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                with trio.move_on_after(HTTP_TIMEOUT):
                    await _http_exchange(stream, render)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                limiter.release()

    await trio.serve_listeners(handle, listeners, task_status=task_status)


async def _http_exchange(stream: trio.SocketStream, render: Callable[[], str]) -> None:
    request = bytearray()
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        request += chunk
        if len(request) > HTTP_MAX_REQUEST:
            await stream.send_all(_http(431, "text/plain", "request too large\n"))
            return
    first = bytes(request).split(b"\n", 1)[0].decode("latin-1").strip().split()
    if len(first) < 2 or first[0] not in ("GET", "HEAD"):
        await stream.send_all(_http(405, "text/plain", "only GET /metrics\n"))
        return
    path = first[1].split("?", 1)[0]
    if path not in ("/metrics", "/"):
        await stream.send_all(_http(404, "text/plain", "see /metrics\n"))
        return
    body = render()
    reply = _http(200, "text/plain; version=0.0.4; charset=utf-8", body)
    if first[0] == "HEAD":
        reply = reply[: reply.index(b"\r\n\r\n") + 4]
    await stream.send_all(reply)


_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}


def _http(status: int, ctype: str, body: str) -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data
