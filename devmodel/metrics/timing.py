"""The lease engine's timing hook: what only the device model does, timed.

shared/DESIGN.md ("Performance") names three things the device model must make fast: the
trapped access, the fault (an access that had to wait for a page-in or a revoke) and the
revoke. `AccessTiming` is the `devmodel.leases.engine.AccessObserver` that fills one histogram
for each. The engine calls it with durations it measured anyway; recording is a `bit_length`
and a few increments, so it is always on.
"""

from __future__ import annotations

from collections.abc import Callable

from devmodel.metrics.histogram import Histogram

__all__ = ["AccessTiming"]


class AccessTiming:
    """Access, fault and revoke latency histograms; pass it as `LeaseEngine(timing=...)`.

    Its hooks are the histograms' own `record` methods, so the engine's call on every access
    lands directly in the histogram: one Python call, not a method that calls another.
    """

    __slots__ = ("access", "access_latency", "fault", "fault_latency", "revoke", "revoke_latency")

    def __init__(self) -> None:
        self.access_latency = Histogram("access")
        self.fault_latency = Histogram("fault")
        self.revoke_latency = Histogram("revoke")
        self.access: Callable[[int], None] = self.access_latency.record
        self.fault: Callable[[int], None] = self.fault_latency.record
        self.revoke: Callable[[int], None] = self.revoke_latency.record

    def histograms(self) -> list[Histogram]:
        return [self.access_latency, self.fault_latency, self.revoke_latency]
